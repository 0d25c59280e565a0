"""OTLP export of connection changes: a store subscriber, off the write path.

The store calls ``OtlpExport._on_change`` inside each write; it only appends
the change to a bounded queue (or counts it dropped when the queue is full)
and returns. A thread of its own turns queued changes into OpenTelemetry
Events (``connmeta.export.otel_events``) and emits them to the SDK's
``BatchLogRecordProcessor`` and ``OTLPLogExporter`` (gRPC), which batch,
retry with backoff and send in their own thread. A slow or absent collector
therefore costs two bounded queues and a drop counter, and never blocks the
store, the event loop or the watchers.

The SDK's queue drops the oldest record silently (a log line, no count) when
it is full. To count every loss, the converter thread never lets it fill:
it emits only while fewer than ``queue_size`` records wait in the SDK, and
otherwise waits, so the changes pile up in the first queue, where the
listener counts what does not fit (``dropped["queue_full"]``). Records the
exporter gave up on after its retries are ``dropped["export_failed"]``.

Configuration is OpenTelemetry's own where it has one: the endpoint
(``--otlp-endpoint``, else ``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT``; ``http://`` for plaintext),
``OTEL_EXPORTER_OTLP_HEADERS``/``_CERTIFICATE``/``_TIMEOUT``/``_COMPRESSION``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES`` (both win over the
defaults ``service.name=connmeta``), ``OTEL_BLRP_SCHEDULE_DELAY`` and
``OTEL_BLRP_MAX_QUEUE_SIZE`` (the size of each of the two queues) and
``OTEL_BLRP_MAX_EXPORT_BATCH_SIZE``.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    LogRecordExporter,
    LogRecordExportResult,
)
from opentelemetry.sdk.resources import OTELResourceDetector, Resource

from connmeta import __version__
from connmeta.export.otel_events import to_otel_event
from connmeta.records import Event

__all__ = ["DEFAULT_QUEUE_SIZE", "DROP_REASONS", "OtlpExport"]

log = logging.getLogger("connmeta.export.otlp")

DEFAULT_QUEUE_SIZE: Final = 2048
"""Changes waiting for conversion, and records waiting for export, at most each."""

DROP_REASONS: Final = ("queue_full", "export_failed")
"""The values of ``dropped``'s keys (the ``reason`` label of connmeta_otlp_dropped_total)."""

_DEFAULT_BATCH: Final = 512  # the SDK's default batch size
# How long the converter sleeps at most between checks for room in the SDK's
# queue, and how long it waits for changes when idle (a change wakes it).
_ROOM_POLL: Final = 0.05
_IDLE_WAIT: Final = 1.0


class _CountingExporter(LogRecordExporter):
    """The real exporter, counting what the batch processor took out of its queue.

    Only the processor's worker (or a flush, under the processor's export
    lock) calls ``export``, so each count has one writer at a time.
    """

    def __init__(self, inner: LogRecordExporter, room: threading.Event) -> None:
        self.inner = inner
        self.taken = 0
        self.exported = 0
        self.failed = 0
        self._room = room

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        self.taken += len(batch)
        self._room.set()
        try:
            result = self.inner.export(batch)
        except Exception:
            log.exception("OTLP export of %d records failed", len(batch))
            result = LogRecordExportResult.FAILURE
        if result is LogRecordExportResult.SUCCESS:
            self.exported += len(batch)
        else:
            self.failed += len(batch)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


class OtlpExport:
    """Sends every change of ``store`` as an OTLP log record (an Event).

    ``subscribe`` is the store's (``Store.subscribe``). ``exporter`` replaces
    the OTLP/gRPC exporter (tests). Call ``close`` to flush and stop.
    """

    def __init__(
        self,
        subscribe: Callable[[Callable[[Sequence[Event]], None]], Callable[[], None]],
        *,
        endpoint: str = "",
        incarnation: str = "",
        queue_size: int | None = None,
        exporter: LogRecordExporter | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if queue_size is None:
            queue_size = int(os.environ.get("OTEL_BLRP_MAX_QUEUE_SIZE") or DEFAULT_QUEUE_SIZE)
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.queue_size = queue_size
        self._clock_ns = clock_ns
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

            # None: the SDK reads OTEL_EXPORTER_OTLP_(LOGS_)ENDPOINT itself.
            exporter = OTLPLogExporter(endpoint=endpoint or None)
        self._room = threading.Event()
        self._exporter = _CountingExporter(exporter, self._room)
        batch = int(os.environ.get("OTEL_BLRP_MAX_EXPORT_BATCH_SIZE") or _DEFAULT_BATCH)
        self._processor = BatchLogRecordProcessor(
            self._exporter, max_queue_size=queue_size, max_export_batch_size=min(batch, queue_size)
        )
        # shutdown_on_exit=False: close() shuts it down within its bound; an atexit
        # hook would wait out the exporter's retries instead.
        self._provider = LoggerProvider(resource=_resource(incarnation), shutdown_on_exit=False)
        self._provider.add_log_record_processor(self._processor)
        self._logger = self._provider.get_logger("connmeta", __version__)
        # The first queue: (when the store made the change, its events).
        # ``_queued_in`` is written by the store's thread only, ``_queued_out``
        # by the converter only: their difference is the queue's length in
        # events, without a lock on the write path.
        self._queue: collections.deque[tuple[int, Sequence[Event]]] = collections.deque()
        self._queued_in = 0
        self._queued_out = 0
        self._emitted = 0
        self._queue_full = 0
        self._wake = threading.Event()
        self._stopping = False
        self._abandon = False
        self._unsubscribe = subscribe(self._on_change)
        self._thread = threading.Thread(target=self._run, name="connmeta-otlp", daemon=True)
        self._thread.start()

    # -- counters ------------------------------------------------------------

    @property
    def dropped(self) -> dict[str, int]:
        """Changes lost, by reason: ``queue_full`` (the collector was too slow or
        absent for too long) and ``export_failed`` (the exporter gave up)."""
        return {"queue_full": self._queue_full, "export_failed": self._exporter.failed}

    @property
    def dropped_total(self) -> int:
        """Every change lost: connmeta_otlp_dropped_total."""
        return self._queue_full + self._exporter.failed

    @property
    def exported(self) -> int:
        """Records the collector accepted."""
        return self._exporter.exported

    @property
    def pending(self) -> int:
        """Changes queued or in the SDK, neither exported nor dropped yet."""
        waiting = self._queued_in - self._queued_out
        in_sdk = self._emitted - self._exporter.exported - self._exporter.failed
        return waiting + in_sdk

    # -- the write path ------------------------------------------------------

    def _on_change(self, events: Sequence[Event]) -> None:
        """The store's listener: queue and return, never block or raise."""
        room = self.queue_size - (self._queued_in - self._queued_out)
        if room < len(events):
            self._queue_full += len(events) - max(room, 0)
            if room <= 0:
                return
            events = events[:room]
        self._queued_in += len(events)
        self._queue.append((self._clock_ns(), events))
        if not self._wake.is_set():
            self._wake.set()

    # -- the converter thread ------------------------------------------------

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait(_IDLE_WAIT)
            self._wake.clear()
            while queue:
                when, events = queue[0]
                for event in events:
                    if not self._wait_for_room():
                        return
                    self._emit(event, when)
                queue.popleft()
                self._queued_out += len(events)
            if self._stopping:
                return

    def _wait_for_room(self) -> bool:
        """Until the SDK's queue has room for one more record; False when closing
        gave up on waiting (the rest stays queued and is not sent)."""
        while self._emitted - self._exporter.taken >= self.queue_size:
            self._room.clear()
            if self._emitted - self._exporter.taken < self.queue_size:
                break
            if self._abandon:
                return False
            self._room.wait(_ROOM_POLL)
        return True

    def _emit(self, event: Event, when_ns: int) -> None:
        try:
            otel = to_otel_event(event, when_ns)
        except Exception:  # a record this code cannot describe must not stop the export
            log.exception("cannot describe %r as an OpenTelemetry event; skipped", event)
            return
        self._logger.emit(
            LogRecord(
                timestamp=otel.timestamp_ns,
                severity_number=SeverityNumber(otel.severity_number),
                severity_text=otel.severity_text,
                body=otel.body,
                attributes=otel.attributes,
                event_name=otel.name,
            )
        )
        self._emitted += 1

    # -- lifecycle -----------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening, send what is queued, shut the SDK down; at most ``timeout`` s.

        Blocking: call it from a thread (``Sidecar.stop`` does). What is not
        sent by then (the collector is absent or too slow) is abandoned, and
        the rest of the shutdown goes on in a daemon thread.
        """
        self._unsubscribe()
        self._stopping = True
        self._wake.set()
        finisher = threading.Thread(target=self._finish, name="connmeta-otlp-close", daemon=True)
        finisher.start()
        finisher.join(timeout)
        if finisher.is_alive():
            self._abandon = True
            self._room.set()
            log.warning(
                "OTLP export: the collector did not take the last changes within %.1f s; "
                "%d abandoned",
                timeout,
                self.pending,
            )

    def _finish(self) -> None:
        self._thread.join()
        self._provider.shutdown()


def _resource(incarnation: str) -> Resource:
    """service.name=connmeta and the version, under OTEL_SERVICE_NAME and
    OTEL_RESOURCE_ATTRIBUTES (``Resource.create`` lets its argument win over
    them; the environment is merged again on top so that the operator's word
    is the last)."""
    defaults: dict[str, str] = {"service.name": "connmeta", "service.version": __version__}
    if incarnation:
        defaults["connmeta.store.incarnation"] = incarnation
    return Resource.create(defaults).merge(OTELResourceDetector().detect())
