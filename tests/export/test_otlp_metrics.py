"""The Prometheus registry bridged to OpenTelemetry metrics: same values, read on one thread."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from connmeta.export.otlp_metrics import OtlpMetrics


class ThreadRecorder(Collector):
    """A collector that notes the thread each collect() runs on."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.value = 1.0

    def collect(self) -> Iterable[Metric]:
        self.threads.append(threading.get_ident())
        yield GaugeMetricFamily("store_like", "reads what one thread owns", value=self.value)


def _points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], float, Any]]]:
    """name -> [(attributes, value, metric data)] of one collection."""
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, list[tuple[dict[str, Any], float, Any]]] = {}
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                out[metric.name] = [
                    (dict(p.attributes or {}), p.value, metric.data)  # type: ignore[union-attr]
                    for p in metric.data.data_points
                ]
    return out


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_gauges_and_counters_are_reported_with_their_labels_as_attributes(
    registry: CollectorRegistry,
) -> None:
    gauge = Gauge("demo_connections", "g", ["kind", "state"], registry=registry)
    gauge.labels("server", "open").set(2)
    gauge.labels("client", "closed").set(5)
    counter = Counter("demo_snapshots_total", "c", ["proxy"], registry=registry)
    counter.labels("p1").inc(7)
    Histogram("demo_wait_seconds", "h", registry=registry).observe(0.1)
    reader = InMemoryMetricReader()
    bridge = OtlpMetrics(registry, reader=reader)
    bridge.refresh()

    points = _points(reader)
    assert sorted((a["kind"], a["state"], v) for a, v, _ in points["demo_connections"]) == [
        ("client", "closed", 5),
        ("server", "open", 2),
    ]
    # OpenTelemetry names a counter without _total; a cumulative, monotonic sum.
    [(attrs, value, data)] = points["demo_snapshots"]
    assert (attrs, value) == ({"proxy": "p1"}, 7)
    assert data.is_monotonic
    assert "demo_snapshots_total" not in points
    # Buckets cannot go through an observable instrument: histograms stay on /metrics.
    assert not any(name.startswith("demo_wait") for name in points)
    bridge.close()


def test_an_export_reads_the_last_refresh_not_the_registry(registry: CollectorRegistry) -> None:
    recorder = ThreadRecorder()
    registry.register(recorder)
    reader = InMemoryMetricReader()
    bridge = OtlpMetrics(registry, reader=reader)
    bridge.refresh()
    recorder.value = 42.0  # changed in the store, not refreshed yet

    collected: list[dict[str, list[tuple[dict[str, Any], float, Any]]]] = []
    exporter_thread = threading.Thread(target=lambda: collected.append(_points(reader)))
    exporter_thread.start()
    exporter_thread.join(10)
    # The export (another thread) did not run the collector: it saw the snapshot.
    assert recorder.threads == [threading.get_ident()]
    assert [v for _, v, _ in collected[0]["store_like"]] == [1.0]

    bridge.refresh()
    assert [v for _, v, _ in _points(reader)["store_like"]] == [42.0]
    bridge.close()


def test_families_that_appear_later_get_an_instrument(registry: CollectorRegistry) -> None:
    reader = InMemoryMetricReader()
    bridge = OtlpMetrics(registry, reader=reader)
    bridge.refresh()
    Gauge("demo_late", "appears after the first refresh", registry=registry).set(3)
    bridge.refresh()
    assert [v for _, v, _ in _points(reader)["demo_late"]] == [3]
    bridge.close()
