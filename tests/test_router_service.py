"""RouterService and the routing half of the Report stream, against the real
gRPC server: subscriptions, routing state, a query answered end to end, rich
errors, and which pending changes a new proxy stream is handed."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import grpc
import pytest
from google.protobuf import field_mask_pb2

from connmeta.router_service import RouterServicer
from connmeta.routing import RouterHub
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import connection_service_pb2_grpc as cs_grpc
from connmeta.v1 import report_service_pb2 as rs
from connmeta.v1 import report_service_pb2_grpc as rs_grpc
from connmeta.v1 import router_service_pb2 as rt
from connmeta.v1 import router_service_pb2_grpc as rt_grpc
from tests import factories
from tests.factories import CLOSED
from tests.sidecar import StartSidecar, channel, details, start_sidecar, transport

__all__ = ["channel", "start_sidecar", "transport"]  # fixtures used below

WAIT = 5.0
"""Bound on every read: a missing message fails the test instead of hanging it."""


class Proxy:
    """The proxy's side of one Report stream, keeping every message."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = rs_grpc.ReportServiceStub(channel).Report()
        self._sequence = 0

    async def read(self) -> rs.ReportResponse:
        response = await asyncio.wait_for(self.call.read(), WAIT)
        assert isinstance(response, rs.ReportResponse), response
        return response

    async def send(self, request: rs.ReportRequest) -> list[rs.ReportResponse]:
        """Send one request; every message up to and including its ack."""
        self._sequence += 1
        request.sequence = self._sequence
        await self.call.write(request)
        received = []
        while True:
            response = await self.read()
            received.append(response)
            if response.WhichOneof("message") == "ack":
                assert response.ack.sequence == self._sequence
                return received

    async def report(self, *snapshots: rs.ConnectionSnapshot) -> list[rs.ReportResponse]:
        return await self.send(rs.ReportRequest(batch=rs.ReportBatch(snapshots=snapshots)))

    async def resync(self, *snapshots: rs.ConnectionSnapshot) -> list[rs.ReportResponse]:
        """A whole resync, with a route deadline far above any test's run time."""
        start = rs.ReportRequest()
        start.resync_start.route_deadline.FromSeconds(int(WAIT))
        received = await self.send(start)
        if snapshots:
            received += await self.report(*snapshots)
        return received + await self.send(rs.ReportRequest(resync_end=rs.ResyncEnd()))

    async def close(self) -> list[rs.ReportResponse]:
        """End the stream; whatever the sidecar still sent."""
        await self.call.done_writing()
        rest = []
        while (response := await asyncio.wait_for(self.call.read(), WAIT)) is not grpc.aio.EOF:
            assert isinstance(response, rs.ReportResponse)
            rest.append(response)
        return rest


class Router:
    """A router's side of one Route stream."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = rt_grpc.RouterServiceStub(channel).Route()

    async def read(self) -> rt.RouteResponse:
        response = await asyncio.wait_for(self.call.read(), WAIT)
        assert isinstance(response, rt.RouteResponse), response
        return response

    async def subscribe(self, name: str) -> rt.RouteSubscribed:
        await self.call.write(rt.RouteRequest(subscribe=rt.RouteSubscribe(name=name)))
        response = await self.read()
        assert response.WhichOneof("message") == "subscribed", response
        return response.subscribed

    async def leave(self) -> None:
        await self.call.done_writing()
        assert await asyncio.wait_for(self.call.read(), WAIT) is grpc.aio.EOF
        assert await self.call.code() == grpc.StatusCode.OK


def of_kind(responses: list[rs.ReportResponse], kind: str) -> list[rs.ReportResponse]:
    return [r for r in responses if r.WhichOneof("message") == kind]


def resynced(snapshot: rs.ConnectionSnapshot) -> rs.ConnectionSnapshot:
    """``snapshot`` as the proxy reports it again in a resync."""
    again = rs.ConnectionSnapshot()
    again.CopyFrom(snapshot)
    again.hook = pb.HOOK_RESYNC
    return again


def waiting_server(**kwargs: object) -> rs.ConnectionSnapshot:
    """A server in server_connect: CLOSED, about to connect."""
    return factories.server(state=CLOSED, hook=pb.HOOK_SERVER_CONNECT, **kwargs)  # type: ignore[arg-type]


async def update_address(channel: grpc.aio.Channel, server_id: str, port: int) -> None:
    await cs_grpc.ConnectionServiceStub(channel).UpdateServerConnection(
        cs.UpdateServerConnectionRequest(
            id=server_id,
            address=pb.Address(host="origin-b.example", port=port),
            update_mask=field_mask_pb2.FieldMask(paths=["address"]),
            actor="operator",
        )
    )


# -- subscriptions and routing state -----------------------------------------


async def test_first_router_is_active_and_a_standby_is_told_when_it_takes_over(
    channel: grpc.aio.Channel,
) -> None:
    first, second = Router(channel), Router(channel)
    assert await first.subscribe("r1") == rt.RouteSubscribed(active=True, active_router="r1")
    assert await second.subscribe("r2") == rt.RouteSubscribed(active=False, active_router="r1")
    await first.leave()
    taken_over = await second.read()
    assert taken_over.subscribed == rt.RouteSubscribed(active=True, active_router="r2")
    await second.leave()


async def test_report_stream_starts_with_routing_state_and_follows_routers(
    channel: grpc.aio.Channel,
) -> None:
    proxy = Proxy(channel)
    await proxy.call.wait_for_connection()
    first = await proxy.read()
    assert first.routing_state == rs.RoutingState(active=False, router="")
    router = Router(channel)
    await router.subscribe("r1")
    assert (await proxy.read()).routing_state == rs.RoutingState(active=True, router="r1")
    await router.leave()
    assert (await proxy.read()).routing_state == rs.RoutingState(active=False, router="")
    assert await proxy.close() == []


async def test_report_stream_opened_while_a_router_is_subscribed_starts_active(
    channel: grpc.aio.Channel,
) -> None:
    router = Router(channel)
    await router.subscribe("r1")
    proxy = Proxy(channel)
    assert (await proxy.read()).routing_state == rs.RoutingState(active=True, router="r1")
    await proxy.close()
    await router.leave()


async def test_second_router_with_the_same_name_is_already_exists_with_error_info(
    channel: grpc.aio.Channel,
) -> None:
    first, second = Router(channel), Router(channel)
    await first.subscribe("r1")
    await second.call.write(rt.RouteRequest(subscribe=rt.RouteSubscribe(name="r1")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await second.read()
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info = details(caught.value)["ErrorInfo"]
    assert info.reason == "ROUTER_ALREADY_SUBSCRIBED"
    assert info.metadata["name"] == "r1"
    await first.leave()


async def test_first_message_that_is_not_subscribe_is_invalid_argument_with_bad_request(
    channel: grpc.aio.Channel,
) -> None:
    router = Router(channel)
    await router.call.write(rt.RouteRequest(answer=rt.RouteAnswer(query_id="q1")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = details(caught.value)
    (violation,) = found["BadRequest"].field_violations
    assert violation.field == "message"
    assert "subscribe" in violation.description


async def test_malformed_answer_ends_the_router_stream_with_invalid_argument(
    channel: grpc.aio.Channel,
) -> None:
    router = Router(channel)
    await router.subscribe("r1")
    answer = rt.RouteAnswer(query_id="q1", address=pb.Address(host="b.example", port=0))
    answer.update_mask.paths.append("address")
    await router.call.write(rt.RouteRequest(answer=answer))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in details(caught.value)["BadRequest"].field_violations]
    assert "answer.address.port" in fields


# -- a query, end to end -------------------------------------------------------


async def test_server_connect_is_asked_and_the_answer_becomes_a_recorded_decision(
    channel: grpc.aio.Channel, transport: str
) -> None:
    router = Router(channel)
    await router.subscribe("r1")
    proxy = Proxy(channel)
    await proxy.resync()
    client = factories.client()
    snapshot = waiting_server(client_id=client.client.connection.id, port=443)
    server_id = snapshot.server.connection.id
    await proxy.report(client, snapshot)

    query = (await router.read()).query
    assert query.server.server.connection.id == server_id
    assert query.server.server.connection.state == CLOSED
    assert query.client.client.connection.id == client.client.connection.id
    assert query.deadline.seconds > 0
    answer = rt.RouteAnswer(
        query_id=query.query_id, address=pb.Address(host="origin-b.example", port=8443)
    )
    answer.update_mask.paths.append("address")
    await router.call.write(rt.RouteRequest(answer=answer))

    response = await proxy.read()
    assert response.WhichOneof("message") == "route_decision"
    decision = response.route_decision
    assert decision.server_id == server_id
    assert decision.query_id == query.query_id
    assert decision.actor == "r1"
    assert not decision.timed_out
    assert list(decision.update_mask.paths) == ["address"]
    assert decision.address == pb.Address(host="origin-b.example", port=8443)

    stub = cs_grpc.ConnectionServiceStub(channel)
    got = await stub.GetConnection(cs.GetConnectionRequest(id=server_id))
    pending = got.connection.metadata.pending_change
    assert got.connection.server.address.port == 443, "the proxy has not applied it yet"
    assert (pending.actor, pending.query_id, list(pending.fields)) == (
        "r1",
        query.query_id,
        ["address"],
    )
    # Who the transport authenticated on the router's stream, not its name.
    assert pending.principal == {"unix": "unix", "tcp": "spiffe://connmeta.local/writer"}[transport]

    # The proxy applies it in server_connect and says so, as the addon does.
    applied = waiting_server(client_id=client.client.connection.id, port=8443)
    applied.server.connection.id = server_id
    applied.server.address.host = "origin-b.example"
    applied.route_outcome.kind = rs.ROUTE_OUTCOME_KIND_APPLIED
    applied.route_outcome.query_id = query.query_id
    applied.route_outcome.actor = "r1"
    applied.route_outcome.applied_fields.append("address")
    await proxy.report(applied)
    got = await stub.GetConnection(cs.GetConnectionRequest(id=server_id))
    assert got.connection.server.address.port == 8443
    assert not got.connection.metadata.HasField("pending_change")
    change = got.connection.metadata.last_change
    assert (change.actor, list(change.fields), change.status) == (
        "r1",
        ["address"],
        pb.CHANGE_STATUS_APPLIED,
    )
    await proxy.close()
    await router.leave()


# -- pending changes across proxy reconnects -----------------------------------


async def test_pending_change_of_a_server_the_proxy_still_holds_is_replayed(
    channel: grpc.aio.Channel,
) -> None:
    first = Proxy(channel)
    snapshot = waiting_server()
    server_id = snapshot.server.connection.id
    await first.report(snapshot)
    await update_address(channel, server_id, 8443)
    await first.close()

    # The proxy reconnects and its resync still reports the waiting server.
    second = Proxy(channel)
    replayed = of_kind(await second.resync(resynced(snapshot)), "route_decision")
    assert [r.route_decision.server_id for r in replayed] == [server_id]
    await second.close()

    third = Proxy(channel)
    replayed = of_kind(await third.report(), "route_decision")
    assert [r.route_decision.server_id for r in replayed] == [server_id]
    assert replayed[0].route_decision.actor == "operator"
    assert replayed[0].route_decision.query_id == ""
    await third.close()


@pytest.mark.parametrize(
    ("state", "hook"),
    [
        # Waiting in server_connect: the resync leaves a CLOSED record alone.
        (CLOSED, pb.HOOK_SERVER_CONNECT),
        # Disconnected: mitmproxy never connects a Server object again.
        (CLOSED, pb.HOOK_SERVER_DISCONNECTED),
        # Half-closed: the resync closes it (CLOSED, last_hook RESYNC).
        (pb.CONNECTION_STATE_CAN_READ, pb.HOOK_SERVER_CONNECTED),
    ],
    ids=["waiting", "disconnected", "half-closed"],
)
async def test_pending_change_of_a_server_the_resync_did_not_report_is_not_applied(
    channel: grpc.aio.Channel, state: int, hook: int
) -> None:
    first = Proxy(channel)
    gone = factories.server(state=state, hook=hook)
    kept = waiting_server()
    await first.report(gone, kept)
    await update_address(channel, gone.server.connection.id, 8443)
    await update_address(channel, kept.server.connection.id, 8444)
    await first.close()

    # The proxy reconnects without ``gone``: that server will never connect.
    second = Proxy(channel)
    await second.resync(resynced(kept))
    await second.close()

    third = Proxy(channel)
    replayed = of_kind(await third.report(), "route_decision")
    assert [r.route_decision.server_id for r in replayed] == [kept.server.connection.id]
    await third.close()
    got = await cs_grpc.ConnectionServiceStub(channel).GetConnection(
        cs.GetConnectionRequest(id=gone.server.connection.id)
    )
    assert got.connection.metadata.last_change.status == pb.CHANGE_STATUS_NOT_APPLIED


async def test_pending_change_of_a_server_deleted_by_retention_is_dropped_at_resync(
    start_sidecar: StartSidecar,
) -> None:
    sidecar, channel = await start_sidecar(closed_retention_count=0)
    first = Proxy(channel)
    snapshot = factories.server(state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED)
    await first.report(snapshot)
    await update_address(channel, snapshot.server.connection.id, 8443)
    await first.close()
    sidecar.store.expire()
    assert sidecar.store.get(snapshot.server.connection.id) is None

    second = Proxy(channel)
    await second.resync()
    await second.close()

    third = Proxy(channel)
    assert of_kind(await third.report(), "route_decision") == []
    await third.close()


# -- stream ends ---------------------------------------------------------------


@pytest.mark.parametrize("standby", [False, True], ids=["active", "standby"])
async def test_router_that_cancels_its_stream_leaves_no_task_behind(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture, standby: bool
) -> None:
    proxy = Proxy(channel)
    assert not (await proxy.read()).routing_state.active
    routers = [Router(channel) for _ in range(2 if standby else 1)]
    for i, router in enumerate(routers):
        await router.subscribe(f"r{i}")
    assert (await proxy.read()).routing_state.router == "r0"
    for router in reversed(routers):
        router.call.cancel()
    assert not (await proxy.read()).routing_state.active
    await proxy.close()
    # A task left pending is only reported when it is collected.
    await asyncio.sleep(0.1)
    gc.collect()
    await asyncio.sleep(0)
    assert "Task was destroyed but it is pending" not in caplog.text


async def test_a_connect_its_batch_already_reports_done_is_not_asked(
    channel: grpc.aio.Channel,
) -> None:
    # A replay after an outage carries server_connect and server_connected of
    # the same server in one batch: nobody waits for a decision any more.
    router = Router(channel)
    await router.subscribe("r1")
    proxy = Proxy(channel)
    await proxy.resync()
    done = waiting_server()
    connected = rs.ConnectionSnapshot()
    connected.CopyFrom(done)
    connected.hook = pb.HOOK_SERVER_CONNECTED
    connected.server.connection.state = pb.CONNECTION_STATE_OPEN
    waiting = waiting_server()
    await proxy.report(done, connected, waiting)
    query = (await router.read()).query
    assert query.server.server.connection.id == waiting.server.connection.id
    await proxy.close()
    await router.leave()


async def test_a_connect_the_proxy_did_not_hold_is_never_asked(channel: grpc.aio.Channel) -> None:
    # The proxy let this connect through before it learned of the router (its
    # report was on its way while the router subscribed): asking now would
    # be a stale query, and its answer would go nowhere.
    router = Router(channel)
    await router.subscribe("r1")
    proxy = Proxy(channel)
    await proxy.resync()
    let_through = waiting_server()
    let_through.route_hold = rs.ROUTE_HOLD_NOT_HELD
    held = waiting_server()
    held.route_hold = rs.ROUTE_HOLD_HELD
    responses = await proxy.report(let_through, held)
    query = (await router.read()).query
    assert query.server.server.connection.id == held.server.connection.id
    await router.call.write(rt.RouteRequest(answer=rt.RouteAnswer(query_id=query.query_id)))
    while not of_kind(responses, "route_decision"):
        responses.append(await proxy.read())
    (decision,) = of_kind(responses, "route_decision")
    assert decision.route_decision.server_id == held.server.connection.id
    await proxy.close()
    await router.leave()


async def test_a_connect_not_held_gets_no_pending_change_sent_as_its_decision(
    channel: grpc.aio.Channel,
) -> None:
    proxy = Proxy(channel)
    await proxy.resync()
    first = waiting_server()
    first.hook = pb.HOOK_SERVER_DISCONNECTED
    await proxy.report(first)
    await update_address(channel, first.server.connection.id, 8443)
    assert of_kind(await proxy.report(), "route_decision")  # the change, unasked
    again = waiting_server()
    again.server.connection.id = first.server.connection.id
    again.route_hold = rs.ROUTE_HOLD_NOT_HELD
    # Nobody waits: no decision answers this connect (an ack only).
    assert of_kind(await proxy.report(again), "route_decision") == []
    assert await proxy.close() == []


async def test_a_held_connect_its_batch_reports_an_outcome_for_is_not_asked(
    channel: grpc.aio.Channel,
) -> None:
    # A replay after an outage: the connect was held, then went ahead (here
    # on its deadline) before the sidecar saw either report.
    router = Router(channel)
    await router.subscribe("r1")
    proxy = Proxy(channel)
    await proxy.resync()
    held = waiting_server()
    held.route_hold = rs.ROUTE_HOLD_HELD
    gone_ahead = rs.ConnectionSnapshot()
    gone_ahead.CopyFrom(held)
    gone_ahead.ClearField("route_hold")
    gone_ahead.route_outcome.kind = rs.ROUTE_OUTCOME_KIND_TIMED_OUT
    waiting = waiting_server()
    await proxy.report(held, gone_ahead, waiting)
    query = (await router.read()).query
    assert query.server.server.connection.id == waiting.server.connection.id
    await proxy.close()
    await router.leave()


async def test_a_standby_that_takes_over_while_its_first_answer_is_written_is_still_told() -> None:
    """grpcio resumes a response generator only once its last response is
    written: a takeover in between must still be announced (under load the
    standby was left waiting, never told it was active)."""
    hub = RouterHub()
    first = hub.subscribe("r1")
    hold: asyncio.Event = asyncio.Event()

    async def requests() -> AsyncIterator[rt.RouteRequest]:
        yield rt.RouteRequest(subscribe=rt.RouteSubscribe(name="r2"))
        await hold.wait()  # the standby sends nothing more

    responses = cast(
        AsyncGenerator[rt.RouteResponse], RouterServicer(hub).Route(requests(), cast(Any, None))
    )
    standby = await anext(responses)
    assert standby.subscribed == rt.RouteSubscribed(active=False, active_router="r1")
    hub.unsubscribe(first)  # the takeover, before the generator resumes
    taken_over = await asyncio.wait_for(anext(responses), WAIT)
    assert taken_over.subscribed == rt.RouteSubscribed(active=True, active_router="r2")
    await responses.aclose()
