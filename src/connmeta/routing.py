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
  a *pending* decision: the hub keeps it until the proxy connected the server
  and hands it to every proxy stream, including ones that attach later, so a
  sidecar or proxy restart does not lose it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from connmeta.v1 import connection_pb2 as pb

__all__ = [
    "ROUTABLE_FIELDS",
    "AlreadySubscribed",
    "Decision",
    "ProxyFeed",
    "Query",
    "Router",
    "RouterHub",
    "answer_violations",
]

log = logging.getLogger("connmeta.routing")

ROUTABLE_FIELDS = frozenset({"address", "via"})
# mitmproxy's HttpUpstreamProxy asserts these two; anything else crashes the
# connection's layer (facts §7), so it is refused before it reaches the proxy.
_VIA_SCHEMES = frozenset({pb.SCHEME_HTTP, pb.SCHEME_HTTPS})
_MAX_NAME = 128
# Pending decisions outlive their server only until evicted: a bound, because
# a server that never connects again would otherwise be kept forever.
_MAX_PENDING = 4096


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


@dataclass(eq=False, slots=True)
class Router:
    """A subscribed router: its name and the queries waiting to be sent."""

    name: str
    order: int
    queries: asyncio.Queue[Query]
    open: dict[str, Query] = field(default_factory=dict)
    activated: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the router receives queries (at once, or when it takes over)."""


@dataclass(eq=False, slots=True)
class ProxyFeed:
    """What one proxy's report stream must send: routing-state changes
    (``str``: the active router's name, "" for none) and decisions."""

    items: asyncio.Queue[str | Decision]


def answer_violations(
    fields: frozenset[str], address: pb.Address | None, via: pb.ServerSpec | None
) -> list[tuple[str, str]]:
    """What is wrong with a router's answer, as (field, description) pairs."""
    problems: list[tuple[str, str]] = []
    unknown = sorted(fields - ROUTABLE_FIELDS)
    if unknown:
        problems.append(("update_mask", f"only address and via can be routed, got {unknown}"))
    if "address" in fields:
        if address is None or not address.host:
            problems.append(("address.host", "required when update_mask names address"))
        elif not 1 <= address.port <= 65535:
            problems.append(("address.port", f"must be 1-65535, got {address.port}"))
    if "via" in fields and via is not None:
        if via.scheme not in _VIA_SCHEMES:
            name = pb.Scheme.Name(via.scheme) if via.scheme in pb.Scheme.values() else via.scheme
            problems.append(
                ("via.scheme", f"mitmproxy's upstream proxies speak http or https, got {name}")
            )
        if not via.address.host or not 1 <= via.address.port <= 65535:
            problems.append(("via.address", "host and a port 1-65535 are required"))
    return problems


class RouterHub:
    """Subscribed routers, open queries and pending decisions."""

    def __init__(self, *, timeout: float = 0.2, queue_size: int = 1024) -> None:
        self.timeout = timeout
        """Default time a query waits for its answer, in seconds."""
        self._queue_size = queue_size
        self._routers: list[Router] = []
        self._order = itertools.count()
        self._ids = (f"{os.getpid():x}-{n:x}" for n in itertools.count(1))
        self._feeds: set[ProxyFeed] = set()
        self._pending: OrderedDict[str, Decision] = OrderedDict()
        self.stats = {"queries": 0, "answered": 0, "timed_out": 0, "late": 0, "unrouted": 0}

    # -- routers ---------------------------------------------------------

    @property
    def active(self) -> Router | None:
        """The router that receives queries, or None."""
        return self._routers[0] if self._routers else None

    def subscribe(self, name: str) -> Router:
        """Add a router; it is active if it is the only one."""
        if not name or len(name) > _MAX_NAME:
            raise ValueError(f"router name must be 1-{_MAX_NAME} characters, got {name!r}")
        if any(r.name == name for r in self._routers):
            raise AlreadySubscribed(name)
        router = Router(name, next(self._order), asyncio.Queue(self._queue_size))
        self._routers.append(router)
        if len(self._routers) == 1:
            router.activated.set()
            self._broadcast(name)
        return router

    def unsubscribe(self, router: Router) -> None:
        """Remove a router. Its open queries end as "no change" at once, so
        the proxy does not wait out the deadline for a router that left."""
        if router not in self._routers:
            return
        was_active = router is self.active
        self._routers.remove(router)
        for query in router.open.values():
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

    async def ask(
        self, query_id: str, server_id: str, payload: object, within: float | None = None
    ) -> Decision:
        """Ask the active router; "no change" if none answers ``within`` seconds."""
        router = self.active
        if router is None:
            self.stats["unrouted"] += 1
            return Decision(server_id, query_id=query_id)
        timeout = self.timeout if within is None else within
        loop = asyncio.get_running_loop()
        query = Query(
            query_id, server_id, payload, time.monotonic() + timeout, loop.create_future()
        )
        try:
            router.queries.put_nowait(query)
        except asyncio.QueueFull:
            # A router that does not even read its queries: do not pile up
            # more work behind it; the proxy goes ahead unchanged.
            self.stats["timed_out"] += 1
            return Decision(server_id, query_id=query_id, actor=router.name, timed_out=True)
        router.open[query_id] = query
        self.stats["queries"] += 1
        try:
            return await asyncio.wait_for(asyncio.shield(query.future), timeout)
        except TimeoutError:
            self.stats["timed_out"] += 1
            return Decision(server_id, query_id=query_id, actor=router.name, timed_out=True)
        finally:
            router.open.pop(query_id, None)

    def answer(self, router: Router, decision: Decision) -> bool:
        """Hand a router's answer to its waiting query; False if it is unknown
        or too late (counted, otherwise ignored: the proxy went ahead)."""
        query = router.open.pop(decision.query_id, None)
        if query is None or query.future.done() or time.monotonic() > query.deadline:
            self.stats["late"] += 1
            return False
        self.stats["answered"] += 1
        query.future.set_result(
            Decision(
                query.server_id,
                actor=router.name,
                fields=decision.fields,
                address=decision.address,
                via=decision.via,
                query_id=query.id,
            )
        )
        return True

    # -- proxies and pending decisions -----------------------------------

    def attach(self) -> ProxyFeed:
        """A feed for a new proxy stream, primed with the routing state and
        every pending decision."""
        feed = ProxyFeed(asyncio.Queue())
        feed.items.put_nowait(self.active.name if self.active else "")
        for decision in self._pending.values():
            feed.items.put_nowait(decision)
        self._feeds.add(feed)
        return feed

    def detach(self, feed: ProxyFeed) -> None:
        """Stop feeding a proxy stream that ended."""
        self._feeds.discard(feed)

    def note_pending(self, decision: Decision) -> None:
        """Keep a change made while the server was not OPEN and tell every
        proxy; it applies it when the server connects or is used."""
        self._pending[decision.server_id] = decision
        self._pending.move_to_end(decision.server_id)
        while len(self._pending) > _MAX_PENDING:
            self._pending.popitem(last=False)
        for feed in self._feeds:
            feed.items.put_nowait(decision)

    @property
    def has_pending(self) -> bool:
        """Whether any change waits for its server's connect."""
        return bool(self._pending)

    def pending(self, server_id: str) -> Decision | None:
        """The pending decision for a server, if any."""
        return self._pending.get(server_id)

    def settle(self, server_id: str) -> None:
        """The proxy connected (or gave up on) the server: nothing is pending."""
        self._pending.pop(server_id, None)

    def drop_pending(self, stale: Callable[[str], bool]) -> int:
        """Forget the pending changes whose server ``stale`` says will never
        connect; returns how many. Feeds that already received them keep
        them, but no stream attached later is handed them."""
        gone = [server_id for server_id in self._pending if stale(server_id)]
        for server_id in gone:
            del self._pending[server_id]
        return len(gone)

    def _broadcast(self, active_name: str) -> None:
        log.info("routing %s", f"active: router {active_name!r}" if active_name else "inactive")
        for feed in self._feeds:
            feed.items.put_nowait(active_name)
