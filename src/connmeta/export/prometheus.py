"""Prometheus metrics: the registry, the sidecar's collector and ``/metrics``.

Gauges are computed at scrape time from the store and the watch hub;
counters are the plain ints the sidecar keeps where events happen
(``connmeta.stats``, the hub, the router hub), read at scrape time too; gRPC
server metrics come from one interceptor (``grpc_metrics``). So nothing on
the ingest path updates a metric object, and a scrape reads a few dozen ints
whatever the store holds.

No label identifies a connection (ids, addresses and SNIs would make every
connection a series); ``proxy`` is capped (``connmeta.stats``).

``/metrics`` is served by the sidecar's own event loop: the store is
single-threaded, and a collector running in prometheus-client's HTTP thread
would read it while the loop writes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
from collections.abc import Callable, Iterable
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from connmeta.export.grpc_metrics import GrpcMetricsInterceptor
from connmeta.routing import RouterHub
from connmeta.stats import ReportStats
from connmeta.store import Store
from connmeta.watch import WatchHub

__all__ = ["MetricsServer", "SidecarCollector", "SidecarMetrics"]

log = logging.getLogger("connmeta.metrics")

_STATES: Final = ("closed", "can_read", "can_write", "open")  # mitmproxy's flag values 0-3
_MAX_REQUEST: Final = 8192
_READ_TIMEOUT: Final = 10.0


class SidecarCollector(Collector):
    """The connmeta_* metrics of one sidecar, read at scrape time."""

    def __init__(
        self,
        store: Store,
        hub: WatchHub,
        routers: RouterHub,
        reports: ReportStats,
        otlp_dropped: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        self._routers = routers
        self._reports = reports
        self._otlp_dropped = otlp_dropped

    def collect(self) -> Iterable[Metric]:
        store, hub, routers, reports = self._store, self._hub, self._routers, self._reports
        connections = GaugeMetricFamily(
            "connmeta_connections",
            "Connections the store holds, by kind and mitmproxy state.",
            labels=("kind", "state"),
        )
        for (kind, state), count in store.census().items():
            connections.add_metric((kind.name.lower(), _STATES[state]), count)
        yield connections
        yield GaugeMetricFamily(
            "connmeta_store_revision",
            "The store's revision: the number of its last change.",
            value=store.revision,
        )
        yield GaugeMetricFamily(
            "connmeta_history_events",
            "Events the history keeps for resuming watches (bounded by --history-size "
            "and --history-bytes).",
            value=store.history_length,
        )
        yield GaugeMetricFamily(
            "connmeta_watchers", "WatchConnections calls open.", value=hub.watcher_count
        )
        yield CounterMetricFamily(
            "connmeta_watch_events_sent",
            "Change events (ADDED, MODIFIED, DELETED) written to watchers; bookmarks excluded.",
            value=hub.events_sent,
        )
        evictions = CounterMetricFamily(
            "connmeta_watch_evictions",
            "Watches ended with RESOURCE_EXHAUSTED: slow_consumer (more than --watch-max-lag "
            "events behind), write_timeout (a write blocked --watch-write-timeout seconds).",
            labels=("reason",),
        )
        for reason, count in hub.evictions.items():
            evictions.add_metric((reason,), count)
        yield evictions
        snapshots = CounterMetricFamily(
            "connmeta_report_snapshots",
            "Snapshots received on report streams, by proxy (proxy_id; the first 63 proxies, "
            'then "other").',
            labels=("proxy",),
        )
        for proxy, count in reports.snapshots.items():
            snapshots.add_metric((proxy,), count)
        yield snapshots
        yield CounterMetricFamily(
            "connmeta_report_resyncs", "Resyncs started by proxies.", value=reports.resyncs
        )
        decisions = CounterMetricFamily(
            "connmeta_route_decisions",
            "Route decisions sent to proxies for server connects, by outcome.",
            labels=("outcome",),
        )
        for outcome, count in routers.decisions.items():
            decisions.add_metric((outcome,), count)
        yield decisions
        wait = routers.wait
        yield HistogramMetricFamily(
            "connmeta_route_wait_seconds",
            "How long the sidecar held each server connect for its route decision.",
            buckets=wait.cumulative(),
            sum_value=wait.sum,
        )
        dropped = CounterMetricFamily(
            "connmeta_proxy_snapshots_dropped",
            "Snapshots the proxy's addon dropped (beyond its buffer while the sidecar was "
            "unreachable), as the proxy last reported it.",
            labels=("proxy",),
        )
        reconnects = CounterMetricFamily(
            "connmeta_proxy_reconnects",
            "Report streams the proxy's addon opened after its first, as it last reported it.",
            labels=("proxy",),
        )
        for proxy, (dropped_count, reconnect_count) in reports.latest().items():
            dropped.add_metric((proxy,), dropped_count)
            reconnects.add_metric((proxy,), reconnect_count)
        yield dropped
        yield reconnects
        if self._otlp_dropped is not None:
            otlp = CounterMetricFamily(
                "connmeta_otlp_dropped",
                "Connection changes the OTLP export lost: queue_full (the collector was too "
                "slow or absent for too long), export_failed (the exporter gave up).",
                labels=("reason",),
            )
            for reason, count in self._otlp_dropped().items():
                otlp.add_metric((reason,), count)
            yield otlp


class SidecarMetrics:
    """The registry of one sidecar: its collector, the gRPC interceptor, and
    the standard process and Python collectors."""

    def __init__(
        self,
        store: Store,
        hub: WatchHub,
        routers: RouterHub,
        reports: ReportStats,
        otlp_dropped: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        # No *_created series beside every counter: the text format's
        # Prometheus ignores them, and they double the exposition.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        # A registry of its own, not the process-wide default: two sidecars in
        # one process (tests) must not share or clash.
        self.registry = CollectorRegistry()
        self.interceptor = GrpcMetricsInterceptor(self.registry)
        self.registry.register(SidecarCollector(store, hub, routers, reports, otlp_dropped))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition and its content type: OpenMetrics when ``accept`` asks for it."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class MetricsServer:
    """``GET /metrics`` over plain HTTP/1.1, one response per connection."""

    def __init__(self, metrics: SidecarMetrics) -> None:
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> str:
        """Listen; returns ``host:port`` as bound (port 0 picks one)."""
        # limit: a request head larger than this is not a scrape; readuntil
        # gives up on it instead of buffering it.
        self._server = await asyncio.start_server(
            self._serve, host or None, port, limit=_MAX_REQUEST
        )
        port = self._server.sockets[0].getsockname()[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.CancelledError):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, headers = self._respond(head)
            writer.write(_response(status, body, headers))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # not an HTTP request we answer; just close
        except ConnectionError:
            pass
        except Exception:
            log.exception("serving /metrics failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _respond(self, head: bytes) -> tuple[str, bytes, dict[str, str]]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return "400 Bad Request", b"", {}
        method, target, _ = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if target.split("?", 1)[0] != "/metrics":
            return "404 Not Found", b"connmeta serves /metrics only\n", {}
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"", {"Allow": "GET, HEAD"}
        body, content_type = self._metrics.render(headers.get("accept", ""))
        out = {"Content-Type": content_type}
        if "gzip" in headers.get("accept-encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            out["Content-Encoding"] = "gzip"
        if method == "HEAD":
            out["Content-Length"] = str(len(body))
            body = b""
        return "200 OK", body, out


def _response(status: str, body: bytes, headers: dict[str, str]) -> bytes:
    headers.setdefault("Content-Type", "text/plain; charset=utf-8")
    headers.setdefault("Content-Length", str(len(body)))
    head = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
