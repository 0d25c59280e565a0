"""Routing before connect, the transport half: RouterService, and what the
Report stream and UpdateServerConnection gain for it.

Protobuf in, a call on :class:`connmeta.routing.RouterHub` or the store,
protobuf or a rich error out. It wraps the servicers of ``connmeta.service``
rather than copying them, and registers its handlers ahead of theirs (gRPC
asks generic handlers in order), so :func:`add_servicers` is a drop-in for
``connmeta.service.add_servicers``:

- ReportService.Report: the inner servicer still applies every request; this
  wrapper watches the requests go by, and after the ack of a request holding
  server_connect snapshots asks the router (or sends the pending change) and
  writes RoutingState and RouteDecision messages into the same stream.
- ConnectionService.UpdateServerConnection: after a successful update of a
  server that is not OPEN, the change becomes a pending decision pushed to
  every proxy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from connmeta import service
from connmeta.errors import abort, invalid_argument, rich_status, status_for
from connmeta.routing import AlreadySubscribed, Decision, Router, RouterHub, answer_violations
from connmeta.store import Store, StoreError
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import report_service_pb2 as rs
from connmeta.v1 import router_service_pb2 as rt
from connmeta.watch import WatchHub

__all__ = [
    "ROUTER_SERVICE",
    "SERVICE_NAMES",
    "RouterServicer",
    "RoutingConnectionServicer",
    "RoutingReportServicer",
    "add_servicers",
]

log = logging.getLogger("connmeta.router_service")

ROUTER_SERVICE = rt.DESCRIPTOR.services_by_name["RouterService"].full_name
SERVICE_NAMES = (*service.SERVICE_NAMES, ROUTER_SERVICE)

Context = grpc.aio.ServicerContext[Any, Any]

# The sidecar answers "no change" this much before the proxy's own route
# deadline, so the answer arrives while the proxy still waits and the connect
# is held for (about) the router's time, never for the full deadline.
_DEADLINE_SHARE = 0.8
_OPEN = pb.CONNECTION_STATE_OPEN


def _decision_message(decision: Decision) -> rs.ReportResponse:
    msg = rs.RouteDecision(
        server_id=decision.server_id,
        query_id=decision.query_id,
        actor=decision.actor,
        timed_out=decision.timed_out,
    )
    msg.update_mask.paths.extend(sorted(decision.fields))
    if decision.address is not None and "address" in decision.fields:
        msg.address.CopyFrom(decision.address)
    if decision.via is not None and "via" in decision.fields:
        msg.via.CopyFrom(decision.via)
    return rs.ReportResponse(route_decision=msg)


def _state_message(active_router: str) -> rs.ReportResponse:
    return rs.ReportResponse(
        routing_state=rs.RoutingState(active=bool(active_router), router=active_router)
    )


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until they ended. A task that is only
    cancelled runs its cancellation later; if what it waits on (a router's
    queue, a proxy's feed) is dropped first, the task is garbage collected
    still pending ("Task was destroyed but it is pending!")."""
    for task in tasks:
        task.cancel()
    # return_exceptions: their outcome is of no interest any more, and an
    # exception left unretrieved would be logged as well.
    await asyncio.gather(*tasks, return_exceptions=True)


class RouterServicer:
    """connmeta.v1.RouterService over the hub."""

    def __init__(self, routers: RouterHub) -> None:
        self._routers = routers

    async def Route(
        self, requests: AsyncIterator[rt.RouteRequest], context: Context
    ) -> AsyncIterator[rt.RouteResponse]:
        first = await anext(requests, None)
        if first is None or first.WhichOneof("message") != "subscribe":
            await abort(
                context, invalid_argument([("message", "the first message must be subscribe")])
            )
        try:
            router = self._routers.subscribe(first.subscribe.name)
        except AlreadySubscribed as error:
            await abort(
                context,
                rich_status(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{error}: use another name, or wait until it unsubscribes",
                    "ROUTER_ALREADY_SUBSCRIBED",
                    {"name": error.name},
                ),
            )
        except ValueError as error:
            await abort(context, invalid_argument([("subscribe.name", str(error))]))
        problems: list[tuple[str, str]] = []
        reader = asyncio.create_task(self._read(router, requests, problems))
        try:
            active = self._routers.active
            yield rt.RouteResponse(
                subscribed=rt.RouteSubscribed(
                    active=active is router, active_router=active.name if active else ""
                )
            )
            if not router.activated.is_set():
                await self._until(router.activated.wait(), reader)
                yield rt.RouteResponse(
                    subscribed=rt.RouteSubscribed(active=True, active_router=router.name)
                )
            while True:
                query = await self._until(router.queries.get(), reader)
                if query is None:
                    break
                if time.monotonic() < query.deadline and not query.future.done():
                    assert isinstance(query.payload, rt.RouteQuery)
                    yield rt.RouteResponse(query=query.payload)
            if problems:
                await abort(context, invalid_argument(problems))
        finally:
            self._routers.unsubscribe(router)
            await _cancel(reader)

    @staticmethod
    async def _until(waiting: Any, reader: asyncio.Task[None]) -> Any:
        """Await ``waiting`` unless the router's side of the stream ends first."""
        task = asyncio.ensure_future(waiting)
        try:
            await asyncio.wait({task, reader}, return_when=asyncio.FIRST_COMPLETED)
            return task.result() if task.done() else None
        finally:
            # Also when the RPC itself is cancelled while waiting here.
            await _cancel(task)

    async def _read(
        self, router: Router, requests: AsyncIterator[rt.RouteRequest], problems: list[Any]
    ) -> None:
        async for request in requests:
            if request.WhichOneof("message") != "answer":
                problems.append(("message", "only answers may follow subscribe"))
                return
            answer = request.answer
            fields = frozenset(answer.update_mask.paths)
            address = answer.address if answer.HasField("address") else None
            via = answer.via if answer.HasField("via") else None
            violations = answer_violations(fields, address, via)
            if violations:
                problems.extend((f"answer.{f}", d) for f, d in violations)
                problems.append(("answer.query_id", answer.query_id))
                return
            self._routers.answer(
                router,
                Decision("", fields=fields, address=address, via=via, query_id=answer.query_id),
            )


class RoutingReportServicer:
    """ReportService.Report with routing: the inner servicer applies, this
    one adds RoutingState and RouteDecision messages to the stream."""

    def __init__(self, inner: service.ReportServicer, store: Store, routers: RouterHub) -> None:
        self._inner = inner
        self._store = store
        self._routers = routers

    async def Report(
        self,
        requests: AsyncIterator[rs.ReportRequest | service.DecodedReport],
        context: Context,
    ) -> AsyncIterator[rs.ReportResponse]:
        routers = self._routers
        out: asyncio.Queue[rs.ReportResponse | StoreError | None] = asyncio.Queue()
        connects: dict[int, list[tuple[str, str]]] = {}
        timeout = [routers.timeout]
        # Server ids reported since this stream's resync_start; None outside a resync.
        resync: list[set[str] | None] = [None]
        tasks: set[asyncio.Task[None]] = set()

        def spawn(coro: Any) -> None:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def pump() -> None:
            # Applies requests in its own task so that routing messages can be
            # written while the proxy sends nothing; errors go back to the
            # RPC's task, the only one that may end the call.
            try:
                async for item in requests:
                    request = item.request if isinstance(item, service.DecodedReport) else item
                    self._observe(request, connects, timeout, resync)
                    response = self._inner.handle(item)
                    if request.HasField("resync_end"):
                        self._drop_unreported(resync[0])
                        resync[0] = None
                    out.put_nowait(response)
                    for server_id, client_id in connects.pop(response.ack.sequence, ()):
                        spawn(self._route(server_id, client_id, timeout[0], out.put_nowait))
            except StoreError as error:
                out.put_nowait(error)
            else:
                out.put_nowait(None)

        async def relay(feed_items: asyncio.Queue[str | Decision]) -> None:
            while True:
                item = await feed_items.get()
                out.put_nowait(
                    _state_message(item) if isinstance(item, str) else _decision_message(item)
                )

        feed = routers.attach()
        spawn(pump())
        spawn(relay(feed.items))
        try:
            while True:
                item = await out.get()
                if item is None:
                    return
                if isinstance(item, StoreError):
                    await abort(context, status_for(item))
                yield item
        finally:
            routers.detach(feed)
            await _cancel(*tasks)

    def _observe(
        self,
        request: rs.ReportRequest,
        connects: dict[int, list[tuple[str, str]]],
        timeout: list[float],
        resync: list[set[str] | None],
    ) -> None:
        """Note what needs routing once the inner servicer applied ``request``."""
        kind = request.WhichOneof("message")
        if kind == "resync_start":
            resync[0] = set()
            if request.resync_start.HasField("route_deadline"):
                proxy_deadline = request.resync_start.route_deadline.ToNanoseconds() / 1e9
                timeout[0] = proxy_deadline * _DEADLINE_SHARE
            return
        if kind != "batch":
            return
        reported = resync[0]
        if reported is not None:
            # Before the shortcut below: a change noted mid-resync must not be
            # dropped for a server reported while nothing was pending.
            reported.update(
                snap.server.connection.id
                for snap in request.batch.snapshots
                if snap.WhichOneof("connection") == "server"
            )
        routing = self._routers.active is not None
        if not routing and not self._routers.has_pending:
            # Nobody routes and nothing waits: skip the per-snapshot scan, which
            # would cost about as much as applying the batch (route outcomes
            # only follow decisions, and those need one of the two).
            return
        for snap in request.batch.snapshots:
            if snap.WhichOneof("connection") != "server":
                continue
            server_id = snap.server.connection.id
            if snap.HasField("route_outcome"):
                self._outcome(server_id, snap.route_outcome)
            elif snap.hook == pb.HOOK_SERVER_CONNECT and (
                routing or self._routers.pending(server_id) is not None
            ):
                connects.setdefault(request.sequence, []).append((server_id, snap.client_id))
            elif snap.hook in (pb.HOOK_SERVER_CONNECTED, pb.HOOK_SERVER_CONNECT_ERROR):
                self._routers.settle(server_id)

    def _drop_unreported(self, reported: set[str] | None) -> None:
        """At resync_end: forget the pending changes of servers the resync did
        not report. The proxy no longer holds them, so they never connect and
        nothing would settle them; kept, they were replayed to every later
        Report stream. That covers the servers the resync just closed (CLOSED,
        last_hook RESYNC), those retention deleted, and those already CLOSED
        (waiting in server_connect, or disconnected), which the resync leaves
        as they were. A server the resync did report may still connect, even
        if it is CLOSED now, so its change is kept."""
        if reported is None:  # no resync_start on this stream: nothing to go by
            return
        dropped = self._routers.drop_pending(lambda server_id: server_id not in reported)
        if dropped:
            log.info("dropped %d pending changes of servers the proxy no longer holds", dropped)

    def _outcome(self, server_id: str, outcome: rs.RouteOutcome) -> None:
        # The proxy's word on what it did. Counted and logged here; keeping it
        # on the record needs a field the model does not have yet (a
        # RecordMetadata.last_route written by the store).
        name = rs.RouteOutcomeKind.Name(outcome.kind).removeprefix("ROUTE_OUTCOME_KIND_").lower()
        self._routers.stats[f"outcome_{name}"] = self._routers.stats.get(f"outcome_{name}", 0) + 1
        if outcome.kind == rs.ROUTE_OUTCOME_KIND_TIMED_OUT:
            log.warning(
                "server %s connected unchanged: no route decision within the proxy's deadline "
                "(waited %.0f ms)",
                server_id,
                outcome.waited.ToNanoseconds() / 1e6,
            )

    async def _route(
        self,
        server_id: str,
        client_id: str,
        wait: float,
        send: Callable[[rs.ReportResponse], None],
    ) -> None:
        routers = self._routers
        pending = routers.pending(server_id)
        if pending is not None:
            # An explicit update made while the server was CLOSED wins over a
            # router: it is the more specific instruction, and already recorded.
            send(_decision_message(pending))
            return
        query_id = routers.new_query_id()
        server = self._store.get(server_id)
        if server is None:
            send(_decision_message(Decision(server_id, query_id=query_id)))
            return
        query = rt.RouteQuery(query_id=query_id)
        query.server.MergeFromString(server.basic())
        client = self._store.get(client_id) if client_id else None
        if client is not None:
            query.client.MergeFromString(client.basic())
        deadline = Timestamp()
        deadline.FromNanoseconds(int((time.time() + wait) * 1e9))
        query.deadline.CopyFrom(deadline)
        decision = await routers.ask(query_id, server_id, query, wait)
        if decision.fields:
            try:
                self._store.update_server(
                    server_id,
                    address=decision.address,
                    via=decision.via,
                    mask=decision.fields,
                    actor=decision.actor,
                )
            except StoreError as error:
                # Typically the server is OPEN already: the proxy went ahead.
                log.warning("route decision for %s not applied: %s", server_id, error)
                decision = Decision(server_id, actor=decision.actor, query_id=query_id)
        send(_decision_message(decision))


class RoutingConnectionServicer:
    """UpdateServerConnection that turns changes to not-OPEN servers into
    pending decisions; the inner servicer does the update itself."""

    def __init__(self, inner: service.ConnectionServicer, routers: RouterHub) -> None:
        self._inner = inner
        self._routers = routers

    async def UpdateServerConnection(
        self, request: cs.UpdateServerConnectionRequest, context: Context
    ) -> bytes:
        data = await self._inner.UpdateServerConnection(request, context)
        record = cs.UpdateServerConnectionResponse.FromString(data).connection
        meta = record.metadata
        if (
            record.WhichOneof("kind") == "server"
            and record.server.connection.state != _OPEN
            and meta.HasField("last_change")
            and meta.last_change.revision == meta.revision
        ):
            server = record.server
            self._routers.note_pending(
                Decision(
                    server.connection.id,
                    actor=meta.last_change.actor,
                    fields=frozenset(meta.last_change.fields),
                    address=server.address if server.HasField("address") else None,
                    via=server.via if server.HasField("via") else None,
                )
            )
        return data


def add_servicers(
    server: grpc.aio.Server, store: Store, hub: WatchHub, routers: RouterHub | None = None
) -> RouterHub:
    """Register ConnectionService, ReportService and RouterService, with routing.

    A drop-in for ``connmeta.service.add_servicers``; returns the hub.
    """
    routers = routers or RouterHub()
    connections = RoutingConnectionServicer(service.ConnectionServicer(store, hub), routers)
    report = RoutingReportServicer(service.ReportServicer(store), store, routers)
    router = RouterServicer(routers)
    # First registered, first asked: these methods shadow the inner ones.
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                service.CONNECTION_SERVICE,
                {
                    "UpdateServerConnection": grpc.unary_unary_rpc_method_handler(
                        connections.UpdateServerConnection,
                        request_deserializer=cs.UpdateServerConnectionRequest.FromString,
                        response_serializer=service.identity,
                    )
                },
            ),
            grpc.method_handlers_generic_handler(
                service.REPORT_SERVICE,
                {
                    "Report": grpc.stream_stream_rpc_method_handler(
                        report.Report,
                        request_deserializer=service.decode_report,
                        response_serializer=rs.ReportResponse.SerializeToString,
                    )
                },
            ),
            grpc.method_handlers_generic_handler(
                ROUTER_SERVICE,
                {
                    "Route": grpc.stream_stream_rpc_method_handler(
                        router.Route,
                        request_deserializer=rt.RouteRequest.FromString,
                        response_serializer=rt.RouteResponse.SerializeToString,
                    )
                },
            ),
        )
    )
    service.add_servicers(server, store, hub)
    return routers
