"""The Prometheus metrics, also over OTLP: a bridge, not a second set of metrics.

What ``/metrics`` shows is computed once, by the prometheus-client registry
(``connmeta.export.prometheus``). This module reports the same samples
through OpenTelemetry observable instruments, exported by the SDK's
``PeriodicExportingMetricReader`` and ``OTLPMetricExporter`` (gRPC) to the
collector the change events go to:

- a Prometheus gauge is an observable gauge, a counter an observable
  counter (cumulative, as Prometheus counters are) named without ``_total``
  as OpenTelemetry names counters (``connmeta_report_snapshots``);
- labels become attributes of the same names;
- histograms and summaries (``connmeta_route_wait_seconds``,
  ``grpc_server_handling_seconds``) are not bridged: an observable
  instrument cannot report buckets, and the SDK has no documented bridge
  from prometheus-client (it has one the other way, the Prometheus
  *exporter*). Scrape ``/metrics`` for them.

The store is single-threaded: the registry's collectors read it, so they
run on the event loop only. ``refresh`` (called there, every second, by the
sidecar) replaces an immutable snapshot of the samples; the instruments'
callbacks, on the SDK's reader thread, read only that snapshot. An export
never touches the store, and a slow or absent collector costs the reader
thread its retries, nothing else (metrics are cumulative: a lost export is
made good by the next).

Configuration is OpenTelemetry's: the endpoint of the log export (or
``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``), ``OTEL_METRIC_EXPORT_INTERVAL``
(connmeta's default is 5 s, not the SDK's 60 s, so that a dashboard follows
the sidecar closely), ``OTEL_METRIC_EXPORT_TIMEOUT``, and
``OTEL_METRICS_EXPORTER=none`` to send the change events only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Final, TypeAlias

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from prometheus_client import CollectorRegistry

from connmeta import __version__
from connmeta.export.otlp import _resource

__all__ = ["DEFAULT_INTERVAL_MS", "OtlpMetrics", "metrics_enabled"]

log = logging.getLogger("connmeta.export.otlp_metrics")

DEFAULT_INTERVAL_MS: Final = 5000

# (attributes, value) of each sample of one instrument.
_Samples: TypeAlias = tuple[tuple[Mapping[str, str], float], ...]


def metrics_enabled() -> bool:
    """False when the operator turned metrics export off (OpenTelemetry's variable)."""
    return os.environ.get("OTEL_METRICS_EXPORTER", "otlp").strip().lower() != "none"


class OtlpMetrics:
    """Reports ``registry``'s gauges and counters over OTLP.

    Call ``refresh`` on the thread that owns what the registry reads (the
    event loop), periodically; ``close`` to send the last values and stop.
    ``reader`` replaces the periodic OTLP reader (tests).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        endpoint: str = "",
        incarnation: str = "",
        reader: MetricReader | None = None,
    ) -> None:
        self._registry = registry
        if reader is None:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )

            interval = int(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL") or DEFAULT_INTERVAL_MS)
            # None: the SDK reads OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT itself.
            reader = PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=endpoint or None), export_interval_millis=interval
            )
        # shutdown_on_exit=False: close() shuts it down within its bound.
        self._provider = MeterProvider(
            resource=_resource(incarnation), metric_readers=[reader], shutdown_on_exit=False
        )
        self._meter = self._provider.get_meter("connmeta", __version__)
        # Replaced whole by refresh, read by the reader thread's callbacks: a
        # reference swap, so a callback sees one refresh or the next, never half.
        self._snapshot: dict[str, _Samples] = {}
        self._instruments: set[str] = set()

    def refresh(self) -> None:
        """Collect the registry now (on the store's thread) for the next export."""
        snapshot: dict[str, _Samples] = {}
        for family in self._registry.collect():
            if family.type == "counter":
                suffix = "_total"  # its _created samples are not values
            elif family.type in ("gauge", "unknown"):
                suffix = ""
            else:
                continue  # histogram, summary, info, stateset: /metrics only
            samples = tuple(
                (dict(s.labels), s.value) for s in family.samples if s.name == family.name + suffix
            )
            snapshot[family.name] = samples
            if family.name not in self._instruments:
                self._instrument(family.name, family.type, family.documentation)
        self._snapshot = snapshot

    def _instrument(self, name: str, kind: str, description: str) -> None:
        self._instruments.add(name)

        def observe(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, attrs) for attrs, value in self._snapshot.get(name, ())]

        if kind == "counter":
            self._meter.create_observable_counter(
                name, callbacks=[observe], unit=_unit(name), description=description
            )
        else:
            self._meter.create_observable_gauge(
                name, callbacks=[observe], unit=_unit(name), description=description
            )

    def close(self, timeout: float = 5.0) -> None:
        """Export the last snapshot and stop, within ``timeout`` s (blocking: call
        it from a thread); a collector that does not answer is given up on."""
        finisher = threading.Thread(
            target=self._shutdown,
            args=(timeout,),
            name="connmeta-otlp-metrics-close",
            daemon=True,
        )
        finisher.start()
        finisher.join(timeout)
        if finisher.is_alive():
            log.warning(
                "OTLP metrics: the collector did not take the last export within %.1f s", timeout
            )

    def _shutdown(self, timeout: float) -> None:
        try:
            self._provider.shutdown(timeout_millis=timeout * 1000)
        except Exception as exc:  # the SDK raises when its readers ran out of time
            log.warning("OTLP metrics: the last export was not sent: %s", exc)


def _unit(name: str) -> str:
    """The UCUM unit of a Prometheus base-unit suffix (OpenTelemetry's mapping)."""
    if name.endswith("_seconds"):
        return "s"
    if name.endswith("_bytes"):
        return "By"
    return ""
