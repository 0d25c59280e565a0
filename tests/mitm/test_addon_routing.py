"""The addon's side of routing, without processes: whether server_connect
waits at all, what its snapshots tell the sidecar about the wait, and when a
held connect is let go (tests/e2e/test_routing.py runs the real thing)."""

from __future__ import annotations

import asyncio

import pytest
from mitmproxy.connection import Client, Server
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from connmeta.mitm.addon import ConnmetaAddon
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs
from tests.mitm.test_addon_buffer import running


def connect() -> ServerConnectionHookData:
    client = Client(
        peername=("127.0.0.1", 40000), sockname=("127.0.0.1", 8080), timestamp_start=1.7e9
    )
    return ServerConnectionHookData(server=Server(address=("origin.example", 443)), client=client)


def addon_with(*, connected: bool, routing: bool) -> ConnmetaAddon:
    addon = ConnmetaAddon()
    addon._connected = connected
    addon._routing_active = routing
    return addon


def reported(addon: ConnmetaAddon) -> list[rs.ConnectionSnapshot]:
    """What the hooks handed the reporter (the queue, or the outage buffer)."""
    return [
        rs.ConnectionSnapshot.FromString(data)
        for data in [*addon._queue, *(snap for snap, _ in addon._buffer)]
    ]


@pytest.mark.parametrize(
    ("connected", "routing"),
    [(True, False), (False, False), (False, True)],
    ids=["no-router", "no-sidecar", "stream-lost-while-routing"],
)
async def test_server_connect_without_a_router_returns_without_ever_suspending(
    connected: bool, routing: bool
) -> None:
    addon = addon_with(connected=connected, routing=routing)
    with running(addon):
        hook = addon.server_connect(connect())
        # One step runs the hook to its end: not a single await suspended it,
        # so it cost the connect no event-loop round (let alone the sidecar's).
        with pytest.raises(StopIteration):
            hook.send(None)
    (snap,) = reported(addon)
    assert snap.hook == pb.HOOK_SERVER_CONNECT
    assert snap.route_hold == rs.ROUTE_HOLD_NOT_HELD
    assert not snap.HasField("route_outcome")


async def test_server_connect_with_a_router_waits_and_says_so() -> None:
    addon = addon_with(connected=True, routing=True)
    data = connect()
    with running(addon):
        hook = addon.server_connect(data)
        hook.send(None)  # suspended: waiting for the decision
        (held,) = reported(addon)
        assert held.route_hold == rs.ROUTE_HOLD_HELD
        hook.close()


async def test_a_held_connect_goes_ahead_at_once_when_no_router_is_left() -> None:
    addon = addon_with(connected=True, routing=True)
    data = connect()
    with running(addon):
        hook = asyncio.create_task(addon.server_connect(data))
        await asyncio.sleep(0)
        assert data.server.id in addon._waiters
        addon._handle(rs.ReportResponse(routing_state=rs.RoutingState(active=False)), {})
        await asyncio.wait_for(hook, 0.05)  # far below the 200 ms route deadline
    _, outcome = reported(addon)
    assert outcome.route_outcome.kind == rs.ROUTE_OUTCOME_KIND_NO_CHANGE
    assert addon.stats["route_timeouts"] == 0


async def test_outcome_snapshot_is_the_held_one_plus_its_outcome_unless_the_address_changed() -> (
    None
):
    addon = addon_with(connected=True, routing=True)
    first, second = connect(), connect()
    with running(addon):
        for data, address in ((first, None), (second, pb.Address(host="b.example", port=8443))):
            hook = asyncio.create_task(addon.server_connect(data))
            await asyncio.sleep(0)
            decision = rs.RouteDecision(server_id=data.server.id, query_id="q", actor="r")
            if address is not None:
                decision.address.CopyFrom(address)
                decision.update_mask.paths.append("address")
            addon._on_decision(decision)
            await asyncio.wait_for(hook, 1)
    held, unchanged, held2, changed = reported(addon)
    expected = rs.ConnectionSnapshot()
    expected.CopyFrom(held)
    expected.ClearField("route_hold")
    expected.route_outcome.CopyFrom(unchanged.route_outcome)
    assert unchanged == expected
    assert unchanged.route_outcome.kind == rs.ROUTE_OUTCOME_KIND_NO_CHANGE
    assert changed.server.address == pb.Address(host="b.example", port=8443)
    assert changed.route_outcome.kind == rs.ROUTE_OUTCOME_KIND_APPLIED
    assert changed.route_hold == rs.ROUTE_HOLD_UNSPECIFIED
    assert held2.server.address.host == "origin.example"
