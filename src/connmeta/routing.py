"""Routing before connect, the domain half: which router decides, which query
is open, which answer belongs to it, and when to stop waiting.

No gRPC here. The transport (``connmeta.router_service``) feeds router
streams and report streams into a :class:`RouterHub` and turns what it hands
back into messages; everything that is a rule lives in this module so it can
be tested without a socket:

- Only the router that subscribed first receives queries; later ones are
  standbys and take over in subscription order. One decider keeps routing
  deterministic, and a standby makes a router restart invisible.
- A query waits at most its timeout. The proxy holds a connect while its
  query is open, so a router that never answers costs each connect the
  timeout and nothing more (the proxy then fails open).
- A change made through UpdateServerConnection while a server is not OPEN is
  pending on the server's record (``metadata.pending_change``, kept by the
  store until the proxy settles it). The hub follows the store: each new
  pending change goes to the streams of the proxy that holds the server, and
  a stream that identifies its proxy later is handed all of that proxy's
  pending changes, so neither a sidecar nor a proxy reconnect loses one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from connmeta.records import Event, Record
from connmeta.stats import ROUTE_WAIT_BUCKETS, Buckets
from connmeta.store import Store
from connmeta.v1 import connection_pb2 as pb
from connmeta.validation import router_name_problem

__all__ = [
    "AlreadySubscribed",
    "Decision",
    "ProxyFeed",
    "Query",
    "Router",
    "RouterHub",
    "pending_decision",
]

log = logging.getLogger("connmeta.routing")


class AlreadySubscribed(Exception):
    """A router with this name is subscribed already."""

    def __init__(self, name: str) -> None:
        super().__init__(f"a router named {name!r} is already subscribed")
        self.name = name


@dataclass(frozen=True, slots=True)
class Decision:
    """A change to one server before it connects, and who made it.

    ``fields`` empty means "no change": the proxy goes ahead at once.
    ``via`` None with "via" in ``fields`` means "connect directly".
    """

    server_id: str
    actor: str = ""
    fields: frozenset[str] = frozenset()
    address: pb.Address | None = None
    via: pb.ServerSpec | None = None
    query_id: str = ""
    timed_out: bool = False
    """No answer in time: the proxy connects unchanged and reports it."""
    principal: str = ""
    """Who the transport authenticated as the deciding router (``Change.principal``)."""


@dataclass(slots=True)
class Query:
    """One open question to the active router."""

    id: str
    server_id: str
    payload: object
    """What the transport sends the router; the hub never looks inside."""
    deadline: float
    """``time.monotonic()`` after which the answer is ignored."""
    future: asyncio.Future[Decision]
    timer: asyncio.TimerHandle | None = None
    """Ends the query as timed out at its deadline; cancelled once it is decided."""


@dataclass(eq=False, slots=True)
class Router:
    """A subscribed router: its name and the queries waiting to be sent."""

    name: str
    order: int
    queries: asyncio.Queue[Query | None]
    """Queries to send, in order; None once the router left: nothing follows."""
    principal: str = ""
    """Who the transport authenticated on the router's stream."""
    open: dict[str, Query] = field(default_factory=dict)
    activated: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the router receives queries (at once, or when it takes over)."""
    left: bool = False
    """Set when it unsubscribed: its queue has ended, no query follows."""


@dataclass(eq=False, slots=True)
class ProxyFeed:
    """What one proxy's report stream must send: routing-state changes
    (``str``: the active router's name, "" for none) and decisions.

    ``proxy`` is set once the stream named its proxy; from then on the feed
    receives the pending changes of that proxy's servers.
    """

    items: asyncio.Queue[str | Decision]
    proxy: str | None = None


def pending_decision(record: Record) -> Decision | None:
    """The unasked decision for ``record``'s pending change, or None.

    A pending change that answers a route query was sent with that query's
    answer already; only changes from UpdateServerConnection are unasked.
    """
    if not record.has_pending:
        return None
    change = record.message().metadata.pending_change
    if change.query_id:
        return None
    return Decision(
        record.id,
        actor=change.actor,
        fields=frozenset(change.fields),
        address=change.address if change.HasField("address") else None,
        via=change.via if change.HasField("via") else None,
    )


DECISION_OUTCOMES = (
    "changed",
    "no_change",
    "timed_out",
    "pending_change",
    "not_applied",
    "unrouted",
    "error",
)
"""What a server connect's decision was: a router changed the server; a router
answered "no change"; no answer in time; a change pending from
UpdateServerConnection was sent instead of asking; the router's change could
not be recorded (the server was OPEN already); no router was there to ask; a
bug of ours (the proxy goes ahead unchanged)."""


class RouterHub:
    """Subscribed routers, open queries and pending decisions."""

    def __init__(
        self, store: Store | None = None, *, timeout: float = 0.2, queue_size: int = 1024
    ) -> None:
        self.timeout = timeout
        """Default time a query waits for its answer, in seconds."""
        self._queue_size = queue_size
        self._routers: list[Router] = []
        self._order = itertools.count()
        self._ids = (f"{os.getpid():x}-{n:x}" for n in itertools.count(1))
        self._feeds: set[ProxyFeed] = set()
        self._store = store
        if store is not None:
            store.subscribe(self._on_events)
        self.stats = {"queries": 0, "answered": 0, "timed_out": 0, "late": 0, "unrouted": 0}
        self.decisions: dict[str, int] = dict.fromkeys(DECISION_OUTCOMES, 0)
        """Decisions sent to proxies for their server connects, by outcome."""
        self.wait = Buckets(ROUTE_WAIT_BUCKETS)
        """How long each server connect was held for its decision, in seconds."""

    # -- routers ---------------------------------------------------------

    @property
    def active(self) -> Router | None:
        """The router that receives queries, or None."""
        return self._routers[0] if self._routers else None

    def subscribe(self, name: str, principal: str = "") -> Router:
        """Add a router; it is active if it is the only one. ValueError for a bad name."""
        problem = router_name_problem(name)
        if problem:
            raise ValueError(problem)
        if any(r.name == name for r in self._routers):
            raise AlreadySubscribed(name)
        # Unbounded: ``query`` keeps the bound, so that the end (None) always fits.
        router = Router(name, next(self._order), asyncio.Queue(), principal)
        self._routers.append(router)
        if len(self._routers) == 1:
            router.activated.set()
            self._broadcast(name)
        return router

    def unsubscribe(self, router: Router) -> None:
        """Remove a router. Its open queries end as "no change" at once, so
        the proxy does not wait out the deadline for a router that left; its
        queue ends with None. Removing it again does nothing."""
        if router.left or router not in self._routers:
            return
        router.left = True
        router.queries.put_nowait(None)
        was_active = router is self.active
        self._routers.remove(router)
        for query in router.open.values():
            if query.timer is not None:
                query.timer.cancel()
            if not query.future.done():
                query.future.set_result(Decision(query.server_id, query_id=query.id))
        router.open.clear()
        if was_active:
            successor = self.active
            if successor is not None:
                successor.activated.set()
            self._broadcast(successor.name if successor else "")

    # -- queries ---------------------------------------------------------

    def new_query_id(self) -> str:
        """A query id unique within this sidecar's lifetime."""
        return next(self._ids)

    def query(
        self, query_id: str, server_id: str, payload: object, within: float | None = None
    ) -> asyncio.Future[Decision]:
        """Ask the active router now; the future ends with its decision, or
        "no change" if none answers ``within`` seconds (at once without a router).

        Not a coroutine: the query is in the router's queue when this returns,
        so the transport can send it before anything else it has to write.
        The wait is a timer and a future, no task: answer -> decision queued
        took 51 µs p50 through a task, wait_for and shield, 38 µs now (marks
        in the sidecar, loaded machine; bench/routing_bench.py for the hold).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision] = loop.create_future()
        router = self.active
        if router is None:
            self.stats["unrouted"] += 1
            future.set_result(Decision(server_id, query_id=query_id))
            return future
        if router.queries.qsize() >= self._queue_size:
            # A router that does not even read its queries: do not pile up
            # more work behind it; the proxy goes ahead unchanged.
            self.stats["timed_out"] += 1
            future.set_result(
                Decision(server_id, query_id=query_id, actor=router.name, timed_out=True)
            )
            return future
        timeout = self.timeout if within is None else within
        query = Query(query_id, server_id, payload, time.monotonic() + timeout, future)
        query.timer = loop.call_later(timeout, self._expire, router, query)
        router.queries.put_nowait(query)
        router.open[query_id] = query
        self.stats["queries"] += 1
        return future

    async def ask(
        self, query_id: str, server_id: str, payload: object, within: float | None = None
    ) -> Decision:
        """Ask the active router; "no change" if none answers ``within`` seconds."""
        return await self.query(query_id, server_id, payload, within)

    def _expire(self, router: Router, query: Query) -> None:
        router.open.pop(query.id, None)
        if not query.future.done():
            self.stats["timed_out"] += 1
            query.future.set_result(
                Decision(query.server_id, query_id=query.id, actor=router.name, timed_out=True)
            )

    def answer(self, router: Router, decision: Decision) -> bool:
        """Hand a router's answer to its waiting query; False if it is unknown
        or too late (counted, otherwise ignored: the proxy went ahead)."""
        query = router.open.pop(decision.query_id, None)
        if query is None or query.future.done() or time.monotonic() > query.deadline:
            self.stats["late"] += 1
            return False
        if query.timer is not None:
            query.timer.cancel()
        self.stats["answered"] += 1
        query.future.set_result(
            Decision(
                query.server_id,
                actor=router.name,
                fields=decision.fields,
                address=decision.address,
                via=decision.via,
                query_id=query.id,
                principal=router.principal,
            )
        )
        return True

    def decided(self, outcome: str, waited: float) -> None:
        """Count one decision sent to a proxy (``DECISION_OUTCOMES``) and how long
        its connect was held for it."""
        self.decisions[outcome] += 1
        self.wait.observe(waited)

    # -- proxies and pending changes -------------------------------------

    def attach(self) -> ProxyFeed:
        """A feed for a new proxy stream, primed with the routing state."""
        feed = ProxyFeed(asyncio.Queue())
        feed.items.put_nowait(self.active.name if self.active else "")
        self._feeds.add(feed)
        return feed

    def identify(self, feed: ProxyFeed, proxy: str) -> list[Decision]:
        """The stream behind ``feed`` reports for ``proxy``: from now on it is
        fed that proxy's new pending changes; returns those already pending,
        for the stream to send first."""
        feed.proxy = proxy
        if self._store is None:
            return []
        decisions = (pending_decision(r) for r in self._store.pending_records(proxy))
        return [d for d in decisions if d is not None]

    def detach(self, feed: ProxyFeed) -> None:
        """Stop feeding a proxy stream that ended."""
        self._feeds.discard(feed)

    def _on_events(self, events: Sequence[Event]) -> None:
        """Store listener: send each new unasked pending change to its proxy."""
        feeds = self._feeds
        if not feeds:
            return
        for event in events:
            record = event.record
            if not record.has_pending or record is event.prev:
                continue
            decision = pending_decision(record)
            if decision is None:
                continue
            # Only a change accepted in this event is new; a report that
            # leaves a pending change as it was does not send it again.
            if record.message().metadata.pending_change.revision != event.revision:
                continue
            for feed in feeds:
                if feed.proxy == record.proxy:
                    feed.items.put_nowait(decision)

    def _broadcast(self, active_name: str) -> None:
        log.info("routing %s", f"active: router {active_name!r}" if active_name else "inactive")
        for feed in self._feeds:
            feed.items.put_nowait(active_name)
