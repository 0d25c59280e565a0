"""(b) Routing before connect: a router retargets, a silent router costs the
deadline and no more, and an update made while the server waits is applied."""

from __future__ import annotations

import asyncio
import statistics
import time

import grpc
import pytest

from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import router_service_pb2 as rt
from tests.e2e.conftest import ROUTE_DEADLINE_MS
from tests.e2e.harness import (
    Decide,
    Mitmdump,
    Origin,
    RouterClient,
    async_wait_for,
    get,
    routing_reached,
    stub,
)
from tests.e2e.sidecar_view import records, watching

pytestmark = pytest.mark.e2e


def retarget(origin: Origin, to: Origin) -> Decide:
    def decide(query: rt.RouteQuery) -> rt.RouteAnswer:
        if query.server.server.address.port != origin.port:
            return rt.RouteAnswer()  # no change, go ahead now
        answer = rt.RouteAnswer(address=pb.Address(host="127.0.0.1", port=to.port))
        answer.update_mask.paths.append("address")
        return answer

    return decide


async def timed_get(proxy: Mitmdump, url: str) -> tuple[str, float]:
    started = time.perf_counter()
    body = await asyncio.to_thread(get, proxy.proxy, url)
    return body, time.perf_counter() - started


async def test_router_retargets_a_request_from_origin_a_to_origin_b(
    proxy: Mitmdump, origin_a: Origin, origin_b: Origin, channel: grpc.aio.Channel
) -> None:
    async with (
        RouterClient(channel, "e2e-retarget", retarget(origin_a, origin_b)) as router,
        watching(channel) as watch,
    ):
        await routing_reached(proxy)
        assert await asyncio.to_thread(get, proxy.proxy, origin_a.url + "/r") == "B:/r"
        query = router.queries[-1]
        server_id = query.server.server.connection.id

        async def routed_events() -> list[pb.ConnectionRecord]:
            return [
                r for r in watch.of(server_id) if r.metadata.last_change.actor == "e2e-retarget"
            ]

        # The decision shows in the watch stream, with the router as actor.
        routed = await async_wait_for(routed_events, 5, "the routed change in the watch")

    assert query.server.server.connection.state == pb.CONNECTION_STATE_CLOSED
    assert query.client.client.connection.peername.host == "127.0.0.1"
    assert list(routed[0].metadata.last_change.fields) == ["address"]
    assert routed[0].server.address.port == origin_b.port
    # mitmproxy connected to B, under the same server id.
    connected = [
        e for e in proxy.hooks() if e.get("id") == server_id and e["hook"] == "server_connected"
    ]
    assert connected[0]["get_state"]["address"] == ("127.0.0.1", origin_b.port)


async def test_router_that_never_answers_delays_the_connect_by_the_deadline_and_no_more(
    proxy: Mitmdump, origin_a: Origin, channel: grpc.aio.Channel
) -> None:
    baseline = statistics.median([(await timed_get(proxy, origin_a.url))[1] for _ in range(3)])
    async with RouterClient(channel, "e2e-silent", lambda query: None) as router:
        await routing_reached(proxy)
        results = [await timed_get(proxy, origin_a.url + "/s") for _ in range(3)]
    assert len(router.queries) >= 3
    deadline = ROUTE_DEADLINE_MS / 1000
    for body, took in results:
        assert body == "A:/s", "fail open: the original target"
        delay = took - baseline
        assert 0.5 * deadline < delay < deadline + 0.15, f"delay {delay:.3f} s"


async def test_update_while_the_server_waits_for_a_route_is_applied_before_connect(
    proxy: Mitmdump, origin_a: Origin, origin_b: Origin, channel: grpc.aio.Channel
) -> None:
    async with RouterClient(channel, "e2e-hold", lambda query: None), watching(channel) as watch:
        await routing_reached(proxy)
        pending = asyncio.create_task(timed_get(proxy, origin_a.url + "/u"))

        async def waiting_server() -> str | None:
            for record in watch.events:
                if (
                    record.HasField("server")
                    and record.metadata.last_hook == pb.HOOK_SERVER_CONNECT
                    and record.server.address.port == origin_a.port
                    and not record.metadata.HasField("last_change")
                ):
                    return record.server.connection.id
            return None

        server_id = await async_wait_for(waiting_server, 5, "a server waiting in server_connect")
        request = cs.UpdateServerConnectionRequest(
            id=server_id, address=pb.Address(host="127.0.0.1", port=origin_b.port), actor="e2e-op"
        )
        request.update_mask.paths.append("address")
        await stub(channel).UpdateServerConnection(request, timeout=5)
        body, took = await pending
    assert body == "B:/u"
    assert took < ROUTE_DEADLINE_MS / 1000, "applied at once, not after the deadline"

    async def settled() -> pb.ConnectionRecord | None:
        record = (await records(channel))[server_id]
        return record if record.metadata.HasField("last_change") else None

    # The proxy's report of the applied change settles it on the record.
    held = await async_wait_for(settled, 5, "the route outcome reported")
    assert not held.metadata.HasField("pending_change")
    assert held.metadata.last_change.actor == "e2e-op"
    assert held.metadata.last_change.status == pb.CHANGE_STATUS_APPLIED
    assert held.server.address.port == origin_b.port
