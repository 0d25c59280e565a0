"""(a) The sidecar holds what mitmproxy saw, field for field, hook after hook."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from connmeta.mitm import from_proto
from connmeta.v1 import connection_pb2 as pb
from tests.e2e.harness import Mitmdump, Origin, async_wait_for, get
from tests.e2e.sidecar_view import conn_of, records, watching

pytestmark = pytest.mark.e2e

CLOSED, OPEN = pb.CONNECTION_STATE_CLOSED, pb.CONNECTION_STATE_OPEN


def _final_views(entries: list[dict[str, Any]], ids: set[str]) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry.get("id") in ids:
            last[entry["id"]] = entry
    return last


def _collapse(states: list[int]) -> list[int]:
    out: list[int] = []
    for s in states:
        if not out or out[-1] != s:
            out.append(s)
    return out


async def test_sidecar_records_equal_mitmproxys_objects_after_http_and_https(
    proxy: Mitmdump, origin_a: Origin, origin_tls: Origin, channel: grpc.aio.Channel
) -> None:
    before = {e.get("id") for e in proxy.hooks()}
    async with watching(channel) as watch:
        assert await asyncio.to_thread(get, proxy.proxy, origin_a.url + "/plain") == "A:/plain"
        body = await asyncio.to_thread(get, proxy.proxy, origin_tls.url + "/tls", proxy.ca)
        assert body == "S:/tls"

        def ours() -> list[dict[str, Any]]:
            return [e for e in proxy.hooks() if "id" in e and e["id"] not in before]

        def disconnected() -> set[str]:
            return {e["id"] for e in ours() if e["hook"] == "client_disconnected"}

        await async_wait_for(lambda: asyncio.sleep(0, len(disconnected()) == 2), 10, "disconnects")
        ids = {e["id"] for e in ours()}
        views = _final_views(ours(), ids)

        async def caught_up() -> bool:
            held = await records(channel)
            return all(
                i in held and conn_of(held[i]).state == views[i]["state"]
                and held[i].metadata.last_hook != pb.HOOK_SERVER_CONNECT
                for i in ids
            )  # fmt: skip

        await async_wait_for(caught_up, 10, "the sidecar to hold every final state")
        held = await records(channel)

    for id, view in views.items():
        record = held[id]
        side = record.server if record.HasField("server") else record.client
        rebuilt = from_proto(side)
        assert rebuilt.get_state() == view["get_state"], f"{view['kind']} {id} differs"
        assert int(rebuilt.state.value) == view["state"]
        # The state sequence the watch showed is the one the hooks saw.
        seen = _collapse([e["state"] for e in ours() if e["id"] == id])
        assert watch.states(id) == seen, f"{view['kind']} {id}: {watch.states(id)} != {seen}"

    servers = [held[i] for i, v in views.items() if v["kind"] == "server"]
    assert len(servers) == 2
    for record in servers:
        assert watch.states(record.server.connection.id) == [CLOSED, OPEN, CLOSED]
    tls_server = next(r for r in servers if r.server.connection.tls)
    conn = tls_server.server.connection
    assert conn.sni == "localhost"
    assert conn.tls_version == pb.TLS_VERSION_TLS_V1_3
    assert conn.cipher
    assert conn.alpn == b""
    assert conn.peername.host == "127.0.0.1"
    assert conn.sockname.port > 0
    assert (tls_server.server.address.host, tls_server.server.address.port) == (
        "localhost",
        origin_tls.port,
    )
    # Certificate facts are derived by the sidecar (the addon sends DER only).
    leaf = conn.certificate_list[0]
    assert leaf.subject_common_name == "localhost"
    assert ("CN", "originca") in [(a.name, a.value) for a in leaf.issuer]
    assert "127.0.0.1" in leaf.ip_addresses
    assert (
        conn.timestamp_start.ToNanoseconds()
        <= tls_server.server.timestamp_tcp_setup.ToNanoseconds()
    )
    assert conn.timestamp_tls_setup.ToNanoseconds() <= conn.timestamp_end.ToNanoseconds()
