"""The addon's side of the Report stream contract, against a scripted sidecar
(a ReportService that answers as the test says) and a real mitmdump: the
proxy names itself on every stream, survives refused snapshots without
reconnecting, and treats INVALID_ARGUMENT as a contract bug said once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from connmeta.mitm.addon import derive_proxy_id
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs
from connmeta.v1 import report_service_pb2_grpc as rs_grpc
from tests.e2e.harness import VENV_BIN, Mitmdump, Origin, async_wait_for, get

pytestmark = pytest.mark.e2e

# What the scripted sidecar does with one request: None acks it, a
# rejection list acks it refusing those snapshots, an exception aborts.
Script = Callable[[int, rs.ReportRequest], list[rs.SnapshotRejection] | grpc.StatusCode | None]


# Messages the scripted sidecar sends after acknowledging a request.
Extra = Callable[[int, rs.ReportRequest], list[rs.ReportResponse]]


@dataclass
class ScriptedSidecar(rs_grpc.ReportServiceServicer):
    script: Script
    extra: Extra = lambda stream, request: []
    streams: list[list[rs.ReportRequest]] = field(default_factory=list)

    async def Report(
        self,
        request_iterator: AsyncIterator[rs.ReportRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[rs.ReportResponse]:
        received: list[rs.ReportRequest] = []
        self.streams.append(received)
        async for request in request_iterator:
            received.append(request)
            verdict = self.script(len(self.streams), request)
            if isinstance(verdict, grpc.StatusCode):
                await context.abort(verdict, "scripted: proxy_id: must not change within a stream")
            ack = rs.ReportAck(sequence=request.sequence)
            ack.rejected.extend(verdict or ())
            yield rs.ReportResponse(ack=ack)
            for response in self.extra(len(self.streams), request):
                yield response


@contextlib.asynccontextmanager
async def scripted_sidecar(
    path: Path, script: Script, extra: Extra | None = None
) -> AsyncIterator[ScriptedSidecar]:
    servicer = ScriptedSidecar(script) if extra is None else ScriptedSidecar(script, extra)
    server = grpc.aio.server()
    rs_grpc.add_ReportServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    try:
        yield servicer
    finally:
        await server.stop(None)


def start_proxy(directory: Path, target: Path, *extra: str) -> Mitmdump:
    dump = Mitmdump(directory, ["--set", f"connmeta_target=unix://{target}", *extra])
    dump.start()
    return dump


def reject_every_snapshot(stream: int, request: rs.ReportRequest) -> list[rs.SnapshotRejection]:
    return [
        rs.SnapshotRejection(
            index=i,
            connection_id=(snap.client if snap.HasField("client") else snap.server).connection.id,
            reason="INVALID_SNAPSHOT",
            message="scripted refusal",
            violations=[
                rs.FieldViolation(
                    field=f"batch.snapshots[{i}].client.connection.peername",
                    description="required",
                )
            ],
        )
        for i, snap in enumerate(request.batch.snapshots)
    ]


def log_lines(proxy: Mitmdump, needle: str) -> list[str]:
    return [line for line in proxy.log().splitlines() if needle in line]


async def test_every_stream_opens_with_the_same_derived_proxy_id(
    tmp_path: Path, origin_a: Origin
) -> None:
    def end_first_stream_after_resync(stream: int, request: rs.ReportRequest) -> Any:
        return grpc.StatusCode.UNAVAILABLE if stream == 1 and request.HasField("batch") else None

    async with scripted_sidecar(tmp_path / "s.sock", end_first_stream_after_resync) as sidecar:
        proxy = start_proxy(tmp_path / "proxy", tmp_path / "s.sock")
        try:
            await asyncio.to_thread(get, proxy.proxy, origin_a.url + "/id")
            await async_wait_for(
                lambda: asyncio.sleep(0, len(sidecar.streams) >= 2 and sidecar.streams[1]),
                10,
                "a second stream",
            )
        finally:
            proxy.stop()
    expected = derive_proxy_id(socket.gethostname(), proxy.port, 0)
    assert expected.endswith(f":{proxy.port}")
    first, second = sidecar.streams[:2]
    assert first[0].HasField("resync_start"), "a stream opens with a resync"
    # ... or with the replay of what the previous one left unacknowledged
    # (here the batch the scripted sidecar refused), then the resync.
    refused = first[-1].batch.snapshots
    assert refused
    assert second[0].batch.snapshots[: len(refused)] == refused
    assert second[1].HasField("resync_start")
    for stream in (first, second):
        assert stream[0].proxy_id == expected
        assert all(not r.proxy_id for r in stream[1:]), "named once, on the first message"


async def test_an_explicit_proxy_id_is_sent_as_given(tmp_path: Path) -> None:
    async with scripted_sidecar(tmp_path / "s.sock", lambda stream, request: None) as sidecar:
        proxy = start_proxy(
            tmp_path / "proxy", tmp_path / "s.sock", "--set", "connmeta_proxy_id=edge-7.example:p1"
        )
        try:
            await async_wait_for(
                lambda: asyncio.sleep(0, sidecar.streams and sidecar.streams[0]), 10, "a stream"
            )
        finally:
            proxy.stop()
    assert sidecar.streams[0][0].proxy_id == "edge-7.example:p1"


def test_a_proxy_id_outside_the_contract_stops_mitmdump_at_startup(tmp_path: Path) -> None:
    from connmeta.mitm.paths import addon_path

    result = subprocess.run(
        [str(VENV_BIN / "mitmdump"), "--listen-host", "127.0.0.1", "--listen-port", "0",
         "-s", addon_path(), "--set", f"confdir={tmp_path}",
         "--set", "connmeta_proxy_id=two words"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert "connmeta_proxy_id must be 1-256 printable ASCII" in result.stdout + result.stderr


async def test_refused_snapshots_are_logged_throttled_and_the_stream_goes_on(
    tmp_path: Path, origin_a: Origin
) -> None:
    async with scripted_sidecar(tmp_path / "s.sock", reject_every_snapshot) as sidecar:
        proxy = start_proxy(tmp_path / "proxy", tmp_path / "s.sock")
        try:
            for i in range(20):
                assert await asyncio.to_thread(get, proxy.proxy, f"{origin_a.url}/{i}") == f"A:/{i}"

            def refused_all() -> bool:
                snaps = [s for r in sidecar.streams[0] for s in r.batch.snapshots]
                return len([s for s in snaps if s.hook == pb.HOOK_CLIENT_DISCONNECTED]) == 20

            await async_wait_for(lambda: asyncio.sleep(0, refused_all()), 10, "every snapshot")
        finally:
            proxy.stop()
    assert len(sidecar.streams) == 1, "refusals do not end the stream"
    lines = log_lines(proxy, "the sidecar refused")
    assert len(lines) == 1, lines
    assert "INVALID_SNAPSHOT" in lines[0]
    assert "scripted refusal" in lines[0]
    assert "client.connection.peername" in lines[0]


async def test_invalid_argument_is_logged_once_as_a_contract_error_and_retried_with_backoff(
    tmp_path: Path,
) -> None:
    def refuse_stream(stream: int, request: rs.ReportRequest) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT

    async with scripted_sidecar(tmp_path / "s.sock", refuse_stream) as sidecar:
        proxy = start_proxy(tmp_path / "proxy", tmp_path / "s.sock")
        try:
            await async_wait_for(lambda: asyncio.sleep(0, len(sidecar.streams) >= 3), 10, "retries")
            await asyncio.sleep(2)
        finally:
            proxy.stop()
    errors = log_lines(proxy, "contract mismatch")
    assert len(errors) == 1, errors
    assert "INVALID_ARGUMENT" in errors[0]
    assert "proxy_id: must not change" in errors[0]
    # Without backoff a refused stream would be reopened hundreds of times in
    # these seconds; with it (0.1 s doubling to 5 s), a handful.
    assert len(sidecar.streams) <= 10


async def test_a_connect_held_for_routing_takes_a_change_sent_on_the_next_stream(
    tmp_path: Path, origin_a: Origin, origin_b: Origin
) -> None:
    held: list[str] = []

    def drop_first_stream_once_a_connect_waits(stream: int, request: rs.ReportRequest) -> Any:
        for snap in request.batch.snapshots:
            if snap.hook == pb.HOOK_SERVER_CONNECT and not snap.HasField("route_outcome"):
                held.append(snap.server.connection.id)
        return grpc.StatusCode.UNAVAILABLE if stream == 1 and held else None

    def route(stream: int, request: rs.ReportRequest) -> list[rs.ReportResponse]:
        if request.HasField("resync_start"):
            return [rs.ReportResponse(routing_state=rs.RoutingState(active=True, router="r"))]
        if stream == 2 and request.HasField("resync_end"):
            # The pending change, sent again on the new stream.
            decision = rs.RouteDecision(
                server_id=held[0],
                actor="scripted",
                address=pb.Address(host="127.0.0.1", port=origin_b.port),
            )
            decision.update_mask.paths.append("address")
            return [rs.ReportResponse(route_decision=decision)]
        return []

    def outcomes() -> list[rs.RouteOutcome]:
        return [
            snap.route_outcome
            for request in sidecar.streams[1]
            for snap in request.batch.snapshots
            if snap.server.connection.id == held[0] and snap.HasField("route_outcome")
        ]

    async with scripted_sidecar(
        tmp_path / "s.sock", drop_first_stream_once_a_connect_waits, route
    ) as sidecar:
        proxy = start_proxy(
            tmp_path / "proxy", tmp_path / "s.sock", "--set", "connmeta_route_deadline=8000"
        )
        try:
            await async_wait_for(lambda: asyncio.sleep(0, sidecar.streams), 10, "a stream")
            await asyncio.sleep(0.2)  # the routing state reaches the proxy
            started = time.monotonic()
            body = await asyncio.to_thread(get, proxy.proxy, origin_a.url + "/held")
            took = time.monotonic() - started
            # The outcome may wait out one batch interval behind the replay.
            await async_wait_for(lambda: asyncio.sleep(0, outcomes()), 5, "the route outcome")
        finally:
            proxy.stop()
    assert body == "B:/held"
    assert took < 4, "applied when the decision arrived, not at the deadline"
    assert len(sidecar.streams) == 2
    assert [o.kind for o in outcomes()] == [rs.ROUTE_OUTCOME_KIND_APPLIED]
    assert list(outcomes()[0].applied_fields) == ["address"]
