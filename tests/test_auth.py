"""The trust boundary against the real server and real certificates: mTLS,
the example policy per role and method, safe defaults, reloads, audit identity,
socket directory safety and stream limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from connmeta import devcerts
from connmeta.auth import TLSError
from connmeta.policy import PolicyError
from connmeta.server import Config, ListenError, Sidecar, is_loopback
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import connection_service_pb2_grpc as cs_grpc
from connmeta.v1 import report_service_pb2 as rs
from connmeta.v1 import report_service_pb2_grpc as rs_grpc
from connmeta.v1 import router_service_pb2 as rt
from connmeta.v1 import router_service_pb2_grpc as rt_grpc
from tests import factories, tls
from tests.factories import CLOSED, Reporter
from tests.sidecar import details

WAIT = 5.0
# A fresh connection per channel: grpc would otherwise share one between
# channels of equal settings, and a test about handshakes would see none.
FRESH = [("grpc.use_local_subchannel_pool", 1)]

Started = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Started]:
    sidecars: list[Sidecar] = []

    async def start(**overrides: Any) -> Sidecar:
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "unix_socket": str(tmp_path / f"a{len(sidecars)}.sock"),
        }
        config = Config(**{**settings, **overrides})
        sidecar = Sidecar(config)
        await sidecar.start()
        sidecars.append(sidecar)
        return sidecar

    yield start
    for sidecar in sidecars:
        await sidecar.stop(grace=0)


def mtls(sidecar: Sidecar, role: str, directory: Path | None = None) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        sidecar.tcp_address, tls.credentials(role, directory), options=FRESH
    )


# -- one call per method, as small as it can be -----------------------------------------


async def _get(ch: grpc.aio.Channel) -> None:
    await cs_grpc.ConnectionServiceStub(ch).GetConnection(cs.GetConnectionRequest(id="x"))


async def _list(ch: grpc.aio.Channel) -> None:
    await cs_grpc.ConnectionServiceStub(ch).ListConnections(cs.ListConnectionsRequest())


async def _watch(ch: grpc.aio.Channel) -> None:
    call = cs_grpc.ConnectionServiceStub(ch).WatchConnections(
        cs.WatchConnectionsRequest(send_initial_events=True)
    )
    try:
        await asyncio.wait_for(call.read(), WAIT)
    finally:
        call.cancel()


async def _update(ch: grpc.aio.Channel) -> None:
    await cs_grpc.ConnectionServiceStub(ch).UpdateServerConnection(
        cs.UpdateServerConnectionRequest(
            id="x",
            address=pb.Address(host="b.example", port=443),
            update_mask=field_mask_pb2.FieldMask(paths=["address"]),
        )
    )


async def _write(call: Any, request: Any) -> None:
    """Write the first message; a call the server already ended (refused before
    any handler ran) fails the write with "INTERNAL: Internal error from Core",
    while the read that follows raises the status the server sent."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call.write(request)


async def _report(ch: grpc.aio.Channel) -> None:
    call = rs_grpc.ReportServiceStub(ch).Report()
    try:
        await _write(call, rs.ReportRequest(resync_start=rs.ResyncStart()))
        while True:
            response = await asyncio.wait_for(call.read(), WAIT)
            # A refused call raises from read(); EOF would be a clean end.
            assert response is not grpc.aio.EOF, "the report stream ended without an ack"
            assert isinstance(response, rs.ReportResponse)
            if response.WhichOneof("message") == "ack":
                return
    finally:
        call.cancel()


async def _route(ch: grpc.aio.Channel) -> None:
    call = rt_grpc.RouterServiceStub(ch).Route()
    try:
        await _write(call, rt.RouteRequest(subscribe=rt.RouteSubscribe(name="r")))
        response = await asyncio.wait_for(call.read(), WAIT)
        assert response is not grpc.aio.EOF, "the route stream ended without an answer"
    finally:
        call.cancel()


async def _health(ch: grpc.aio.Channel) -> None:
    stub: Any = health_pb2_grpc.HealthStub(ch)
    await stub.Check(health_pb2.HealthCheckRequest())


async def _reflection(ch: grpc.aio.Channel) -> None:
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(ch)  # type: ignore[arg-type]
    call = stub.ServerReflectionInfo()
    try:
        await _write(call, reflection_pb2.ServerReflectionRequest(list_services=""))
        response = await asyncio.wait_for(call.read(), WAIT)
        assert response is not grpc.aio.EOF, "reflection ended without an answer"
    finally:
        call.cancel()


METHODS: dict[str, Callable[[grpc.aio.Channel], Awaitable[None]]] = {
    "/connmeta.v1.ConnectionService/GetConnection": _get,
    "/connmeta.v1.ConnectionService/ListConnections": _list,
    "/connmeta.v1.ConnectionService/WatchConnections": _watch,
    "/connmeta.v1.ConnectionService/UpdateServerConnection": _update,
    "/connmeta.v1.ReportService/Report": _report,
    "/connmeta.v1.RouterService/Route": _route,
    "/grpc.health.v1.Health/Check": _health,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _reflection,
}
READS = {m for m in METHODS if "Update" not in m and "Report" not in m and "Route" not in m}
WRITES = {
    "writer": "/connmeta.v1.ConnectionService/UpdateServerConnection",
    "reporter": "/connmeta.v1.ReportService/Report",
    "router": "/connmeta.v1.RouterService/Route",
}


async def outcome(ch: grpc.aio.Channel, method: str) -> grpc.StatusCode | grpc.aio.AioRpcError:
    """OK or the code of a failure past authorization; the error itself if refused."""
    try:
        await METHODS[method](ch)
    except grpc.aio.AioRpcError as error:
        if error.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return error
        return error.code()
    return grpc.StatusCode.OK


def assert_refused(result: object, method: str, code: grpc.StatusCode) -> None:
    assert isinstance(result, grpc.aio.AioRpcError), f"{method} was allowed: {result}"
    assert result.code() == code, result
    info = details(result)["ErrorInfo"]
    assert info.reason == code.name
    assert info.metadata["method"] == method


# -- the example policy, role by role --------------------------------------------------


@pytest.mark.parametrize("role", devcerts.ROLES)
async def test_each_role_may_call_exactly_what_the_example_policy_allows(
    start: Started, role: str
) -> None:
    sidecar = await start(**tls.server_config(), authz_policy=str(tls.certs() / "policy.json"))
    allowed = READS | ({WRITES[role]} if role in WRITES else set())
    async with mtls(sidecar, role) as ch:
        for method in METHODS:
            result = await outcome(ch, method)
            if method in allowed:
                assert not isinstance(result, grpc.aio.AioRpcError), (role, method, result)
            else:
                assert_refused(result, method, grpc.StatusCode.PERMISSION_DENIED)


async def test_a_client_without_a_certificate_or_from_another_ca_fails_the_handshake(
    start: Started, tmp_path: Path
) -> None:
    sidecar = await start(**tls.server_config())
    ca = (tls.certs() / "ca.pem").read_bytes()
    stranger = tmp_path / "stranger"
    devcerts.init(stranger)
    for credentials in (
        grpc.ssl_channel_credentials(ca),  # no client certificate
        grpc.ssl_channel_credentials(
            ca, (stranger / "writer.key").read_bytes(), (stranger / "writer.pem").read_bytes()
        ),
    ):
        async with grpc.aio.secure_channel(sidecar.tcp_address, credentials, options=FRESH) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _list(ch)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # And a plaintext client does not get an answer from a TLS port.
    async with grpc.aio.insecure_channel(sidecar.tcp_address, options=FRESH) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _list(ch)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_tcp_may_read_and_its_writes_are_refused_naming_how_to_enable_them(
    start: Started,
) -> None:
    sidecar = await start()
    async with grpc.aio.insecure_channel(sidecar.tcp_address) as ch:
        for method in METHODS:
            result = await outcome(ch, method)
            if method in READS:
                assert not isinstance(result, grpc.aio.AioRpcError), (method, result)
                continue
            assert_refused(result, method, grpc.StatusCode.PERMISSION_DENIED)
            assert isinstance(result, grpc.aio.AioRpcError)
            assert "Unix socket" in (result.details() or "")
            assert "--tls-cert" in (result.details() or "")


async def test_under_a_policy_plaintext_callers_are_unauthenticated_where_a_role_could_call(
    start: Started,
) -> None:
    sidecar = await start(authz_policy=str(tls.certs() / "policy.json"), insecure_listen=False)
    async with grpc.aio.insecure_channel(sidecar.tcp_address) as ch:
        assert_refused(await outcome(ch, _LIST), _LIST, grpc.StatusCode.UNAUTHENTICATED)


_LIST = "/connmeta.v1.ConnectionService/ListConnections"
_UPDATE = WRITES["writer"]


async def test_the_unix_socket_may_call_everything_whatever_the_policy(
    start: Started, tmp_path: Path
) -> None:
    deny_all = tmp_path / "deny.json"
    deny_all.write_text(json.dumps({"name": "nobody", "allow_rules": []}))
    sidecar = await start(**tls.server_config(), authz_policy=str(deny_all))
    async with grpc.aio.insecure_channel(f"unix://{sidecar.unix_socket}") as ch:
        for method in METHODS:
            assert not isinstance(await outcome(ch, method), grpc.aio.AioRpcError), method
    async with mtls(sidecar, "writer") as ch:
        assert_refused(await outcome(ch, _LIST), _LIST, grpc.StatusCode.PERMISSION_DENIED)


# -- reloads without a restart ---------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 5) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        assert loop.time() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.1)


def replace(path: Path, text: str) -> None:
    """Atomically, as an editor or a ConfigMap update does."""
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)


async def test_policy_changes_take_effect_without_a_restart_and_a_broken_one_is_ignored(
    start: Started, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy_file = tmp_path / "policy.json"
    example = devcerts.example_policy()
    policy_file.write_text(json.dumps(example))
    sidecar = await start(**tls.server_config(), authz_policy=str(policy_file))
    assert sidecar.policy is not None
    widened = json.loads(json.dumps(example))
    for rule in widened["allow_rules"]:
        if rule["name"] == "writer-updates":
            rule["source"]["principals"].append(devcerts.role_principal("reader"))

    async with mtls(sidecar, "reader") as ch:

        async def reader_may_update() -> bool:
            return not isinstance(await outcome(ch, _UPDATE), grpc.aio.AioRpcError)

        async def reader_may_not_update() -> bool:
            return not await reader_may_update()

        assert await reader_may_not_update()
        replace(policy_file, json.dumps(widened))
        await eventually(reader_may_update, "a widened policy allows the reader to update")

        generation = sidecar.policy.generation
        with caplog.at_level(logging.WARNING, logger="connmeta.policy"):
            replace(policy_file, '{"name": "broken", "allow_rules": [{"nme": "typo"}]}')
            await eventually(
                lambda: _async(any("not reloaded" in r.message for r in caplog.records)),
                "the broken policy is logged",
            )
        assert "unknown field 'nme'" in caplog.text
        assert sidecar.policy.generation == generation
        assert await reader_may_update(), "the last good policy stays in force"

        replace(policy_file, json.dumps(example))
        await eventually(reader_may_not_update, "the narrowed policy denies the reader again")


async def _async(value: bool) -> bool:
    return value


async def test_a_replaced_server_certificate_and_ca_serve_new_connections_without_a_restart(
    start: Started, tmp_path: Path
) -> None:
    live = tmp_path / "live"
    shutil.copytree(tls.certs(), live)
    sidecar = await start(**tls.server_config(live))
    async with mtls(sidecar, "reader", live) as ch:
        await _list(ch)

    rotated = tmp_path / "rotated"  # a new CA: new server and client certificates
    devcerts.init(rotated)
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copy(rotated / name, live / f"{name}.new")
    for name in ("server.pem", "server.key", "ca.pem"):
        os.replace(live / f"{name}.new", live / name)

    async with mtls(sidecar, "reader", rotated) as ch:
        await _list(ch)  # the new CA verifies the new server certificate, and vice versa
    async with mtls(sidecar, "reader", tls.certs()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _list(ch)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_half_replaced_key_pair_keeps_the_last_good_certificate(
    start: Started, tmp_path: Path
) -> None:
    live = tmp_path / "live"
    shutil.copytree(tls.certs(), live)
    sidecar = await start(**tls.server_config(live))
    other = tmp_path / "other"
    devcerts.init(other)
    shutil.copy(other / "server.key", live / "server.key")  # the certificate not yet
    async with mtls(sidecar, "reader", live) as ch:
        await _list(ch)


# -- audit: the principal comes from the transport -------------------------------------


@pytest.mark.parametrize(
    ("via", "expected"), [("unix", "unix"), ("mtls", devcerts.role_principal("writer"))]
)
async def test_a_forged_actor_does_not_change_the_recorded_principal(
    start: Started, via: str, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    sidecar = await start(**tls.server_config())
    snapshot = factories.server(state=CLOSED)
    server_id = snapshot.server.connection.id
    async with grpc.aio.insecure_channel(f"unix://{sidecar.unix_socket}") as unix:
        await Reporter(unix).report(snapshot)
    channel = (
        grpc.aio.insecure_channel(f"unix://{sidecar.unix_socket}")
        if via == "unix"
        else mtls(sidecar, "writer")
    )
    forged = devcerts.role_principal("admin")
    with caplog.at_level(logging.INFO, logger="connmeta.audit"):
        async with channel as ch:
            response = await cs_grpc.ConnectionServiceStub(ch).UpdateServerConnection(
                cs.UpdateServerConnectionRequest(
                    id=server_id,
                    address=pb.Address(host="b.example", port=443),
                    update_mask=field_mask_pb2.FieldMask(paths=["address"]),
                    actor=forged,
                )
            )
    change = response.connection.metadata.pending_change
    assert (change.principal, change.actor) == (expected, forged)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "connmeta.audit"]
    assert f"principal={expected} " in line
    assert f"id={server_id}" in line
    assert "method=/connmeta.v1.ConnectionService/UpdateServerConnection" in line


# -- start-up refusals -----------------------------------------------------------------


async def test_a_group_or_world_writable_socket_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    sidecar = Sidecar(Config(listen="", unix_socket=str(shared / "c.sock")))
    with pytest.raises(ListenError, match=r"group- or world-writable.*0777"):
        await sidecar.start()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
async def test_a_socket_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 12345, 12345)
    sidecar = Sidecar(Config(listen="", unix_socket=str(theirs / "c.sock")))
    with pytest.raises(ListenError, match="owned by uid 12345"):
        await sidecar.start()


async def test_a_missing_socket_directory_is_created_private(
    start: Started, tmp_path: Path
) -> None:
    path = tmp_path / "new" / "dir" / "c.sock"
    sidecar = await start(unix_socket=str(path))
    assert sidecar.unix_socket == str(path)
    assert (path.parent.stat().st_mode & 0o777) == 0o700


def test_plaintext_api_on_a_non_loopback_address_is_refused_unless_insecure_listen() -> None:
    for address in ("127.0.0.1:50051", "[::1]:1", "localhost:1"):
        assert is_loopback(address), address
    for address in ("0.0.0.0:50051", "[::]:1", "connmeta.example:1", ":50051"):
        assert not is_loopback(address), address


async def test_a_plaintext_non_loopback_listen_is_refused_with_the_remedy() -> None:
    sidecar = Sidecar(Config(listen="0.0.0.0:0", unix_socket=""))
    with pytest.raises(ListenError, match="--insecure-listen"):
        await sidecar.start()


def test_an_invalid_policy_or_tls_files_stop_the_start_with_the_file_named(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "policy.json"
    bad.write_text('{"name": "x"}')
    with pytest.raises(PolicyError, match=f"{bad}.*allow_rules"):
        Sidecar(Config(listen="", unix_socket="", authz_policy=str(bad)))
    mismatched: dict[str, Any] = {
        **tls.server_config(),
        "tls_key": str(tls.certs() / "writer.key"),
    }
    with pytest.raises(TLSError, match="is not the key of the certificate"):
        Sidecar(Config(listen="", unix_socket="", **mismatched))
    with pytest.raises(ListenError, match="go together"):
        Sidecar(Config(listen="", unix_socket="", tls_cert=str(tls.certs() / "server.pem")))


# -- limits ----------------------------------------------------------------------------


async def test_watchers_beyond_the_global_limit_are_resource_exhausted(start: Started) -> None:
    sidecar = await start(max_watchers=1)
    stub = cs_grpc.ConnectionServiceStub(grpc.aio.insecure_channel(f"unix://{sidecar.unix_socket}"))
    first = stub.WatchConnections(cs.WatchConnectionsRequest(send_initial_events=True))
    await asyncio.wait_for(first.read(), WAIT)
    second = stub.WatchConnections(cs.WatchConnectionsRequest(send_initial_events=True))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(second.read(), WAIT)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = details(caught.value)["ErrorInfo"]
    assert (info.reason, info.metadata["limit"]) == ("TOO_MANY_WATCHERS", "1")
    first.cancel()
    await eventually(lambda: _async(sidecar.authz.watchers == 0), "the watch is released")
    third = stub.WatchConnections(cs.WatchConnectionsRequest(send_initial_events=True))
    await asyncio.wait_for(third.read(), WAIT)
    third.cancel()


async def test_streams_beyond_the_per_principal_limit_are_resource_exhausted(
    start: Started,
) -> None:
    sidecar = await start(**tls.server_config(), max_streams_per_principal=1)
    async with mtls(sidecar, "writer") as writer, mtls(sidecar, "reader") as reader:
        held = cs_grpc.ConnectionServiceStub(writer).WatchConnections(
            cs.WatchConnectionsRequest(send_initial_events=True)
        )
        await asyncio.wait_for(held.read(), WAIT)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _report(writer)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = details(caught.value)["ErrorInfo"]
        assert info.reason == "TOO_MANY_STREAMS"
        assert info.metadata["method"] == "/connmeta.v1.ReportService/Report"
        await _watch(reader)  # another principal has its own budget
        await _list(writer)  # unary calls are not streams
        held.cancel()
