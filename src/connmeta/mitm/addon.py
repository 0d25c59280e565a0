"""The connmeta mitmproxy addon: report every connection's life to the sidecar
and apply routing decisions before connect.

Load it with ``mitmdump -s "$(connmeta addon-path)"``. Options:

    connmeta_target          unix:///path or host:port of the sidecar
    connmeta_proxy_id        this proxy's name towards the sidecar (default:
                             "<hostname>:<first listen port>")
    connmeta_route_deadline  ms a server connect may wait for a route decision
    connmeta_queue_size      snapshots held while the sidecar is slow
    connmeta_rpc_deadline    ms for connecting, each write and each ack
    connmeta_buffer_size     snapshots kept while the sidecar is unreachable
    connmeta_buffer_bytes    their estimated memory, at most (bytes)

The proxy never waits for the sidecar, with one exception it asks for:

- Reporting hooks only convert the object (without certificate facts, which
  the sidecar derives) and append it to a bounded queue. A background task
  sends everything pending as one batch, keeps at most ``_WINDOW`` batches
  unacknowledged, and on any trouble (down, slow, no ack within the deadline)
  drops the stream and reconnects with exponential backoff and jitter. After
  every (re)connect, and after the queue overflowed, it resyncs: ResyncStart,
  every live connection it holds, ResyncEnd. So the sidecar converges even
  when snapshots were lost.
- While the sidecar is unreachable (not yet reached, or the stream broke),
  hooks still convert and keep their snapshots in the outage buffer, with the
  unsent queue and every batch the lost stream left unacknowledged (such a
  batch may have been applied already: the replay is at-least-once, and a
  watcher may see that stretch twice). The buffer is bounded by
  ``connmeta_buffer_size`` snapshots and ``connmeta_buffer_bytes`` of
  estimated memory; beyond either it drops the oldest snapshot, counted in
  ``stats["dropped"]``. One warning when an outage first drops, one summary
  line when it ends (buffered, replayed, dropped). After the reconnect the
  buffer is replayed in order, *then* the resync runs (ResyncStart comes
  after the last replayed batch, and hooks keep filling the buffer until the
  resync is built at an instant it is empty). ResyncEnd closes every
  connection of this proxy not reported since ResyncStart; with the replay
  before it, that judgement rests on the resync alone, i.e. on what the proxy
  holds now: what the replay closed stays closed with mitmproxy's own
  timestamps (a resync never reopens or restamps a CLOSED record), live
  connections end in their current state, and anything the replay left open
  that the proxy no longer holds (a snapshot the sidecar refused, a lost
  close) is closed with last_hook RESYNC. A replay inside the resync would
  count as "reported" and keep such a connection OPEN for good. Dropping the
  oldest keeps each connection's newest snapshot as long as any of it is
  kept, so connections that opened and closed during the outage appear
  CLOSED, with their real timestamps, or not at all. A stream that starts
  with a replay names the proxy on its first batch. A replayed
  server_connect that the same batch reports as gone ahead is not asked
  about; should a router answer one anyway, the proxy ignores the answer
  (nothing waits for it).
- ``server_connect`` waits only while the sidecar says a router is subscribed
  (RoutingState): otherwise it returns without a single await. Its snapshot
  says which (RouteHold), so the sidecar asks a router only about connects
  that wait, never about one let through before the proxy learned of a new
  router. A wait lasts at most ``connmeta_route_deadline``; the connect goes
  to the original target when nothing arrives (fail open), and at once when
  the sidecar says no router is left. A change made through
  UpdateServerConnection while the server was not OPEN arrives ahead of time
  and is applied without waiting. A connect already waiting keeps waiting
  through a reconnect (never past the deadline), so a change the sidecar
  sends again on the new stream still applies to it.

Where decisions take effect is mitmproxy's rule (facts §11): ``address`` in
``server_connect``; ``via`` only before the layer stack is built, i.e. on the
server a request is about to use, in ``requestheaders``.

Every stream names the proxy (``ReportRequest.proxy_id`` on its first
message), so one sidecar can serve several proxies and a resync closes only
this proxy's connections. The default name, ``<hostname>:<first listen
port>``, stays the same across reconnects and across restarts on the same
port; set ``connmeta_proxy_id`` when two proxies could share it (containers
with one hostname) or the port is chosen at random. A snapshot the sidecar
refuses is listed in its ack: it is counted (``stats["rejected"]``) and
logged, throttled, and the stream goes on.

The counters in ``stats`` go to the sidecar too (``ReportRequest.proxy_stats``,
cumulative), so that one scrape of the sidecar's /metrics covers the proxy's
reporting as well: at most once a second and only when they changed, on a
request the stream sends anyway, or on an empty batch of their own when the
stream is idle (an empty batch is a valid request for every sidecar version).

A server reached through an upstream proxy (``via`` set: upstream mode, or a
via decided by a router) is a "logical" server that mitmproxy never passes
to ``server_*`` hooks: those report the tunnel to the upstream proxy. The
addon reports it where it first appears (``tls_established_server`` for
HTTPS, the flow hooks ``http_connected``, ``responseheaders``, ``error`` and
``tcp_start`` otherwise; a first report from a flow hook carries
``HOOK_SERVER_CONNECTED``), and when its client disconnects it sends the
server's final snapshot with ``HOOK_SERVER_DISCONNECTED`` and state CLOSED
(with mitmproxy's ``timestamp_end`` if it set one): the tunnel is gone with
the client, whatever state mitmproxy left on the object. The same goes for a
server whose connect the client did not wait for (still in
``server_connect`` when the client left: mitmproxy cancels it without a
further hook).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal

import grpc
from mitmproxy import ctx, exceptions, http, tcp, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.connection import Client, ConnectionState, Server
from mitmproxy.net.server_spec import ServerSpec
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from connmeta.mitm._wire import field, snapshot_bytes, varint
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs

__all__ = ["ConnmetaAddon", "addons", "default_target"]

log = logging.getLogger("connmeta.addon")

_WINDOW: Final = 64
"""Unacknowledged batches in flight; beyond it, snapshots wait in the queue."""
_MAX_BATCH: Final = 1000
"""Snapshots per request: bounded so a resync or a burst stays far below the
16 MiB message limit."""
_BATCH_INTERVAL: Final = 0.1
"""Seconds between two batches, at least, unless a connect waits for its
route decision. A batch costs the proxy's event loop far more than a
snapshot does (gRPC's write and the ack's read, each a hop through gRPC's
poller thread: ~250 µs of CPU against ~1.5 µs per snapshot in it), so under
load the reporter sends at most 10 batches a second, each with everything
pending; after a quiet spell the first snapshot leaves at once. (At 0.05 s,
a plain HTTP load of 150 requests/s paid ~20 µs per request in batches.)"""
_QUEUE_SIZE: Final = 10_000
"""connmeta_queue_size's default."""
_BACKOFF_MIN: Final = 0.1
_BACKOFF_MAX: Final = 5.0
_MAX_DECISIONS: Final = 4096
_LOG_INTERVAL: Final = 10.0
_MAX_FINISHED: Final = 4096
"""Finished logical servers remembered, so a flow hook that still holds one
after its final snapshot does not report it as new."""
_MAX_PROXY_ID: Final = 256
_STATS_INTERVAL: Final = 1.0
"""Seconds between two ProxyStats sent to the sidecar, at least."""
_SNAPSHOT_OVERHEAD: Final = 800
"""Bytes a kept snapshot costs beyond twice its encoded size (see
``_footprint``)."""

_SCHEMES: Final[dict[int, Literal["http", "https"]]] = {
    pb.SCHEME_HTTP: "http",
    pb.SCHEME_HTTPS: "https",
}
Via = ServerSpec | None
_REPORT: Final = "/connmeta.v1.ReportService/Report"
_ROUTE_HELD: Final = b"\x30" + varint(rs.ROUTE_HOLD_HELD)
_ROUTE_NOT_HELD: Final = b"\x30" + varint(rs.ROUTE_HOLD_NOT_HELD)
Snapshot = bytes
"""An encoded ConnectionSnapshot (``_wire.snapshot_bytes``): what the hooks
queue, the outage buffer keeps and a batch concatenates."""


def default_target() -> str:
    """The sidecar's own default Unix socket (``connmeta serve`` without
    flags), so the two meet without configuration."""
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/connmeta-{os.getuid()}"
    return f"unix://{os.path.join(base, 'connmeta.sock')}"


class _Throttled:
    """Log a recurring warning at most once per interval, with a count."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -_LOG_INTERVAL) < _LOG_INTERVAL:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        suffix = f" ({suppressed} similar since the last message)" if suppressed else ""
        log.warning(message + suffix, *args)


class _StreamBroken(Exception):
    """The report stream must be dropped and opened again."""


def _snapshot(
    conn: Client | Server, hook: pb.Hook.ValueType, client_id: str = "", *, closed: bool = False
) -> Snapshot:
    return snapshot_bytes(conn, hook, client_id, closed=closed)


def _footprint(snap: Snapshot) -> int:
    """The memory a kept snapshot is charged, 800 + 2 x its encoded size: the
    estimate measured when snapshots were upb messages (RSS over 20,000:
    plain client 913 B (+13%), plain server 1,220 B (-12%), TLS client with
    mitmcert and 30 ciphers 5,587 B (-23%), TLS server with a 3-certificate
    chain 5,279 B (+18%)). Kept as encoded bytes now, a snapshot takes less
    (its length + ~100 B), so the bound errs on the safe side and keeps the
    meaning the options document."""
    return _SNAPSHOT_OVERHEAD + 2 * len(snap)


def _as_is(data: bytes) -> bytes:
    """The report stream's request serializer: requests leave as the bytes the
    sender built (snapshots are encoded in the hooks, a batch concatenates
    them), not as messages gRPC would serialize again."""
    return data


def valid_proxy_id(value: str) -> bool:
    """The contract of ReportRequest.proxy_id: 1-256 bytes of printable ASCII
    without spaces."""
    return 0 < len(value) <= _MAX_PROXY_ID and all("\x21" <= ch <= "\x7e" for ch in value)


def derive_proxy_id(hostname: str, listen_port: int | None, pid: int) -> str:
    """``<hostname>:<port>``: unique per proxy on a host (two proxies cannot
    listen on one port) and the same after a restart on that port. Without a
    listen port (not known yet, or none): ``<hostname>:pid<pid>``, unique but
    new at every start. Characters outside the contract become ``_``."""
    suffix = f":{listen_port}" if listen_port is not None else f":pid{pid}"
    host = "".join(ch if "\x21" <= ch <= "\x7e" else "_" for ch in hostname) or "proxy"
    return host[: _MAX_PROXY_ID - len(suffix)] + suffix


def _first_listen_port() -> int | None:
    proxyserver: Any = ctx.master.addons.get("proxyserver")  # type: ignore[no-untyped-call]
    if proxyserver is None:
        return None
    for address in proxyserver.listen_addrs():
        return int(address[1])
    return None


async def _final_status(call: Any) -> grpc.aio.AioRpcError | None:
    """The status a finished call ended with, as the error a read would raise; None
    while it runs or when it ended OK."""
    if call is None or not call.done():
        return None
    code = await call.code()
    if code is grpc.StatusCode.OK:
        return None
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=await call.details()
    )


def _describe(error: Exception) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__


def _via_of(decision: rs.RouteDecision) -> Via:
    if not decision.HasField("via"):
        return None
    spec = decision.via
    return (_SCHEMES[spec.scheme], (spec.address.host, spec.address.port))


class _Outage:
    """What one spell without the sidecar did to the snapshots. (Not a
    dataclass: mitmproxy loads this file without a sys.modules entry, which
    dataclasses need.)"""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.buffered = 0
        self.replayed = 0
        self.dropped = 0
        self.warned = False


class ConnmetaAddon:
    """Reports connections to the connmeta sidecar; applies its route decisions."""

    def __init__(self) -> None:
        self._queue: deque[Snapshot] = deque()
        # connmeta_queue_size, read once per change: an option read costs
        # ~1 µs (mitmproxy's OptManager.__getattr__), and every hook reads it.
        self._queue_size = _QUEUE_SIZE
        # Snapshots kept while the sidecar is unreachable, oldest first, with
        # their estimated memory; replayed before the next resync.
        self._buffer: deque[tuple[Snapshot, int]] = deque()
        self._buffer_bytes = 0
        # Batches written on the current stream and not acknowledged yet, by
        # sequence, with their estimated memory: kept for the replay if the
        # stream breaks, within the buffer's bounds (a slow sidecar must not
        # make the proxy hold a full window of batches). Beyond them the
        # oldest batch is let go: ``_evicted`` counts its snapshots until its
        # ack says they were not lost.
        self._unacked: OrderedDict[int, tuple[list[Snapshot], int]] = OrderedDict()
        self._unacked_count = self._unacked_bytes = 0
        self._evicted: dict[int, int] = {}
        self._outage: _Outage | None = _Outage()
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._last_batch = 0.0
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._routing_active = False
        self._resync_needed = True
        # Live objects by id: what a resync sends. Servers are also filed
        # under their client, because a server reached through an upstream
        # proxy never gets a server_disconnected of its own.
        self._live: dict[str, Client | Server] = {}
        self._client_of: dict[str, str] = {}
        self._servers_of: dict[str, set[str]] = {}
        self._waiters: dict[str, asyncio.Future[rs.RouteDecision | None]] = {}
        self._decisions: OrderedDict[str, rs.RouteDecision] = OrderedDict()
        self._pending_via: dict[str, Via] = {}
        # Servers that got server_connected: mitmproxy reports their end
        # (server_disconnected, from a finally). Every other server tracked
        # is a logical one (behind a via) or a connect not finished yet.
        self._direct: set[str] = set()
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._proxy_id = ""
        self._contract_errors = 0
        self._stats_sent: tuple[int, ...] = ()
        self._stats_sent_at = -_STATS_INTERVAL
        self._throttled = _Throttled()
        self.stats = {
            "sent": 0,
            "dropped": 0,
            "buffered": 0,
            "replayed": 0,
            "reconnects": 0,
            "route_timeouts": 0,
            "rejected": 0,
            "unconvertible": 0,
        }

    # -- lifecycle ---------------------------------------------------------

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "connmeta_target", str, default_target(),
            "Where the connmeta sidecar listens: unix:///path or host:port.",
        )  # fmt: skip
        loader.add_option(
            "connmeta_proxy_id", str, "",
            "This proxy's name towards the sidecar: 1-256 printable ASCII "
            "characters without spaces, unique among the proxies reporting to "
            "one sidecar. Empty: <hostname>:<first listen port>.",
        )  # fmt: skip
        loader.add_option(
            "connmeta_route_deadline", int, 200,
            "Milliseconds a server connect waits for a route decision while a "
            "router is subscribed; then it connects unchanged.",
        )  # fmt: skip
        loader.add_option(
            "connmeta_queue_size", int, _QUEUE_SIZE,
            "Connection snapshots held while the sidecar is slow; beyond it "
            "they are dropped and a resync repairs the sidecar's view.",
        )  # fmt: skip
        loader.add_option(
            "connmeta_rpc_deadline", int, 2_000,
            "Milliseconds for connecting to the sidecar, each write and each "
            "acknowledgement; past it the stream is reopened.",
        )  # fmt: skip
        loader.add_option(
            "connmeta_buffer_size", int, 20_000,
            "Connection snapshots kept while the sidecar is unreachable, "
            "replayed in order when it is back; beyond it the oldest are "
            "dropped (counted). 0 keeps none: only live connections are "
            "resynced.",
        )  # fmt: skip
        loader.add_option(
            "connmeta_buffer_bytes", int, 32 * 1024 * 1024,
            "Estimated memory the snapshots kept while the sidecar is "
            "unreachable may take (about 1 KiB per plain connection snapshot, "
            "5 KiB with TLS certificates); beyond it the oldest are dropped.",
        )  # fmt: skip

    def configure(self, updated: set[str]) -> None:
        if "connmeta_proxy_id" in updated:
            value = ctx.options.connmeta_proxy_id
            if value and not valid_proxy_id(value):
                raise exceptions.OptionsError(  # type: ignore[no-untyped-call]
                    f"connmeta_proxy_id must be 1-{_MAX_PROXY_ID} printable ASCII characters "
                    f"without spaces, got {value[:64]!r}"
                )
        for name in ("connmeta_queue_size", "connmeta_buffer_size", "connmeta_buffer_bytes"):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name} must not be negative")  # type: ignore[no-untyped-call]
        if "connmeta_queue_size" in updated:
            self._queue_size = ctx.options.connmeta_queue_size
        if updated & {"connmeta_buffer_size", "connmeta_buffer_bytes"}:
            self._trim()
        if updated & {"connmeta_target", "connmeta_proxy_id"} and self._task is not None:
            # A new target needs a new channel, a new name a new stream (the
            # sidecar refuses a proxy_id that changes within one): restart.
            self._proxy_id = self._choose_proxy_id()
            self._task.cancel()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def running(self) -> None:
        if self._task is None:
            # Proxyserver's running() ran before this script's: the listen
            # addresses are known now.
            self._proxy_id = self._choose_proxy_id()
            self._task = asyncio.get_running_loop().create_task(self._run())

    @staticmethod
    def _choose_proxy_id() -> str:
        chosen: str = ctx.options.connmeta_proxy_id
        if chosen:
            return chosen
        try:
            port = _first_listen_port()
        except Exception:  # a master without a proxyserver: still a name
            port = None
        return derive_proxy_id(socket.gethostname(), port, os.getpid())

    @property
    def proxy_id(self) -> str:
        """The name this proxy reports under (set once the proxy runs)."""
        return self._proxy_id

    async def done(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- reporting hooks: convert, enqueue, return ---------------------------
    # Plain functions, not coroutines: mitmproxy awaits only what a hook
    # returns, and none of these waits for anything (server_connect may).

    def client_connected(self, client: Client) -> None:
        self._live[client.id] = client
        self._report(client, pb.HOOK_CLIENT_CONNECTED)

    def client_disconnected(self, client: Client) -> None:
        # mitmproxy tears down the client's server connections after this
        # hook. Those that got server_connected report their own
        # server_disconnected then; the others get no hook any more: logical
        # servers never do, and a connect still in server_connect is
        # cancelled. Their final snapshots go first, so a reader sees the
        # client close last, as with direct servers.
        for server_id in list(self._servers_of.get(client.id, ())):
            server = self._live.get(server_id)
            if server_id in self._direct or not isinstance(server, Server):
                continue  # server_disconnected follows
            self._finish(server, client.id)
        self._report(client, pb.HOOK_CLIENT_DISCONNECTED)
        self._live.pop(client.id, None)

    async def server_connect(self, data: ServerConnectionHookData) -> None:
        server, client = data.server, data.client
        self._track(server, client.id)
        decision = self._decisions.pop(server.id, None)
        waited = 0.0
        held = None
        if decision is None:
            # Whether to wait is known here, from the last RoutingState: no
            # await at all while no router is subscribed. The snapshot says
            # which it is, so the sidecar asks a router only about a connect
            # that waits (RouteHold).
            hold = self._routing_active and self._connected
            held = self._convert(server, pb.HOOK_SERVER_CONNECT, client.id)
            if held is None:
                return  # not reported: no decision will come
            # ConnectionSnapshot.route_hold (6, a varint), after the fields before it.
            self._enqueue(held + (_ROUTE_HELD if hold else _ROUTE_NOT_HELD))
            if not hold:
                return  # the path every connect takes while nobody routes
            started = time.perf_counter()
            decision = await self._await_decision(server.id)
            waited = time.perf_counter() - started
        outcome = self._apply_at_connect(server, decision, waited)
        if held is not None and not outcome.applied_fields:
            # The server is as reported before the wait (the address is the
            # only field a decision changes here): its bytes, without a second
            # conversion (20-30 µs of the held connect).
            snap = held
        else:
            converted = self._convert(server, pb.HOOK_SERVER_CONNECT, client.id)
            if converted is None:
                return
            snap = converted
        # ConnectionSnapshot.route_outcome (5), after the fields before it.
        self._enqueue(snap + field(b"\x2a", outcome.SerializeToString()))

    def server_connected(self, data: ServerConnectionHookData) -> None:
        self._track(data.server, data.client.id, direct=True)
        self._report(data.server, pb.HOOK_SERVER_CONNECTED, data.client.id)

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        self._report(data.server, pb.HOOK_SERVER_CONNECT_ERROR, data.client.id)
        self._forget_server(data.server.id)

    def server_disconnected(self, data: ServerConnectionHookData) -> None:
        self._report(data.server, pb.HOOK_SERVER_DISCONNECTED, data.client.id)
        self._forget_server(data.server.id)

    def tls_established_client(self, data: tls.TlsData) -> None:
        self._tls(data, pb.HOOK_TLS_ESTABLISHED_CLIENT, pb.HOOK_TLS_ESTABLISHED_SERVER)

    def tls_established_server(self, data: tls.TlsData) -> None:
        self._tls(data, pb.HOOK_TLS_ESTABLISHED_CLIENT, pb.HOOK_TLS_ESTABLISHED_SERVER)

    def tls_failed_client(self, data: tls.TlsData) -> None:
        self._tls(data, pb.HOOK_TLS_FAILED_CLIENT, pb.HOOK_TLS_FAILED_SERVER)

    def tls_failed_server(self, data: tls.TlsData) -> None:
        self._tls(data, pb.HOOK_TLS_FAILED_CLIENT, pb.HOOK_TLS_FAILED_SERVER)

    def _tls(
        self, data: tls.TlsData, client_hook: pb.Hook.ValueType, server_hook: pb.Hook.ValueType
    ) -> None:
        conn = data.conn
        if isinstance(conn, Client):
            self._report(conn, client_hook)
        elif isinstance(conn, Server):
            # A server reached through an upstream proxy (the "logical"
            # server) shows up here first: its server_* hooks report the
            # tunnel to the proxy instead.
            if conn.id in self._finished:
                return
            self._track(conn, data.context.client.id)
            self._report(conn, server_hook, data.context.client.id)

    # A logical server without TLS (plain HTTP through an upstream proxy, a
    # CONNECT tunnel whose TLS mitmproxy passes through) appears in no
    # connection hook at all: only as the server of a flow.

    def http_connected(self, flow: http.HTTPFlow) -> None:
        self._logical(flow.server_conn, flow.client_conn.id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._logical(flow.server_conn, flow.client_conn.id)

    def error(self, flow: http.HTTPFlow) -> None:
        self._logical(flow.server_conn, flow.client_conn.id)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self._logical(flow.server_conn, flow.client_conn.id)

    def _logical(self, server: Server, client_id: str) -> None:
        # Only a server with a via is one no server_* hook reports; a flow's
        # server without one is direct (or a placeholder never opened).
        if server.via is None or server.id in self._live or server.id in self._finished:
            return
        if server.timestamp_start is None:
            return  # its tunnel never came up: nothing was opened
        self._track(server, client_id)
        self._report(server, pb.HOOK_SERVER_CONNECTED, client_id)

    # -- routing -------------------------------------------------------------

    @property
    def requestheaders(self) -> Callable[[http.HTTPFlow], None] | None:
        """The hook only while a via waits to be applied: mitmproxy looks a
        hook up on every event and skips a None, which spares every request
        the dispatch (~4 µs: mitmproxy's args() and the call) otherwise."""
        return self._apply_pending_via if self._pending_via else None

    def _apply_pending_via(self, flow: http.HTTPFlow) -> None:
        """Apply a deferred via to the server this request is about to use.

        An OPEN server (an eager CONNECT tunnel) cannot take a via (the
        guard); a fresh Server for the same address can, and mitmproxy then
        opens it through the upstream proxy for this and later requests.
        """
        current = flow.server_conn
        if current.id not in self._pending_via:
            return
        via = self._pending_via[current.id]
        if current.via == via:
            return
        if current.state is ConnectionState.OPEN:
            fresh = Server(address=current.address, transport_protocol=current.transport_protocol)
            fresh.via = via
            flow.server_conn = fresh
        else:
            current.via = via

    async def _await_decision(self, server_id: str) -> rs.RouteDecision | None:
        future: asyncio.Future[rs.RouteDecision | None] = asyncio.get_running_loop().create_future()
        self._waiters[server_id] = future
        self._urgent.set()  # the server_connect snapshot must leave now
        self._wake.set()
        try:
            return await asyncio.wait_for(future, ctx.options.connmeta_route_deadline / 1000)
        except TimeoutError:
            self.stats["route_timeouts"] += 1
            self._throttled.warn(
                "route-timeout",
                "connmeta: no route decision within %d ms; connecting unchanged",
                ctx.options.connmeta_route_deadline,
            )
            return None
        finally:
            self._waiters.pop(server_id, None)

    def _release_waiters(self) -> None:
        """No router is subscribed any more: a held connect has nobody to
        wait for (its report may have reached the sidecar after the router
        left, and then no decision comes). It goes ahead unchanged now."""
        for server_id, waiter in self._waiters.items():
            if not waiter.done():
                waiter.set_result(rs.RouteDecision(server_id=server_id))

    def _apply_at_connect(
        self, server: Server, decision: rs.RouteDecision | None, waited: float
    ) -> rs.RouteOutcome:
        outcome = rs.RouteOutcome()
        outcome.waited.FromNanoseconds(int(waited * 1e9))
        if decision is None or decision.timed_out:
            outcome.kind = rs.ROUTE_OUTCOME_KIND_TIMED_OUT
            if decision is not None:
                outcome.query_id, outcome.actor = decision.query_id, decision.actor
            return outcome
        outcome.query_id, outcome.actor = decision.query_id, decision.actor
        fields = set(decision.update_mask.paths)
        if "address" in fields and decision.HasField("address"):
            target = (decision.address.host, decision.address.port)
            if server.address != target:
                server.address = target  # CLOSED in server_connect: no guard
                outcome.applied_fields.append("address")
        if "via" in fields:
            via = _via_of(decision)
            if server.via != via:
                # mitmproxy built this connection's layers before the hook:
                # a via set now would be ignored (facts §11 ④).
                self._pending_via[server.id] = via
                outcome.deferred_fields.append("via")
        if outcome.deferred_fields:
            outcome.kind = rs.ROUTE_OUTCOME_KIND_DEFERRED
        elif outcome.applied_fields:
            outcome.kind = rs.ROUTE_OUTCOME_KIND_APPLIED
        else:
            outcome.kind = rs.ROUTE_OUTCOME_KIND_NO_CHANGE
        return outcome

    def _on_decision(self, decision: rs.RouteDecision) -> None:
        waiter = self._waiters.get(decision.server_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(decision)
            return
        if decision.query_id:
            return  # an answer for a connect that already went ahead
        # A pending change: apply it at this server's next connect, and its
        # via to requests that use the server meanwhile.
        self._decisions[decision.server_id] = decision
        self._decisions.move_to_end(decision.server_id)
        while len(self._decisions) > _MAX_DECISIONS:
            self._decisions.popitem(last=False)
        if "via" in decision.update_mask.paths and decision.server_id in self._live:
            self._pending_via[decision.server_id] = _via_of(decision)

    # -- bookkeeping ---------------------------------------------------------

    def _track(self, server: Server, client_id: str, *, direct: bool = False) -> None:
        if direct:
            self._direct.add(server.id)
        if server.id not in self._live:
            self._live[server.id] = server
            self._client_of[server.id] = client_id
            self._servers_of.setdefault(client_id, set()).add(server.id)

    def _forget_server(self, server_id: str) -> None:
        self._live.pop(server_id, None)
        self._pending_via.pop(server_id, None)
        self._direct.discard(server_id)
        client_id = self._client_of.pop(server_id, None)
        if client_id is not None:
            servers = self._servers_of.get(client_id)
            if servers is not None:
                servers.discard(server_id)
                if not servers:
                    del self._servers_of[client_id]

    def _finish(self, server: Server, client_id: str) -> None:
        """The final snapshot of a server mitmproxy will not report again:
        CLOSED, whatever state its object was left in."""
        snap = self._convert(server, pb.HOOK_SERVER_DISCONNECTED, client_id, closed=True)
        if snap is not None:
            self._enqueue(snap)
        self._forget_server(server.id)
        self._finished[server.id] = None
        while len(self._finished) > _MAX_FINISHED:
            self._finished.popitem(last=False)

    def _convert(
        self,
        conn: Client | Server,
        hook: pb.Hook.ValueType,
        client_id: str = "",
        *,
        closed: bool = False,
    ) -> Snapshot | None:
        """The snapshot, or None (counted, logged) for an object mitmproxy
        let an addon break: hooks never raise."""
        try:
            return snapshot_bytes(conn, hook, client_id, closed=closed)
        except (ValueError, TypeError) as error:
            self.stats["unconvertible"] += 1
            self._throttled.warn(
                "unconvertible", "connmeta: cannot report connection %s: %s", conn.id, error
            )
            return None

    def _report(self, conn: Client | Server, hook: pb.Hook.ValueType, client_id: str = "") -> None:
        snap = self._convert(conn, hook, client_id)
        if snap is not None:
            self._enqueue(snap)

    def _enqueue(self, snap: Snapshot) -> None:
        if not self._connected:
            # Nothing to send to: kept for the replay after the reconnect
            # (the buffer is drained then, so wake the sender).
            self._keep([snap])
            self._wake.set()
            return
        if len(self._queue) >= self._queue_size:
            self.stats["dropped"] += 1
            self._resync_needed = True
            self._throttled.warn(
                "queue-full",
                "connmeta: sidecar too slow, snapshot queue full (%d); dropped %d so far, "
                "a resync will repair the sidecar's view",
                ctx.options.connmeta_queue_size,
                self.stats["dropped"],
            )
            return
        self._queue.append(snap)
        self._wake.set()

    # -- the outage buffer -------------------------------------------------------

    def _keep(self, snaps: list[Snapshot], *, older: bool = False) -> None:
        """Buffer ``snaps`` (in order) behind what is kept, or, ``older``,
        ahead of it; then drop the oldest beyond the bounds."""
        entries = [(snap, _footprint(snap)) for snap in snaps]
        if older:
            self._buffer.extendleft(reversed(entries))
        else:
            self._buffer.extend(entries)
        self._buffer_bytes += sum(size for _, size in entries)
        self.stats["buffered"] += len(entries)
        outage = self._outage = self._outage or _Outage()
        outage.buffered += len(entries)
        self._trim()

    def _trim(self) -> None:
        limit, limit_bytes = ctx.options.connmeta_buffer_size, ctx.options.connmeta_buffer_bytes
        dropped = 0
        while self._buffer and (len(self._buffer) > limit or self._buffer_bytes > limit_bytes):
            _, size = self._buffer.popleft()
            self._buffer_bytes -= size
            dropped += 1
        if dropped:
            self._dropped(dropped)

    def _dropped(self, count: int) -> None:
        """Count snapshots lost to the buffer's bounds; warn once an outage."""
        self.stats["dropped"] += count
        outage = self._outage = self._outage or _Outage()
        outage.dropped += count
        if not outage.warned:
            outage.warned = True
            log.warning(
                "connmeta: sidecar at %s unreachable and the outage buffer is full "
                "(connmeta_buffer_size %d, connmeta_buffer_bytes %d): dropping the oldest "
                "snapshots; the count follows when it is back",
                ctx.options.connmeta_target,
                ctx.options.connmeta_buffer_size,
                ctx.options.connmeta_buffer_bytes,
            )

    def _hold_unacked(self, sequence: int, snaps: list[Snapshot], size: int) -> None:
        self._unacked[sequence] = (snaps, size)
        self._unacked_count += len(snaps)
        self._unacked_bytes += size
        while len(self._unacked) > 1 and (
            self._unacked_count > ctx.options.connmeta_buffer_size
            or self._unacked_bytes > ctx.options.connmeta_buffer_bytes
        ):
            oldest, (evicted, evicted_size) = self._unacked.popitem(last=False)
            self._unacked_count -= len(evicted)
            self._unacked_bytes -= evicted_size
            self._evicted[oldest] = len(evicted)

    def _acknowledged(self, sequence: int) -> None:
        held = self._unacked.pop(sequence, None)
        if held is not None:
            self._unacked_count -= len(held[0])
            self._unacked_bytes -= held[1]
        self._evicted.pop(sequence, None)

    def _take_buffered(self) -> list[Snapshot]:
        """The oldest kept snapshots, one batch of them, for the replay."""
        taken = []
        for _ in range(min(len(self._buffer), _MAX_BATCH)):
            snap, size = self._buffer.popleft()
            self._buffer_bytes -= size
            taken.append(snap)
        self.stats["replayed"] += len(taken)
        if self._outage is not None:
            self._outage.replayed += len(taken)
        return taken

    def _outage_over(self) -> None:
        """Say once what the outage that ends now cost, if anything."""
        outage, self._outage = self._outage, None
        if outage is None or not (outage.buffered or outage.dropped):
            return
        (log.warning if outage.dropped else log.info)(
            "connmeta: sidecar at %s reachable again after %.1f s: %d snapshots buffered, "
            "%d replayed, %d dropped (oldest first; connmeta_buffer_size %d, "
            "connmeta_buffer_bytes %d)",
            ctx.options.connmeta_target,
            time.monotonic() - outage.started,
            outage.buffered,
            outage.replayed,
            outage.dropped,
            ctx.options.connmeta_buffer_size,
            ctx.options.connmeta_buffer_bytes,
        )

    # -- the reporter task -----------------------------------------------------

    async def _run(self) -> None:
        backoff = _BACKOFF_MIN
        while True:
            started = time.monotonic()
            contract_error = False
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # every failure means: reconnect later
                contract_error = self._is_contract_error(error)
                if not contract_error:
                    self._throttled.warn(
                        "stream", "connmeta: report stream to %s: %s; reconnecting",
                        ctx.options.connmeta_target, _describe(error),
                    )  # fmt: skip
            finally:
                self._disconnected()
            if time.monotonic() - started > 10 * _BACKOFF_MAX and not contract_error:
                # It worked for a while: retry soon. Not after a contract
                # error, which the next stream will likely meet again.
                backoff = _BACKOFF_MIN
            # Full jitter: proxies restarted together do not reconnect in step.
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, _BACKOFF_MAX)
            self.stats["reconnects"] += 1

    def _is_contract_error(self, error: Exception) -> bool:
        """INVALID_ARGUMENT ends a stream only for a message that is not a
        valid ReportRequest: this addon and the sidecar disagree on the
        contract (a bug or a version mismatch), not a transient failure. Said
        once, loudly; then throttled like any stream failure."""
        if not (
            isinstance(error, grpc.aio.AioRpcError)
            and error.code() is grpc.StatusCode.INVALID_ARGUMENT
        ):
            return False
        self._contract_errors += 1
        if self._contract_errors == 1:
            log.error(
                "connmeta: the sidecar at %s refused the report stream as malformed "
                "(INVALID_ARGUMENT: %s). This is a contract mismatch between the connmeta "
                "addon and the sidecar (a bug, or different versions), not a network "
                "problem; reconnecting with backoff.",
                ctx.options.connmeta_target,
                error.details(),
            )
        else:
            self._throttled.warn(
                "contract", "connmeta: the sidecar refused the report stream again (%s)",
                _describe(error),
            )  # fmt: skip
        return True

    def _disconnected(self) -> None:
        self._connected = False
        self._routing_active = False
        self._resync_needed = True
        # What the lost stream did not get acknowledged, then what it never
        # sent: older than anything the buffer holds (a replay broken off
        # puts its unacknowledged batches back where they were).
        lost = [snap for snaps, _ in self._unacked.values() for snap in snaps]
        lost.extend(self._queue)
        evicted = sum(self._evicted.values())
        self._unacked.clear()
        self._unacked_count = self._unacked_bytes = 0
        self._evicted.clear()
        self._queue.clear()
        if self._outage is None:
            self._outage = _Outage()
        if evicted:  # older than anything kept: dropped first in any case
            self._dropped(evicted)
        if lost:
            self._keep(lost, older=True)
        # A connect waiting for its decision keeps waiting, up to its
        # deadline: after a quick reconnect the sidecar sends every pending
        # change again, and the change then applies to this very connect
        # instead of being lost to a connect that went ahead meanwhile.

    async def _session(self) -> None:
        deadline = ctx.options.connmeta_rpc_deadline / 1000
        channel = grpc.aio.insecure_channel(
            ctx.options.connmeta_target,
            options=[("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)],
        )
        call: Any = None
        reader: asyncio.Task[None] | None = None
        try:
            await asyncio.wait_for(channel.channel_ready(), deadline)
            # The stream itself has no deadline: it lives as long as the
            # proxy. Liveness is enforced per message instead: every write
            # and every acknowledgement must finish within the deadline.
            # Called without an iterator: the write()/read() form.
            call = channel.stream_stream(_REPORT, _as_is, rs.ReportResponse.FromString)()
            in_flight: dict[int, float] = {}
            reader = asyncio.get_running_loop().create_task(self._read(call, in_flight))
            sequence = 0

            async def send(
                request: rs.ReportRequest, snaps: list[Snapshot] | None = None, *, keep: bool = True
            ) -> None:
                nonlocal sequence
                sequence += 1
                request.sequence = sequence
                if sequence == 1:  # a stream opens with a replay or a resync
                    request.proxy_id = self._proxy_id
                stats = self._stats_due()
                if stats is not None:
                    request.proxy_stats.CopyFrom(stats)
                data = request.SerializeToString()
                if snaps is not None:
                    # ReportRequest.batch (2) from the encoded snapshots, after
                    # the other fields (protobuf takes fields in any order).
                    batch = b"".join([b"\x0a" + varint(len(snap)) + snap for snap in snaps])
                    data += b"\x12" + varint(len(batch)) + batch
                if snaps is not None and keep:
                    # Kept until acknowledged, for a replay (a resync's are
                    # not: a new stream resyncs anew); the same estimate as
                    # _footprint's.
                    size = _SNAPSHOT_OVERHEAD * len(snaps) + 2 * len(data)
                    self._hold_unacked(sequence, snaps, size)
                in_flight[sequence] = time.monotonic()
                await asyncio.wait_for(call.write(data), deadline)

            async def send_batch(snaps: list[Snapshot]) -> None:
                await send(rs.ReportRequest(), snaps)
                self.stats["sent"] += len(snaps)
                self._last_batch = time.monotonic()

            while True:
                if reader.done():
                    reader.result()
                    raise _StreamBroken("the sidecar ended the stream")
                if self._resync_needed:
                    # What the outage kept, in order, before the resync
                    # (module docstring: why not inside it). Hooks go on
                    # filling the buffer until the resync is built, at an
                    # instant the buffer is empty.
                    while self._buffer and len(in_flight) < _WINDOW:
                        await send_batch(self._take_buffered())
                    if not self._buffer:
                        for request, snaps in self._resync_requests():
                            await send(request, snaps, keep=False)
                while self._queue and len(in_flight) < _WINDOW:
                    self._urgent.clear()
                    await send_batch(
                        [self._queue.popleft() for _ in range(min(len(self._queue), _MAX_BATCH))]
                    )
                    # One batch per interval (what the hooks queued during
                    # its write waits for the next), unless a full batch is
                    # pending or a connect waits for its route decision.
                    # Sending on at once made ~35 batches/s of ~17 snapshots
                    # instead of 20 (bench/proxy_bench.py, 2026-11-26; a batch
                    # costs the proxy ~250 µs CPU, its snapshots ~1.5 µs each).
                    if len(self._queue) < _MAX_BATCH and not self._urgent.is_set():
                        break
                if in_flight and time.monotonic() - min(in_flight.values()) > deadline:
                    raise _StreamBroken(f"no acknowledgement within {deadline * 1000:.0f} ms")
                if (
                    self._connected
                    and not self._queue  # else the stats ride on the next batch
                    and len(in_flight) < _WINDOW
                    and self._stats_due(peek=True)
                ):
                    idle = rs.ReportRequest()
                    idle.batch.SetInParent()  # empty: only the stats ride on it
                    await send(idle)
                if not self._queue or len(in_flight) >= _WINDOW:
                    self._wake.clear()
                    self._urgent.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), deadline / 4)
                pause = self._last_batch + _BATCH_INTERVAL - time.monotonic()
                if pause > 0 and self._queue and not self._urgent.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._urgent.wait(), pause)
        except Exception as error:
            # Whichever side noticed first (a write into a finished call fails
            # with "INTERNAL: Internal error from Core", a missing ack), the
            # sidecar's own status says why the stream ended.
            final = await _final_status(call)
            if final is not None:
                raise final from error
            raise
        finally:
            if reader is not None:
                reader.cancel()
            if call is not None:
                call.cancel()
            await channel.close(grace=None)

    def proxy_stats(self) -> rs.ProxyStats:
        """``stats`` as the report stream carries them."""
        stats = self.stats
        return rs.ProxyStats(
            snapshots_sent=stats["sent"],
            snapshots_dropped=stats["dropped"],
            snapshots_buffered=stats["buffered"],
            snapshots_replayed=stats["replayed"],
            snapshots_rejected=stats["rejected"],
            reconnects=stats["reconnects"],
            route_timeouts=stats["route_timeouts"],
        )

    def _stats_due(self, *, peek: bool = False) -> rs.ProxyStats | None:
        """The stats to send now, if they changed and the last went out a
        second ago or more; None otherwise. ``peek``: do not count them as sent."""
        now = time.monotonic()
        if now - self._stats_sent_at < _STATS_INTERVAL:
            return None
        values = tuple(self.stats.values())
        if values == self._stats_sent:
            return None
        if not peek:
            self._stats_sent, self._stats_sent_at = values, now
        return self.proxy_stats()

    def _resync_requests(self) -> list[tuple[rs.ReportRequest, list[Snapshot] | None]]:
        """ResyncStart, every live connection, ResyncEnd, built at one instant.

        The queue is emptied in the same step: whatever it held is older than
        these snapshots, and every later hook appends after them.
        """
        self._queue.clear()
        self._resync_needed = False
        self._connected = True  # hooks from now on queue up behind the resync
        self._outage_over()
        log.info(
            "connmeta: reporting to %s as %s; resync of %d live connections",
            ctx.options.connmeta_target,
            self._proxy_id,
            len(self._live),
        )
        start = rs.ReportRequest()
        start.resync_start.route_deadline.FromMilliseconds(ctx.options.connmeta_route_deadline)
        snaps = [
            snap
            for conn in self._live.values()
            if (snap := self._convert(conn, pb.HOOK_RESYNC, self._client_of.get(conn.id, "")))
        ]
        requests: list[tuple[rs.ReportRequest, list[Snapshot] | None]] = [(start, None)]
        for i in range(0, len(snaps), _MAX_BATCH):
            requests.append((rs.ReportRequest(), snaps[i : i + _MAX_BATCH]))
        end = rs.ReportRequest()
        end.resync_end.SetInParent()
        requests.append((end, None))
        return requests

    async def _read(self, call: Any, in_flight: dict[int, float]) -> None:
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                self._handle(response, in_flight)
        finally:
            self._wake.set()  # the sender notices the end at once

    def _handle(self, response: rs.ReportResponse, in_flight: dict[int, float]) -> None:
        kind = response.WhichOneof("message")
        if kind == "ack":
            in_flight.pop(response.ack.sequence, None)
            self._acknowledged(response.ack.sequence)
            if response.ack.rejected:
                self._rejected(response.ack.rejected)
            if (self._queue or self._buffer) and len(in_flight) == _WINDOW - 1:
                self._wake.set()  # the window was full: room for the next batch
        elif kind == "routing_state":
            self._routing_active = response.routing_state.active
            if not self._routing_active:
                self._release_waiters()
        elif kind == "route_decision":
            self._on_decision(response.route_decision)

    def _rejected(self, rejected: Iterable[rs.SnapshotRejection]) -> None:
        """The sidecar refused these snapshots and applied the rest of their
        batch; the stream goes on. A flood gets one line per interval."""
        rejections = list(rejected)
        self.stats["rejected"] += len(rejections)
        first = rejections[0]
        fields = ", ".join(v.field for v in first.violations[:3])
        self._throttled.warn(
            "rejected",
            "connmeta: the sidecar refused %d snapshot(s) (%d so far), e.g. #%d of connection "
            "%s: %s: %s%s",
            len(rejections),
            self.stats["rejected"],
            first.index,
            first.connection_id or "(none)",
            first.reason,
            first.message,
            f" [{fields}]" if fields else "",
        )


addons = [ConnmetaAddon()]
