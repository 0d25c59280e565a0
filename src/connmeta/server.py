"""Wiring and lifecycle: the grpc.aio server, its listeners, health, reflection
and graceful shutdown. Business rules live in the domain core; servicers in
``service``; this module only assembles them."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import ipaddress
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from connmeta import (
    __version__,
    _ingest,
    connection_service,
    reflection,
    report_service,
    router_service,
)
from connmeta.auth import AuthzInterceptor, Limits, ServerTLS
from connmeta.export.prometheus import MetricsServer, SidecarMetrics
from connmeta.health import HealthServicer
from connmeta.policy import PolicyFile
from connmeta.routing import RouterHub
from connmeta.service import IdentityInterceptor
from connmeta.state_file import StateFile, open_store
from connmeta.stats import ReportStats
from connmeta.store import Store
from connmeta.watch import WatchHub

if TYPE_CHECKING:
    from connmeta.export.otlp import OtlpExport
    from connmeta.export.otlp_metrics import OtlpMetrics

log = logging.getLogger("connmeta.server")

MiB = 1024 * 1024
OTLP_METRICS_REFRESH_SECONDS = 1.0

SERVICE_NAMES = (
    connection_service.CONNECTION_SERVICE,
    report_service.REPORT_SERVICE,
    router_service.ROUTER_SERVICE,
)


def default_unix_socket() -> str:
    """A per-user socket path that needs no configuration and no root."""
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/connmeta-{os.getuid()}"
    return os.path.join(base, "connmeta.sock")


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of ``connmeta serve``; the defaults are the embedded ones."""

    listen: str = "127.0.0.1:50051"
    unix_socket: str = field(default_factory=default_unix_socket)
    health_listen: str = ""
    metrics_listen: str = ""
    history_size: int = 100_000
    history_bytes: int = 64 * MiB
    closed_retention: float = 300.0
    closed_retention_count: int = 10_000
    closed_retention_bytes: int = 32 * MiB
    proxy_gone_after: float = 300.0
    watch_max_lag: int = 10_000
    watch_write_timeout: float = 30.0
    bookmark_interval: float = 5.0
    shutdown_grace: float = 5.0
    max_message_bytes: int = 16 * MiB
    keepalive_min_ping_interval: float = 5.0
    state_dir: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    client_ca: str = ""
    authz_policy: str = ""
    insecure_listen: bool = False
    max_watchers: int = 1024
    max_streams_per_principal: int = 256
    log_format: str = "text"
    otlp_endpoint: str = ""


def channel_options(config: Config) -> list[tuple[str, int]]:
    """Server options: message limits and keepalive policy.

    Go and Rust clients commonly ping every 10-30 s, also on idle watches.
    C-core's defaults (pings at most every 5 minutes without data, two
    strikes) would answer them with GOAWAY too_many_pings, so permit pings
    without calls at the configured minimum interval. The server pings idle
    clients too, so dead peers behind NATs are noticed.
    """
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        # C-core's name for the *receive* side (GRPC_ARG_HTTP2_MIN_RECV_PING_
        # INTERVAL_WITHOUT_DATA_MS); pings closer together count as strikes.
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            int(config.keepalive_min_ping_interval * 1000),
        ),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


POLICY_POLL_SECONDS = 1.0
"""How often --authz-policy is checked for changes (a stat call)."""


class ListenError(RuntimeError):
    """A listener could not be set up; the message says which and why."""


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` binds only the loopback interface."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name (or "") may resolve to anything


def _safe_socket_directory(directory: str) -> None:
    """Create the socket's directory 0700, or refuse one others could tamper with.

    Whoever can write to the directory can replace the socket with their
    own and receive the proxy's reports and every client's calls; so can
    its owner, if that is someone else.
    """
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ListenError(f"unix socket directory {directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise ListenError(
            f"unix socket directory {directory} is owned by uid {st.st_uid}, not by this "
            f"server's user (uid {os.geteuid()}): refusing it, as its owner could replace "
            "the socket; use a directory of your own (--unix-socket)"
        )
    if st.st_mode & 0o022:
        raise ListenError(
            f"unix socket directory {directory} is group- or world-writable "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): refusing it, as others could replace "
            f"the socket; chmod go-w {directory}, or use a directory of your own"
        )


def _claim_unix_socket(path: str) -> None:
    """Make ``path`` bindable: a safe directory, no stale socket.

    A socket file nobody listens on is left over from a crash and is
    removed; one that answers belongs to a running sidecar and is an error.
    """
    _safe_socket_directory(os.path.dirname(path) or ".")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"unix socket path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        os.unlink(path)
    else:
        raise ListenError(f"another process is serving on unix socket {path}")
    finally:
        probe.close()


class Sidecar:
    """One running connmeta: the store, the watch hub and the gRPC servers."""

    def __init__(self, config: Config) -> None:
        self.config = config
        tls = (config.tls_cert, config.tls_key, config.client_ca)
        if any(tls) and not all(tls):
            raise ListenError("--tls-cert, --tls-key and --client-ca go together: give all three")
        # TLSError / PolicyError: a clear message naming the file; never serve unguarded.
        self.tls = ServerTLS(*tls) if all(tls) else None
        self.policy = PolicyFile(config.authz_policy) if config.authz_policy else None
        self.authz = AuthzInterceptor(
            self.policy,
            Limits(config.max_watchers, config.max_streams_per_principal),
        )
        options: dict[str, Any] = {
            "history_size": config.history_size,
            "history_bytes": config.history_bytes,
            "closed_retention_seconds": config.closed_retention,
            "closed_retention_count": config.closed_retention_count,
            "closed_retention_bytes": config.closed_retention_bytes,
        }
        self.state: StateFile | None = None
        tokens = connection_service.PageTokens()
        if config.state_dir:
            # StateError (a message naming the file) if it is not ours to use.
            self.store, self.state = open_store(config.state_dir, **options)
            tokens = connection_service.PageTokens(self.state.token_key)
        else:
            self.store = Store(**options)
        self._tokens = tokens
        self.hub = WatchHub(
            self.store,
            max_lag=config.watch_max_lag,
            bookmark_interval=config.bookmark_interval,
            write_timeout=config.watch_write_timeout,
        )
        self.routers = RouterHub(self.store)
        self.otlp = _start_otlp(config, self.store)
        self.reports = ReportStats()
        # Always kept (a few ints, one interceptor): what /metrics and the
        # other exporters read.
        otlp = self.otlp
        self.metrics = SidecarMetrics(
            self.store,
            self.hub,
            self.routers,
            self.reports,
            otlp_dropped=(lambda: otlp.dropped) if otlp is not None else None,
        )
        self.otlp_metrics = _start_otlp_metrics(config, self) if otlp is not None else None
        self._metrics_server: MetricsServer | None = None
        self.metrics_address = ""
        self.health = HealthServicer()
        self._servers: list[grpc.aio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.tcp_address = ""
        self.health_address = ""
        self.unix_socket = ""
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Bind every configured listener and start serving."""
        config = self.config
        if not config.listen and not config.unix_socket:
            raise ListenError("nothing to serve on: both --listen and --unix-socket are empty")
        # An index a List asks for is built between other work, not inside it.
        self.store.build_indexes_in_steps(asyncio.get_running_loop().call_soon)
        # Metrics outermost, so refused calls are counted with their code;
        # then identity, so that refused calls name the store too.
        identity = [
            self.metrics.interceptor,
            IdentityInterceptor(self.store.incarnation),
            self.authz,
        ]
        server = grpc.aio.server(options=channel_options(config), interceptors=identity)
        # One servicer per service, each behind the transport's error boundary.
        server.add_generic_rpc_handlers(
            (
                connection_service.handler(self.store, self.hub, self._tokens),
                report_service.handler(self.store, self.routers, self.reports),
                router_service.handler(self.routers),
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        # v1 and v1alpha, with the proto comments (connmeta.reflection says why not
        # grpcio-reflection's); error_details so that grpcurl can print ErrorInfo.
        server.add_generic_rpc_handlers(
            reflection.handlers(
                (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
                (health_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR),
            )
        )
        if config.listen:
            self.tcp_address = self._bind_tcp(server, config.listen, "--listen")
        if config.unix_socket:
            _claim_unix_socket(config.unix_socket)
            # umask instead of a chmod afterwards: no window in which the
            # socket is reachable with looser permissions.
            old = os.umask(0o177)
            try:
                if not server.add_insecure_port(f"unix://{config.unix_socket}"):
                    raise ListenError(f"cannot listen on unix socket {config.unix_socket}")
            finally:
                os.umask(old)
            self.unix_socket = config.unix_socket
        self._servers.append(server)
        if config.health_listen:
            # kubelet's grpc probes cannot reach a Unix socket and the API
            # port may be loopback-only, so health gets a port of its own.
            health_server = grpc.aio.server(options=channel_options(config), interceptors=identity)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health_server)
            self.health_address = self._bind_tcp(
                health_server, config.health_listen, "--health-listen"
            )
            self._servers.append(health_server)
        if config.metrics_listen:
            self.metrics_address = await self._start_metrics(config.metrics_listen)
        for s in self._servers:
            await s.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._expire_loop(), name="connmeta-expire"))
        if self.policy is not None:
            self._tasks.append(asyncio.create_task(self._policy_loop(), name="connmeta-policy"))
        if self.otlp_metrics is not None:
            self._tasks.append(
                asyncio.create_task(self._otlp_metrics_loop(), name="connmeta-otlp-metrics")
            )

    async def _start_metrics(self, address: str) -> str:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ListenError(f"--metrics-listen {address!r} is not HOST:PORT")
        self._metrics_server = MetricsServer(self.metrics)
        try:
            return await self._metrics_server.start(host.strip("[]"), int(port))
        except OSError as exc:
            raise ListenError(f"cannot listen on {address} (--metrics-listen): {exc}") from exc

    def _bind_tcp(self, server: grpc.aio.Server, address: str, flag: str) -> str:
        plaintext_api = self.tls is None and flag == "--listen"
        if plaintext_api and not self.config.insecure_listen and not is_loopback(address):
            raise ListenError(
                f"refusing to serve the API in plaintext on {address} ({flag}), which is "
                "not a loopback address: anyone who reaches it could read every "
                "connection. Serve mTLS with --tls-cert, --tls-key and --client-ca "
                "(connmeta certs init makes a set to try), bind 127.0.0.1, or accept the "
                "risk with --insecure-listen"
            )
        try:
            if self.tls is not None:
                port = server.add_secure_port(address, self.tls.credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on {address} ({flag}): {exc}") from exc
        if not port:
            raise ListenError(f"cannot listen on {address} ({flag})")
        host = address.rsplit(":", 1)[0]
        return f"{host}:{port}"

    async def _policy_loop(self) -> None:
        assert self.policy is not None
        while True:
            await asyncio.sleep(POLICY_POLL_SECONDS)
            self.policy.check()

    async def _otlp_metrics_loop(self) -> None:
        # The registry reads the store, which only this loop may touch: the
        # OTLP reader thread exports the snapshot taken here (a second old at most).
        assert self.otlp_metrics is not None
        while True:
            self.otlp_metrics.refresh()
            await asyncio.sleep(OTLP_METRICS_REFRESH_SECONDS)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.store.close_gone_proxies(self.config.proxy_gone_after)
            self.store.expire()

    def describe(self) -> str:
        """The ready line: scripts and tests parse ``tcp=`` and ``unix=``."""
        parts = [f"connmeta {__version__} serving"]
        if self.tcp_address:
            parts.append(f"tcp={self.tcp_address}")
        if self.unix_socket:
            parts.append(f"unix={self.unix_socket}")
        if self.health_address:
            parts.append(f"health={self.health_address}")
        if self.metrics_address:
            parts.append(f"metrics={self.metrics_address}")
        if self.tls is not None:
            parts.append("tls=mtls")
        if self.policy is not None:
            parts.append(f"authz-policy={self.policy.policy.name}")
        if self.otlp is not None:
            parts.append("otlp=on")
        return " ".join(parts)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown, in the order clients can act on.

        Health turns NOT_SERVING first so load balancers and probes stop
        sending new work, watchers get a final bookmark so they resume from a
        recent revision, then the servers stop accepting and in-flight calls
        get ``grace`` seconds before they are cancelled.
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        self.hub.final_bookmark()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        grace = self.config.shutdown_grace if grace is None else grace
        await asyncio.gather(*(s.stop(grace) for s in self._servers))
        if self._metrics_server is not None:
            # Last: a scrape during the grace period still sees the drain.
            await self._metrics_server.stop()
        if self.otlp_metrics is not None:
            self.otlp_metrics.refresh()  # the final values, as the last scrape would see
            await asyncio.to_thread(self.otlp_metrics.close, grace)
        if self.otlp is not None:
            await asyncio.to_thread(self.otlp.close, grace)
        if self.state is not None:
            self.state.close()
        if self.unix_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_socket)

    async def wait(self) -> None:
        """Until stop() has run."""
        await self._stopped.wait()
        await asyncio.gather(*(s.wait_for_termination() for s in self._servers))


def _start_otlp(config: Config, store: Store) -> OtlpExport | None:
    """The OTLP exporter when --otlp-endpoint or OpenTelemetry's endpoint variable is set."""
    # The SDK would read these itself; they are read here too so that setting
    # one is enough to turn export on, as with any OpenTelemetry SDK.
    endpoint = (
        config.otlp_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if not endpoint:
        return None
    from connmeta.export.otlp import OtlpExport  # the SDK (0.4 s to import) only when used

    return OtlpExport(store.subscribe, endpoint=endpoint, incarnation=store.incarnation)


def _start_otlp_metrics(config: Config, sidecar: Sidecar) -> OtlpMetrics | None:
    """The metrics over the log export's OTLP connection, unless OTEL_METRICS_EXPORTER=none."""
    from connmeta.export.otlp_metrics import OtlpMetrics, metrics_enabled

    if not metrics_enabled():
        return None
    return OtlpMetrics(
        sidecar.metrics.registry,
        # "" lets the SDK read OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT itself.
        endpoint=config.otlp_endpoint,
        incarnation=sidecar.store.incarnation,
    )


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    import signal

    # The collector's young generation: collected every 50,000 allocations
    # instead of 700. Ingest allocates a few objects per record and almost all
    # of them live on (records, events), so the default's frequent passes
    # found nothing to free: 7.1-7.7 vs 8.0-8.4 µs of server CPU per record,
    # interleaved in one run of bench/transport_bench.ingest.
    gc.set_threshold(50_000, 50, 100)
    sidecar = Sidecar(config)
    # Whatever exists now (a restored state's records, the process's modules)
    # lives on: a full collection with a million restored records walked them
    # all, 0.28-0.30 s of a stalled event loop each time. Frozen, they are still
    # freed by reference counting, which is all a record needs (no cycles).
    gc.freeze()
    await sidecar.start()
    print(sidecar.describe(), flush=True)
    log.debug("ingest path: %s", _ingest.implementation())
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stopping.append(asyncio.create_task(sidecar.stop())))
    await sidecar.wait()
    log.info("connmeta stopped")
