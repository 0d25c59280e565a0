"""ReportService: the proxies' report streams into the store, and routing back out.

One stream per proxy. Each request is decoded, applied to the store and
acknowledged; alongside, the stream carries what routing sends the proxy:
the routing state, answers to server connects, and the pending changes of
the proxy's servers. No business rule lives here: validation, ownership,
resync and pending changes are the store's; which router decides is the
RouterHub's.

A stream never hangs and never dies silently: applying runs in a task of its
own, and whatever ends it (the proxy closing, a protocol error, a bug of
ours) reaches the RPC's task as the status that ends the call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # no stubs; BaseError is public there

from connmeta import auth
from connmeta._rawview import RawReportRequest
from connmeta.errors import abort, internal, status_for
from connmeta.records import InvalidArgument, Rejection, StoreError
from connmeta.routing import Decision, ProxyFeed, RouterHub
from connmeta.service import Context, Undecodable, cancel
from connmeta.stats import ReportStats
from connmeta.store import Resync, Store
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs
from connmeta.v1 import router_service_pb2 as rt
from connmeta.validation import escape, id_problem, route_deadline_violations

__all__ = ["REPORT_SERVICE", "DecodedReport", "ReportServicer", "decode_report", "handler"]

log = logging.getLogger("connmeta.report_service")

REPORT_SERVICE: Final = rs.DESCRIPTOR.services_by_name["ReportService"].full_name
REPORT_METHOD: Final = f"/{REPORT_SERVICE}/Report"
ROUTE_METHOD: Final = f"/{rt.DESCRIPTOR.services_by_name['RouterService'].full_name}/Route"

# The sidecar answers "no change" this much before the proxy's own route
# deadline, so the answer arrives while the proxy still waits and the connect
# is held for (about) the router's time, never for the full deadline.
_DEADLINE_SHARE: Final = 0.8
_LOG_INTERVAL: Final = 10.0
# What grpc's request iterator raises when the call ends under it.
_GRPC_ERRORS: Final = (grpc.aio.AioRpcError, cygrpc.BaseError)


class DecodedReport(NamedTuple):
    """A ReportRequest as the Report method receives it from ``decode_report``."""

    request: rs.ReportRequest
    """The request, parsed and validated by the public types."""
    encoded: Sequence[bytes] | None
    """For a batch, its snapshots as the bytes they arrived in."""


def decode_report(data: bytes) -> DecodedReport | Undecodable:
    """The Report method's request deserializer; never raises.

    Parses the request twice, both times in C: with the public types, which
    check the wire format (bytes that are not a ReportRequest become an
    Undecodable), and with the raw view, which hands the store each
    snapshot as bytes: the store reads them without upb attribute reads
    (``connmeta._ingest``) and never serializes a Client or Server again.
    The second parse and its size check cost about a fifth of the first.
    """
    try:
        request = rs.ReportRequest.FromString(data)
    except Exception as e:
        return Undecodable("ReportRequest", str(e))
    if not request.HasField("batch"):
        return DecodedReport(request, None)
    try:
        raw = RawReportRequest.FromString(data)
    except Exception:  # the public types parsed it: the parsed path will do
        return DecodedReport(request, None)
    # A field sent twice is merged by the public types but kept once, as last
    # sent, by the raw view; re-encoding the view then comes out shorter than
    # the request. Such a (never canonical) request takes the parsed path.
    if raw.ByteSize() != len(data):
        return DecodedReport(request, None)
    return DecodedReport(request, raw.batch.snapshots)


def _rejection_message(rejection: Rejection) -> rs.SnapshotRejection:
    return rs.SnapshotRejection(
        index=rejection.index,
        connection_id=rejection.id,
        reason=rejection.reason,
        message=rejection.message,
        violations=[
            rs.FieldViolation(field=field, description=description)
            for field, description in rejection.violations
        ],
    )


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


@dataclass(eq=False)
class _Stream:
    """What one report stream knows about its proxy."""

    feed: ProxyFeed
    timeout: float
    principal: str = ""
    """Who the transport authenticated on this stream, for the audit log."""
    proxy: str = ""
    """"" until the first request, and for streams that never name their proxy."""
    identified: bool = False
    resync: Resync | None = None
    last_rejection_log: float = -_LOG_INTERVAL
    rejections_unlogged: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class ReportServicer:
    """connmeta.v1.ReportService over the store and the router hub."""

    def __init__(self, store: Store, routers: RouterHub, stats: ReportStats | None = None) -> None:
        self._store = store
        self._routers = routers
        self._stats = stats or ReportStats()

    async def Report(
        self, requests: AsyncIterator[DecodedReport | Undecodable], context: Context
    ) -> AsyncIterator[rs.ReportResponse]:
        out: asyncio.Queue[rs.ReportResponse | grpc.Status | None] = asyncio.Queue()
        stream = _Stream(self._routers.attach(), self._routers.timeout, auth.principal())

        def spawn(coro: Any) -> None:
            task = asyncio.create_task(coro)
            stream.tasks.add(task)
            task.add_done_callback(stream.tasks.discard)

        async def pump() -> None:
            # Applies requests in its own task so that routing messages can be
            # written while the proxy sends nothing; how it ended goes back to
            # the RPC's task, the only one that may end the call.
            try:
                async for item in requests:
                    if isinstance(item, Undecodable):
                        out.put_nowait(item.status())
                        return
                    request, encoded = item
                    if not stream.identified:
                        # Before the first ack: the proxy's pending changes.
                        for decision in self._identify(stream, request.proxy_id):
                            out.put_nowait(_decision_message(decision))
                    response, connects = self._handle(stream, request, encoded)
                    # Queries leave before the ack: the router's answer holds
                    # a connect, the ack holds nothing. Batch applied -> query
                    # queued went from 176 to 64 µs p50 with this and
                    # RouterHub.query (marks in the sidecar, loaded machine).
                    for server_id, client_id in connects:
                        self._route(stream, server_id, client_id, out.put_nowait)
                    out.put_nowait(response)
            except StoreError as error:
                out.put_nowait(status_for(error))
            except _GRPC_ERRORS as error:
                # The call ended under the reader (the server stops, the
                # connection broke): nothing of ours failed, nothing to answer.
                log.debug("report stream of proxy %s ended: %r", escape(stream.proxy), error)
                out.put_nowait(None)
            except Exception:
                log.exception("report stream of proxy %s failed", escape(stream.proxy))
                out.put_nowait(internal())
            else:
                out.put_nowait(None)

        async def relay() -> None:
            while True:
                item = await stream.feed.items.get()
                out.put_nowait(
                    _state_message(item) if isinstance(item, str) else _decision_message(item)
                )

        spawn(pump())
        spawn(relay())
        try:
            while True:
                item = await out.get()
                if item is None:
                    return
                if isinstance(item, grpc.Status):
                    log.warning(
                        "report stream of proxy %s ended: %s",
                        escape(stream.proxy or "(unnamed)"),
                        escape(item.details),
                    )
                    await abort(context, item)
                yield item
        finally:
            self._routers.detach(stream.feed)
            if stream.resync is not None:
                self._store.abandon_resync(stream.resync)
            if stream.identified:
                self._store.detach_proxy(stream.proxy)
                log.info("proxy %s: report stream closed", escape(stream.proxy or "(anonymous)"))
            await cancel(*stream.tasks)

    def _identify(self, stream: _Stream, proxy_id: str) -> list[Decision]:
        """The first request names the stream's proxy (or leaves it anonymous:
        ""); returns the decisions pending for that proxy's servers."""
        problem = id_problem(proxy_id, required=False)
        if problem:
            raise InvalidArgument([("proxy_id", problem)])
        stream.proxy = proxy_id
        stream.identified = True
        store = self._store
        if store.is_live(stream.proxy):
            log.info(
                "proxy %s: another report stream opened", escape(stream.proxy or "(anonymous)")
            )
        store.attach_proxy(stream.proxy)
        log.info("proxy %s: report stream open", escape(stream.proxy or "(anonymous)"))
        return self._routers.identify(stream.feed, stream.proxy)

    def _handle(
        self,
        stream: _Stream,
        request: rs.ReportRequest,
        encoded: Sequence[bytes] | None,
    ) -> tuple[rs.ReportResponse, list[tuple[str, str]]]:
        """Apply one request; its ack and the server connects to route."""
        if request.proxy_id and request.proxy_id != stream.proxy:
            raise InvalidArgument(
                [("proxy_id", "must not change on a stream; open a new stream instead")]
            )
        store = self._store
        ack = rs.ReportAck(sequence=request.sequence)
        connects: list[tuple[str, str]] = []
        if request.HasField("proxy_stats"):
            self._stats.proxy_stats(stream.proxy, request.proxy_stats)
        kind = request.WhichOneof("message")
        if kind == "batch":
            snapshots = request.batch.snapshots
            self._stats.batch(stream.proxy, len(snapshots))
            rejected = store.apply(snapshots, encoded, proxy=stream.proxy, path="batch.snapshots")
            if rejected:
                ack.rejected.extend(_rejection_message(r) for r in rejected)
                self._log_rejections(stream, rejected)
            if self._routers.active is not None or store.has_pending:
                connects = self._connects(snapshots, {r.index for r in rejected})
        elif kind == "resync_start":
            start = request.resync_start
            if start.HasField("route_deadline"):
                violations = route_deadline_violations(
                    start.route_deadline, "resync_start.route_deadline"
                )
                if violations:
                    raise InvalidArgument(violations)
                stream.timeout = start.route_deadline.ToNanoseconds() / 1e9 * _DEADLINE_SHARE
            if stream.resync is not None:
                store.abandon_resync(stream.resync)
            stream.resync = store.begin_resync(stream.proxy)
            self._stats.resyncs += 1
            auth.audit(stream.principal, REPORT_METHOD, "resync start", proxy=stream.proxy)
        elif kind == "resync_end":
            if stream.resync is None:
                raise InvalidArgument(
                    [("resync_end", "no resync was started on this stream (send resync_start)")]
                )
            ack.closed_by_resync = store.end_resync(stream.resync)
            stream.resync = None
            auth.audit(
                stream.principal,
                REPORT_METHOD,
                "resync end",
                proxy=stream.proxy,
                closed=ack.closed_by_resync,
            )
        else:
            raise InvalidArgument(
                [("message", "one of batch, resync_start or resync_end is required")]
            )
        ack.revision = store.revision
        return rs.ReportResponse(ack=ack), connects

    def _connects(
        self, snapshots: Sequence[rs.ConnectionSnapshot], rejected: set[int]
    ) -> list[tuple[str, str]]:
        """The applied server_connect reports that need a decision, and route outcomes.

        Only a connect the proxy still holds needs one: not one it reports
        as not held (it knew of no router: a router that subscribed since
        must not be asked about it), and not one the same batch reports
        again later (a replay after an outage: the connect went ahead).
        """
        routing = self._routers.active is not None
        out: list[tuple[str, str]] = []
        later: set[str] = set()
        for i in range(len(snapshots) - 1, -1, -1):
            snap = snapshots[i]
            if i in rejected or snap.WhichOneof("connection") != "server":
                continue
            server_id = snap.server.connection.id
            if snap.HasField("route_outcome"):
                self._outcome(server_id, snap.route_outcome)
            elif (
                snap.hook == pb.HOOK_SERVER_CONNECT
                and snap.route_hold != rs.ROUTE_HOLD_NOT_HELD
                and server_id not in later
            ):
                record = self._store.get(server_id)
                if record is not None and (routing or record.has_pending):
                    out.append((server_id, snap.client_id))
            later.add(server_id)
        out.reverse()
        return out

    def _log_rejections(self, stream: _Stream, rejected: list[Rejection]) -> None:
        """One line per interval, however many snapshots a proxy gets refused."""
        now = time.monotonic()
        if now - stream.last_rejection_log < _LOG_INTERVAL:
            stream.rejections_unlogged += len(rejected)
            return
        first = rejected[0]
        where = first.violations[0][0] if first.violations else first.reason
        log.warning(
            "proxy %s: %d snapshots refused (%d more since the last message); first: %s at %s: %s",
            escape(stream.proxy),
            len(rejected),
            stream.rejections_unlogged,
            first.reason,
            escape(where),
            escape(first.violations[0][1] if first.violations else first.message),
        )
        stream.last_rejection_log = now
        stream.rejections_unlogged = 0

    def _outcome(self, server_id: str, outcome: rs.RouteOutcome) -> None:
        # The proxy's word on what it did; the store settles the record's
        # pending change from the same snapshot. Counted and logged here.
        name = rs.RouteOutcomeKind.Name(outcome.kind).removeprefix("ROUTE_OUTCOME_KIND_").lower()
        stats = self._routers.stats
        stats[f"outcome_{name}"] = stats.get(f"outcome_{name}", 0) + 1
        if outcome.kind == rs.ROUTE_OUTCOME_KIND_TIMED_OUT:
            log.warning(
                "server %s connected unchanged: no route decision within the proxy's deadline "
                "(waited %.0f ms)",
                escape(server_id),
                outcome.waited.ToNanoseconds() / 1e6,
            )

    def _route(
        self,
        stream: _Stream,
        server_id: str,
        client_id: str,
        send: Callable[[rs.ReportResponse], None],
    ) -> None:
        """Decide one server connect and send the decision on the proxy's stream.

        The router is asked before this returns; its answer is handled in a
        callback of the query's future (no task per connect). Any failure
        still answers "no change": the proxy must not wait out its deadline
        for a bug of ours.
        """
        started = time.monotonic()
        query_id = self._routers.new_query_id()

        def finish(decision: Decision, outcome: str) -> None:
            self._routers.decided(outcome, time.monotonic() - started)
            send(_decision_message(decision))

        def answered(future: asyncio.Future[Decision]) -> None:
            if future.cancelled():
                return
            try:
                finish(*self._settle(server_id, query_id, future.result()))
            except Exception:
                log.exception("routing server %s failed; the proxy connects unchanged", server_id)
                finish(Decision(server_id, query_id=query_id), "error")

        try:
            asked = self._ask(stream, server_id, client_id, query_id)
        except Exception:
            log.exception("routing server %s failed; the proxy connects unchanged", server_id)
            finish(Decision(server_id, query_id=query_id), "error")
            return
        if isinstance(asked, tuple):
            finish(*asked)
        else:
            asked.add_done_callback(answered)

    def _ask(
        self, stream: _Stream, server_id: str, client_id: str, query_id: str
    ) -> tuple[Decision, str] | asyncio.Future[Decision]:
        """The decision and its outcome (``routing.DECISION_OUTCOMES``) when
        it is known at once; otherwise the router's answer to come."""
        store = self._store
        server = store.get(server_id)
        if server is None:
            return Decision(server_id, query_id=query_id), "unrouted"
        if server.has_pending:
            # A change made with UpdateServerConnection wins over a router:
            # it is the more specific instruction, and already recorded.
            pending = server.message().metadata.pending_change
            return Decision(
                server_id,
                actor=pending.actor,
                fields=frozenset(pending.fields),
                address=pending.address if pending.HasField("address") else None,
                via=pending.via if pending.HasField("via") else None,
                query_id=query_id,
            ), "pending_change"
        query = rt.RouteQuery(query_id=query_id)
        query.server.MergeFromString(server.basic())
        client = store.get(client_id) if client_id else None
        if client is not None:
            query.client.MergeFromString(client.basic())
        deadline = Timestamp()
        deadline.FromNanoseconds(int((time.time() + stream.timeout) * 1e9))
        query.deadline.CopyFrom(deadline)
        return self._routers.query(query_id, server_id, query, stream.timeout)

    def _settle(self, server_id: str, query_id: str, decision: Decision) -> tuple[Decision, str]:
        """Record a router's decision; the decision to send and its outcome."""
        if decision.fields:
            try:
                self._store.update_server(
                    server_id,
                    address=decision.address,
                    via=decision.via,
                    mask=decision.fields,
                    actor=decision.actor,
                    query_id=query_id,
                    principal=decision.principal,
                )
            except StoreError as error:
                # Typically the server is OPEN already: the proxy went ahead.
                log.warning("route decision for %s not applied: %s", escape(server_id), error)
                return Decision(server_id, actor=decision.actor, query_id=query_id), "not_applied"
            auth.audit(
                decision.principal,
                ROUTE_METHOD,
                "route decision accepted",
                connection_id=server_id,
                fields=",".join(sorted(decision.fields)),
                router=decision.actor,
            )
            return decision, "changed"
        if decision.timed_out:
            return decision, "timed_out"
        # A router's answer carries its name; "no change" without one means
        # no router was there (none active, or it left while asked).
        return decision, "no_change" if decision.actor else "unrouted"


def handler(
    store: Store, routers: RouterHub, stats: ReportStats | None = None
) -> grpc.GenericRpcHandler:
    """ReportService's handler; ``stats`` counts what the streams receive."""
    servicer = ReportServicer(store, routers, stats)
    return grpc.method_handlers_generic_handler(
        REPORT_SERVICE,
        {
            "Report": grpc.stream_stream_rpc_method_handler(
                servicer.Report,
                request_deserializer=decode_report,
                response_serializer=rs.ReportResponse.SerializeToString,
            )
        },
    )
