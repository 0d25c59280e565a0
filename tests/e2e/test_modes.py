"""Every mode mitmproxy runs here without privileges: each server connection
it opens is reported, and once the clients are gone every connection the
proxy reported is CLOSED in the sidecar after a terminal hook.

Transparent, WireGuard, local and tun modes are not covered: they need
root, a kernel redirector, a TUN device or a WireGuard peer.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from connmeta.mitm.addon import derive_proxy_id
from connmeta.v1 import connection_pb2 as pb
from tests.e2e.conftest import proxy_args
from tests.e2e.harness import (
    SHORT_UDP_TIMEOUT,
    Mitmdump,
    Origin,
    OriginCA,
    RouterClient,
    SidecarProcess,
    async_wait_for,
    dns_answer,
    dns_query,
    get,
    raw_get,
    socks5_get,
    udp_exchange,
    udp_origin,
)
from tests.e2e.sidecar_view import conn_of, records

pytestmark = pytest.mark.e2e

CLOSED = pb.CONNECTION_STATE_CLOSED
TERMINAL = {pb.HOOK_CLIENT_DISCONNECTED, pb.HOOK_SERVER_DISCONNECTED, pb.HOOK_SERVER_CONNECT_ERROR}
FLOW_HOOKS = {"responseheaders", "error", "tcp_start", "udp_start", "dns_response"}


@pytest.fixture
def start_proxy(tmp_path: Path, sidecar: SidecarProcess, ca: OriginCA) -> Iterator[Any]:
    started: list[Mitmdump] = []

    def start(
        *extra: str, name: str = "proxy", connmeta: bool = True, route_deadline_ms: int = 400
    ) -> Mitmdump:
        args = (
            proxy_args(sidecar, ca, *extra, route_deadline_ms=route_deadline_ms)
            if connmeta
            else list(extra)
        )
        dump = Mitmdump(tmp_path / name, args, with_connmeta=connmeta)
        dump.start()
        started.append(dump)
        return dump

    yield start
    for dump in reversed(started):
        dump.stop()


def opened_by(proxy: Mitmdump) -> tuple[set[str], set[str], set[str]]:
    """Clients, direct servers and logical servers (reached through a via,
    seen only in TLS and flow hooks) that mitmproxy opened."""
    entries = proxy.hooks()
    clients = {e["id"] for e in entries if e["hook"] == "client_connected"}
    direct = {e["id"] for e in entries if e["hook"] == "server_connect"}
    logical = {
        e["id"]
        for e in entries
        if e["hook"] == "tls_established_server" and e["get_state"]["via"] is not None
    } | {
        e["server_id"]
        for e in entries
        if e["hook"] in FLOW_HOOKS
        and e["server"]["via"] is not None
        and e["server"]["timestamp_start"] is not None
    }
    return clients, direct, logical


async def all_closed(proxy: Mitmdump, channel: grpc.aio.Channel) -> dict[str, pb.ConnectionRecord]:
    """Wait until mitmproxy closed every client, then until the sidecar holds
    every connection the proxy opened, each CLOSED after a terminal hook, and
    no other record of this proxy's clients is left open. Returns them."""

    def clients_gone() -> bool:
        entries = proxy.hooks()
        connected = {e["id"] for e in entries if e["hook"] == "client_connected"}
        gone = {e["id"] for e in entries if e["hook"] == "client_disconnected"}
        return bool(connected) and connected <= gone

    await async_wait_for(lambda: asyncio.sleep(0, clients_gone()), 15, "every client to close")
    clients, direct, logical = opened_by(proxy)
    expected = clients | direct | logical

    async def ours() -> dict[str, pb.ConnectionRecord]:
        held = await records(channel)
        return {i: r for i, r in held.items() if i in expected or r.metadata.client_id in clients}

    def unfinished(held: dict[str, pb.ConnectionRecord]) -> dict[str, str]:
        problems = {i: "not reported" for i in expected - held.keys()}
        for i, record in held.items():
            if conn_of(record).state != CLOSED or record.metadata.last_hook not in TERMINAL:
                problems[i] = (
                    f"{pb.ConnectionState.Name(conn_of(record).state)} after "
                    f"{pb.Hook.Name(record.metadata.last_hook)}"
                )
        return problems

    async def done() -> dict[str, pb.ConnectionRecord] | None:
        held = await ours()
        return None if unfinished(held) else held

    try:
        return await async_wait_for(done, 10, "every connection CLOSED in the sidecar")  # type: ignore[no-any-return]
    except TimeoutError:
        problems = unfinished(await ours())
        kinds = {**{i: "client" for i in clients}, **{i: "direct server" for i in direct}}
        kinds.update({i: "logical server" for i in logical})
        detail = {f"{kinds.get(i, 'server')} {i}": p for i, p in problems.items()}
        raise AssertionError(f"connections not finished in the sidecar: {detail}") from None


def servers(held: dict[str, pb.ConnectionRecord]) -> list[pb.Server]:
    return [r.server for r in held.values() if r.HasField("server")]


def endpoint(address: pb.Address) -> tuple[str, int]:
    return (address.host, address.port)


async def test_regular_mode_http_and_https_leave_nothing_open(
    start_proxy: Any, origin_a: Origin, origin_tls: Origin, channel: grpc.aio.Channel
) -> None:
    proxy = start_proxy()
    assert await asyncio.to_thread(get, proxy.proxy, origin_a.url + "/r") == "A:/r"
    assert await asyncio.to_thread(get, proxy.proxy, origin_tls.url + "/r", proxy.ca) == "S:/r"
    held = await all_closed(proxy, channel)
    assert sorted(endpoint(s.address) for s in servers(held)) == sorted(
        [("127.0.0.1", origin_a.port), ("localhost", origin_tls.port)]
    )


async def test_upstream_mode_reports_the_end_to_end_server_with_its_via_and_closes_it(
    start_proxy: Any, origin_a: Origin, origin_tls: Origin, channel: grpc.aio.Channel
) -> None:
    # The upstream passes TLS through, so the front proxy verifies the
    # origin's own certificate.
    upstream = start_proxy("--ignore-hosts", ".*", name="upstream", connmeta=False)
    proxy = start_proxy("--mode", f"upstream:http://127.0.0.1:{upstream.port}")
    assert await asyncio.to_thread(get, proxy.proxy, origin_a.url + "/u") == "A:/u"
    assert await asyncio.to_thread(get, proxy.proxy, origin_tls.url + "/u", proxy.ca) == "S:/u"
    assert len([e for e in upstream.hooks() if e["hook"] == "client_connected"]) == 2
    held = await all_closed(proxy, channel)

    upstream_address = ("127.0.0.1", upstream.port)
    by_address: dict[tuple[str, int], list[pb.Server]] = {}
    for server in servers(held):
        by_address.setdefault(endpoint(server.address), []).append(server)
    # Two tunnels to the upstream proxy (mitmproxy's server_* hooks) ...
    assert [s.HasField("via") for s in by_address.pop(upstream_address)] == [False, False]
    # ... and the two servers the requests were for, reached through it.
    assert sorted(by_address) == sorted(
        [("127.0.0.1", origin_a.port), ("localhost", origin_tls.port)]
    )
    for (_, _), (server,) in by_address.items():
        assert server.via.scheme == pb.SCHEME_HTTP
        assert endpoint(server.via.address) == upstream_address
    https = by_address[("localhost", origin_tls.port)][0]
    assert https.connection.tls_version == pb.TLS_VERSION_TLS_V1_3
    for server in (https, by_address[("127.0.0.1", origin_a.port)][0]):
        # mitmproxy stamps the end when the tunnel closes.
        assert server.connection.HasField("timestamp_end")


async def test_reverse_http_mode_leaves_nothing_open(
    start_proxy: Any, origin_a: Origin, channel: grpc.aio.Channel
) -> None:
    proxy = start_proxy("--mode", f"reverse:http://127.0.0.1:{origin_a.port}")
    assert await asyncio.to_thread(raw_get, proxy.port, "/rh") == "A:/rh"
    assert await asyncio.to_thread(raw_get, proxy.port, "/rh2") == "A:/rh2"
    held = await all_closed(proxy, channel)
    assert {endpoint(s.address) for s in servers(held)} == {("127.0.0.1", origin_a.port)}
    assert len(servers(held)) == 2


async def test_reverse_tcp_mode_leaves_nothing_open(
    start_proxy: Any, origin_a: Origin, channel: grpc.aio.Channel
) -> None:
    proxy = start_proxy("--mode", f"reverse:tcp://127.0.0.1:{origin_a.port}")
    assert await asyncio.to_thread(raw_get, proxy.port, "/rt") == "A:/rt"
    held = await all_closed(proxy, channel)
    assert [endpoint(s.address) for s in servers(held)] == [("127.0.0.1", origin_a.port)]


async def test_socks5_mode_leaves_nothing_open(
    start_proxy: Any, origin_a: Origin, channel: grpc.aio.Channel
) -> None:
    proxy = start_proxy("--mode", "socks5")
    assert await asyncio.to_thread(socks5_get, proxy.port, origin_a.port, "/s5") == "A:/s5"
    held = await all_closed(proxy, channel)
    assert [endpoint(s.address) for s in servers(held)] == [("127.0.0.1", origin_a.port)]


async def test_reverse_udp_mode_closes_client_and_server_after_the_idle_timeout(
    start_proxy: Any, channel: grpc.aio.Channel
) -> None:
    with udp_origin(lambda data: b"echo:" + data) as port:
        proxy = start_proxy(
            "-s", str(SHORT_UDP_TIMEOUT), "--mode", f"reverse:udp://127.0.0.1:{port}"
        )
        assert await asyncio.to_thread(udp_exchange, proxy.port, b"ping") == b"echo:ping"
        held = await all_closed(proxy, channel)
    (server,) = servers(held)
    assert endpoint(server.address) == ("127.0.0.1", port)
    assert server.connection.transport_protocol == pb.TRANSPORT_PROTOCOL_UDP


async def test_reverse_dns_mode_closes_client_and_server_after_the_idle_timeout(
    start_proxy: Any, channel: grpc.aio.Channel
) -> None:
    with udp_origin(dns_answer) as port:
        proxy = start_proxy(
            "-s", str(SHORT_UDP_TIMEOUT), "--mode", f"reverse:dns://127.0.0.1:{port}"
        )
        answer = await asyncio.to_thread(udp_exchange, proxy.port, dns_query("example.test"))
        assert answer[:2] == b"\x12\x34", "the answer to our query"
        assert answer[7] == 1, "with one record"
        held = await all_closed(proxy, channel)
    (server,) = servers(held)
    assert endpoint(server.address) == ("127.0.0.1", port)


async def test_dns_mode_resolving_itself_closes_its_client(
    start_proxy: Any, channel: grpc.aio.Channel
) -> None:
    # Regular DNS mode answers from the resolver inside mitmproxy: a client,
    # no server connection.
    proxy = start_proxy("-s", str(SHORT_UDP_TIMEOUT), "--mode", "dns")
    answer = await asyncio.to_thread(udp_exchange, proxy.port, dns_query("localhost"))
    assert answer[:2] == b"\x12\x34"
    held = await all_closed(proxy, channel)
    assert servers(held) == []
    assert len(held) == 1


async def test_records_name_the_proxy_that_reported_them(
    start_proxy: Any, origin_a: Origin, channel: grpc.aio.Channel
) -> None:
    # Needs the sidecar to keep ReportRequest.proxy_id as metadata.proxy_id.
    derived = start_proxy(name="derived")
    named = start_proxy("--set", "connmeta_proxy_id=e2e-named-proxy", name="named")
    for proxy in (derived, named):
        assert await asyncio.to_thread(get, proxy.proxy, origin_a.url + "/n") == "A:/n"
    for proxy, proxy_id in (
        (derived, derive_proxy_id(socket.gethostname(), derived.port, 0)),
        (named, "e2e-named-proxy"),
    ):
        held = await all_closed(proxy, channel)
        assert len(held) == 2
        assert {r.metadata.proxy_id for r in held.values()} == {proxy_id}


async def test_a_connect_its_client_abandoned_while_held_for_routing_is_closed(
    start_proxy: Any, origin_a: Origin, channel: grpc.aio.Channel
) -> None:
    # mitmproxy cancels a connect still in server_connect when its client
    # leaves, and no server hook follows: the addon closes the record itself.
    proxy = start_proxy(route_deadline_ms=5000)
    async with RouterClient(channel, "e2e-never", lambda query: None) as router:
        await asyncio.sleep(0.3)  # RoutingState reaches the proxy
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            target = f"127.0.0.1:{origin_a.port}"
            sock.sendall(f"GET http://{target}/gone HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            await async_wait_for(lambda: asyncio.sleep(0, router.queries), 5, "the held connect")
        held = await all_closed(proxy, channel)
    server_id = router.queries[0].server.server.connection.id
    assert held[server_id].metadata.last_hook == pb.HOOK_SERVER_DISCONNECTED
    assert not [e for e in proxy.hooks() if e.get("id") == server_id], "no hook after ours"
