"""The OTLP pipeline: one record per change, off the write path, every loss counted."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import (
    InMemoryLogRecordExporter,
    LogRecordExporter,
    LogRecordExportResult,
)

from connmeta.export.otlp import OtlpExport
from connmeta.store import Store
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs
from tests import factories


@pytest.fixture(autouse=True)
def _fast_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK's default is a batch a second; tests should not wait for it.
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "20")


class BlockedExporter(LogRecordExporter):
    """A collector that does not answer until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.received = 0

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        self.release.wait(30)
        self.received += len(batch)
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _wait(predicate: object, within: float = 10.0) -> None:
    assert callable(predicate)
    end = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _snapshots(n: int) -> list[rs.ConnectionSnapshot]:
    return [factories.client() for _ in range(n)]


def _ingest(store: Store, snapshots: list[rs.ConnectionSnapshot]) -> tuple[float, float]:
    """Seconds to apply ``snapshots`` one per write, as report batches of 1 arrive:
    wall clock, and CPU of this thread (what the write path itself costs, whatever
    else the machine runs)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for snap in snapshots:
        store.apply([snap])
    return time.perf_counter() - wall, time.thread_time() - cpu


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (bound, never listening: refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_every_change_becomes_one_event_with_the_service_resource(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
    store = Store()
    memory = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    export = OtlpExport(store.subscribe, exporter=memory, incarnation=store.incarnation)
    client = factories.client()
    id = client.client.connection.id
    store.apply([client])
    closed = factories.client(
        id, state=pb.CONNECTION_STATE_CLOSED, hook=pb.HOOK_CLIENT_DISCONNECTED
    )
    store.apply([closed])
    _wait(lambda: export.exported == 2)
    export.close()
    records = [r.log_record for r in memory.get_finished_logs()]
    assert [r.event_name for r in records] == [
        "connmeta.connection.added",
        "connmeta.connection.modified",
    ]
    assert [r.attributes["connmeta.connection.state"] for r in records] == ["open", "closed"]  # type: ignore[index]
    resource = memory.get_finished_logs()[0].resource.attributes
    assert resource["service.name"] == "connmeta"
    assert resource["connmeta.store.incarnation"] == store.incarnation
    assert resource["deployment.environment.name"] == "test"
    assert export.dropped_total == 0


def test_otel_service_name_wins_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-proxy-sidecar")
    store = Store()
    memory = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    export = OtlpExport(store.subscribe, exporter=memory)
    store.apply([factories.client()])
    _wait(lambda: export.exported == 1)
    export.close()
    assert memory.get_finished_logs()[0].resource.attributes["service.name"] == (
        "edge-proxy-sidecar"
    )


def test_slow_collector_costs_bounded_queues_and_counted_drops_not_ingest_speed() -> None:
    snapshots = _snapshots(7000)

    def without_export() -> tuple[float, float]:
        store = Store()
        _ingest(store, snapshots[:1000])
        return _ingest(store, snapshots[1000:3000])

    base_wall, base_cpu = map(min, zip(*(without_export() for _ in range(3)), strict=True))

    store = Store()
    collector = BlockedExporter()
    export = OtlpExport(store.subscribe, exporter=collector, queue_size=200)
    _ingest(store, snapshots[:1000])  # fill both queues and block the exporter
    runs = [_ingest(store, snapshots[i : i + 2000]) for i in (1000, 3000, 5000)]
    wall, cpu = map(min, zip(*runs, strict=True))
    # The write path only appends to a deque: it never waits for the collector
    # (a listener that did would take the exporter's 30 s here) and costs the
    # store next to nothing.
    assert wall < base_wall * 3 + 0.2, (wall, base_wall)
    assert cpu < base_cpu * 1.3 + 0.01, (cpu, base_cpu)
    # At most 200 waiting for conversion, 200 in the SDK and one batch (<= 200)
    # at the exporter: everything beyond is dropped and counted.
    assert export.dropped["queue_full"] >= 7000 - 600
    assert export.pending <= 600
    collector.release.set()
    _wait(lambda: export.pending == 0)
    assert export.exported + export.dropped_total == 7000
    assert collector.received == export.exported
    export.close()


def test_absent_collector_fails_batches_counted_and_close_is_bounded(closed_port: int) -> None:
    store = Store()
    exporter = OTLPLogExporter(endpoint=f"http://127.0.0.1:{closed_port}", timeout=0.3)
    export = OtlpExport(store.subscribe, exporter=exporter, queue_size=50)
    _ingest(store, _snapshots(500))
    _wait(lambda: export.dropped["export_failed"] > 0)
    assert export.exported == 0
    assert export.dropped["queue_full"] > 0
    start = time.monotonic()
    export.close(timeout=1.0)
    assert time.monotonic() - start < 2.0


def test_standard_endpoint_variable_alone_turns_export_on(
    monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    from connmeta.server import Config, _start_otlp

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert _start_otlp(Config(), Store()) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    export = _start_otlp(Config(), Store())
    assert export is not None
    export.close(timeout=1.0)
