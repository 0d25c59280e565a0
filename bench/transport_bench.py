"""End-to-end benchmarks through gRPC: connmeta vs bare grpcio, same run.

Each server runs in its own process (so its CPU can be read from /proc) and
the load comes from this process over loopback TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from bench._harness import Process, batch, percentile, server
from bench._report import Figure, verdict
from connmeta import _ingest
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import report_service_pb2 as rs

BATCH = 500
WINDOW = 4  # report requests in flight, as the addon pipelines them


def _identity(data: bytes) -> bytes:
    return data


class Proxy:
    """The proxy's side of a report stream, sending pre-serialized batches."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        method = channel.stream_stream(
            "/connmeta.v1.ReportService/Report",
            request_serializer=_identity,
            response_deserializer=rs.ReportResponse.FromString,
        )
        self.call = method()
        self.revision = 0

    async def send(self, batches: list[bytes]) -> None:
        """Send every batch with WINDOW in flight; return when all are acknowledged."""
        acked = asyncio.Semaphore(WINDOW)
        pending = len(batches)
        done = asyncio.Event()

        async def read() -> None:
            nonlocal pending
            while pending:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    raise RuntimeError("report stream ended")
                assert isinstance(response, rs.ReportResponse)
                if response.WhichOneof("message") != "ack":
                    continue  # routing state and the like
                self.revision = response.ack.revision
                pending -= 1
                acked.release()
            done.set()

        reader = asyncio.create_task(read())
        for data in batches:
            await acked.acquire()
            await self.call.write(data)
        await done.wait()
        await reader


@dataclass
class Ingest:
    records_per_second: float
    server_cpu_us_per_record: float


async def ingest(kind: str, batches: int = 200, *, pure: bool = False) -> Ingest:
    """``pure``: connmeta's pure-Python ingest path (CONNMETA_PURE_PYTHON=1)."""
    payload = [batch(i * BATCH, BATCH, sequence=i + 1) for i in range(batches)]
    with _pure_python(pure):
        async with server(kind) as proc, grpc.aio.insecure_channel(proc.target) as channel:
            proxy = Proxy(channel)
            await proxy.send(payload[:4])  # warm up the stream and the store
            cpu = proc.cpu_seconds()
            start = time.perf_counter()
            await proxy.send(payload[4:])
            elapsed = time.perf_counter() - start
            records = (batches - 4) * BATCH
            return Ingest(records / elapsed, (proc.cpu_seconds() - cpu) / records * 1e6)


@contextlib.contextmanager
def _pure_python(on: bool) -> Iterator[None]:
    """CONNMETA_PURE_PYTHON=1 for the server processes started meanwhile."""
    saved = os.environ.get("CONNMETA_PURE_PYTHON")
    if on:
        os.environ["CONNMETA_PURE_PYTHON"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CONNMETA_PURE_PYTHON", None)
        else:
            os.environ["CONNMETA_PURE_PYTHON"] = saved


@dataclass
class FanOut:
    watchers: int
    events: int
    events_per_second: float
    lost: int
    p50_ms: float
    p99_ms: float
    server_cpu_us_per_delivery: float
    latencies: list[float] = field(default_factory=list, repr=False)
    ack_p50_ms: float = 0.0
    ack_p99_ms: float = 0.0


# The fan-out load: WRITERS report streams, each with FAN_WINDOW batches of
# FAN_BATCH in flight. One writer awaiting each 500-record ack (the load
# before issue 14) bounded both servers at the writer's pace; several
# streams keep the server busy instead, and small batches keep what is in
# flight (Little's law: latency ~ events in flight / throughput) near what
# a proxy sends, so delivery latency measures the server, not the load.
WRITERS = 4
FAN_BATCH = 100
FAN_WINDOW = 2
FIRST_INDEX = 10  # records 0-9: the warm-up batch
GOAL_RATE = 50_000  # events/s, issue 14: 10 watchers at >= 50k/s with delivery p99 <= 10 ms


def _slim_watch_response() -> Any:
    """WatchConnectionsResponse as the benchmark's watchers read it: each event's
    revision, its record left as bytes. One client process reads every event of
    every watcher, so decoding each record fully would make the client, not the
    server, the thing measured."""
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="bench/slim_watch.proto", package="bench.slim", syntax="proto3"
    )
    event = file.message_type.add(name="Event")
    event.field.add(name="revision", number=2, type=field.TYPE_INT64, label=field.LABEL_OPTIONAL)
    event.field.add(name="connection", number=3, type=field.TYPE_BYTES, label=field.LABEL_OPTIONAL)
    response = file.message_type.add(name="Response")
    response.field.add(
        name="events",
        number=1,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_REPEATED,
        type_name=".bench.slim.Event",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.slim.Response"))


_SlimWatchResponse = _slim_watch_response()


def record_index(connection: bytes) -> int:
    """The benchmark index of a record (``server_snapshot(index)``), from its id."""
    record = pb.ConnectionRecord.FromString(connection)
    conn = record.server.connection if record.HasField("server") else record.client.connection
    return int(conn.id[:8], 16)


class Load:
    """Pre-built report batches sent over several report streams at once.

    ``sent[i]`` is when batch i was handed to its stream (perf_counter_ns):
    latency is send -> delivered, per batch, whatever the records' stamps.
    """

    def __init__(self, events: int, *, size: int = FAN_BATCH, start: int = FIRST_INDEX) -> None:
        self.size = size
        self.start = start
        count = max(1, events // size)
        self.payload = [batch(start + i * size, size, sequence=i + 1) for i in range(count)]
        self.total = count * size
        self.sent = [0] * count
        self.acked = [0] * count  # when its ack was read: send -> ack is the ingest part

    def ack_ms(self, p: float) -> float:
        """Percentile ``p`` of send -> ack over the batches, in ms."""
        return percentile(
            [(a - s) / 1e6 for s, a in zip(self.sent, self.acked, strict=True) if a], p
        )

    def batch_of(self, index: int) -> int:
        return (index - self.start) // self.size

    async def send(
        self,
        channel: grpc.aio.Channel,
        *,
        writers: int = WRITERS,
        window: int = FAN_WINDOW,
        rate: float | None = None,
    ) -> None:
        """Every batch, batch i on stream i % writers; returns when all are acknowledged.

        With ``rate`` (events/s), batch i is not sent before start + i * size / rate
        (an open loop: latency at that load); without, as fast as acks allow.
        """
        interval = self.size / rate if rate else 0.0
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def stream(first: int) -> None:
            call = channel.stream_stream(
                "/connmeta.v1.ReportService/Report",
                request_serializer=_identity,
                response_deserializer=rs.ReportResponse.FromString,
            )()
            mine = range(first, len(self.payload), writers)
            credit = asyncio.Semaphore(window)
            # One proxy per stream (streams of one anonymous proxy would share it).
            hello = rs.ReportRequest(proxy_id=f"bench-{first}").SerializeToString()

            async def read() -> None:
                for i in mine:
                    while True:
                        response = await call.read()
                        if response is grpc.aio.EOF:
                            raise RuntimeError("report stream ended")
                        assert isinstance(response, rs.ReportResponse)
                        if response.WhichOneof("message") == "ack":
                            break
                    self.acked[i] = time.perf_counter_ns()
                    credit.release()

            reader = asyncio.create_task(read())
            for i in mine:
                await credit.acquire()
                if interval:
                    due = start + i * interval - loop.time()
                    if due > 0:
                        await asyncio.sleep(due)
                self.sent[i] = time.perf_counter_ns()
                await call.write(hello + self.payload[i] if i == first else self.payload[i])
            await reader
            await call.done_writing()

        await asyncio.gather(*(stream(w) for w in range(writers)))


async def _watcher(
    channel: grpc.aio.Channel, after: int, load: Load, latencies: list[float]
) -> int:
    """Read until the load's last revision; returns how many revisions were missing.

    Exact about loss without touching every event: an unfiltered watch sends
    one event per revision in order, so a response is complete when it starts
    right after the previous one and holds last - first + 1 events. Latency
    is taken per response, for the oldest batch it holds (its first event):
    the worst of the response, send -> read.
    """
    method = channel.unary_stream(
        "/connmeta.v1.ConnectionService/WatchConnections",
        request_serializer=cs.WatchConnectionsRequest.SerializeToString,
        response_deserializer=_SlimWatchResponse.FromString,
    )
    call = method(cs.WatchConnectionsRequest(start_after_revision=after))
    until = after + load.total
    expected = after + 1
    lost = 0
    sent = load.sent
    async for response in call:
        now = time.perf_counter_ns()
        events = response.events
        first, last = events[0], events[-1]
        first_revision, last_revision = first.revision, last.revision
        if first_revision != expected:
            lost += abs(first_revision - expected)
        lost += abs(last_revision - first_revision + 1 - len(events))
        expected = last_revision + 1
        if first.connection:
            latencies.append((now - sent[load.batch_of(record_index(first.connection))]) / 1e6)
        if expected > until:
            call.cancel()
            break
    return lost


async def fan_out(kind: str, watchers: int, events: int, rate: float | None = None) -> FanOut:
    """``watchers`` unfiltered watches while ``events`` records are reported.

    Without ``rate`` every batch is sent as fast as acks come back: the
    servers queue what their watchers have not taken yet (connmeta's lag
    bound is lifted for it; bare's queues are unbounded), and events/s is
    what they deliver to every watcher. With ``rate``, an open loop at that
    load: the latency figures are the ones to read.
    """
    load = Load(events)
    args = ["--watch-max-lag", str(10 * load.total)] if kind == "connmeta" else []
    async with server(kind, *args) as proc, grpc.aio.insecure_channel(proc.target) as channel:
        proxy = Proxy(channel)
        await proxy.send([batch(0, FIRST_INDEX, sequence=1)])
        await proxy.call.done_writing()
        after = proxy.revision
        latencies: list[float] = []
        readers = [
            asyncio.create_task(_watcher(channel, after, load, latencies)) for _ in range(watchers)
        ]
        await asyncio.sleep(0.5)  # every watcher registered
        cpu = proc.cpu_seconds()
        start = time.perf_counter()
        await load.send(channel, rate=rate)
        lost = sum(await asyncio.gather(*readers))
        elapsed = time.perf_counter() - start
        deliveries = load.total * watchers
        return FanOut(
            watchers,
            load.total,
            load.total / elapsed,
            lost,
            percentile(latencies, 50),
            percentile(latencies, 99),
            (proc.cpu_seconds() - cpu) / max(1, deliveries) * 1e6,
            latencies,
            load.ack_ms(50),
            load.ack_ms(99),
        )


async def best_fan_out(
    watchers: int, events: int, rounds: int, rate: float | None = None
) -> tuple[FanOut, FanOut]:
    """connmeta and bare, interleaved, ``rounds`` each; the best round of each
    (the fastest, or with ``rate`` the lowest p99: noise only ever adds)."""
    ours: list[FanOut] = []
    bare: list[FanOut] = []
    for _ in range(rounds):
        ours.append(await fan_out("connmeta", watchers, events, rate))
        bare.append(await fan_out("bare", watchers, events, rate))

    def best(runs: list[FanOut]) -> FanOut:
        if rate:
            return min(runs, key=lambda r: r.p99_ms)
        return max(runs, key=lambda r: r.events_per_second)

    return best(ours), best(bare)


async def unary_get(kind: str, calls: int = 3000) -> float:
    """Sequential GetConnection calls per second for one stored record."""
    async with server(kind) as proc, grpc.aio.insecure_channel(proc.target) as channel:
        proxy = Proxy(channel)
        await proxy.send([batch(0, 1, sequence=1)])
        request = cs.GetConnectionRequest(id=f"{0:08x}-0000-4000-8000-{0:012x}")
        get = channel.unary_unary(
            "/connmeta.v1.ConnectionService/GetConnection",
            request_serializer=cs.GetConnectionRequest.SerializeToString,
            response_deserializer=cs.GetConnectionResponse.FromString,
        )
        for _ in range(200):
            await get(request)
        start = time.perf_counter()
        for _ in range(calls):
            await get(request)
        return calls / (time.perf_counter() - start)


__all__ = ["FanOut", "Ingest", "Load", "Process", "best_fan_out", "fan_out", "ingest", "unary_get"]


COMMAND = ".venv/bin/python -m bench transport"


async def _figures(quick: bool) -> list[Figure]:
    scale = 0.2 if quick else 1.0
    out: list[Figure] = []
    # Interleaved rounds, best of each: the machine is shared and noisy.
    runs: dict[str, list[Ingest]] = {"ours": [], "bare": [], "pure": []}
    for _ in range(1 if quick else 2):
        runs["ours"].append(await ingest("connmeta", int(200 * scale)))
        runs["bare"].append(await ingest("bare", int(200 * scale)))
        runs["pure"].append(await ingest("connmeta", int(100 * scale), pure=True))
    ours, bare, pure = (
        Ingest(
            max(r.records_per_second for r in results),
            min(r.server_cpu_us_per_record for r in results),
        )
        for results in (runs["ours"], runs["bare"], runs["pure"])
    )
    ratio = ours.records_per_second / bare.records_per_second
    path = _ingest.implementation()
    out.append(
        Figure(
            f"batched ingest (500/batch), records/s; ingest path {path}",
            f"{ours.records_per_second:,.0f}/s",
            f"{bare.records_per_second:,.0f}/s (bare grpcio)",
            f"{ratio:.2f}",
            verdict(ratio, 0.25, higher_is_better=True, unit="x"),
            COMMAND,
        )
    )
    out.append(
        Figure(
            "batched ingest, server CPU per record",
            f"{ours.server_cpu_us_per_record:.2f} µs",
            f"{bare.server_cpu_us_per_record:.2f} µs (bare grpcio)",
            f"{ours.server_cpu_us_per_record / bare.server_cpu_us_per_record:.1f}",
            verdict(ours.server_cpu_us_per_record, 2.5, higher_is_better=False, unit=" µs"),
            COMMAND,
        )
    )
    out.append(
        Figure(
            "batched ingest, pure-Python path (CONNMETA_PURE_PYTHON=1): records/s, "
            f"server CPU {pure.server_cpu_us_per_record:.2f} µs/record",
            f"{pure.records_per_second:,.0f}/s",
            f"{bare.records_per_second:,.0f}/s (bare grpcio)",
            f"{pure.records_per_second / bare.records_per_second:.2f}",
            "",
            COMMAND,
        )
    )
    rounds = 1 if quick else 2
    for watchers, events in ((10, 50_000), (100, 20_000)):
        o, b = await best_fan_out(watchers, int(events * scale), rounds=rounds)
        ratio = o.events_per_second / b.events_per_second
        out.append(
            Figure(
                f"watch fan-out, {watchers} watchers, events/s delivered to every watcher "
                f"({WRITERS} report streams x {FAN_WINDOW} batches of {FAN_BATCH} in flight, "
                f"as fast as the server takes them; lost {o.lost}, bare {b.lost}; server CPU "
                f"per delivery {o.server_cpu_us_per_delivery:.2f} µs, bare "
                f"{b.server_cpu_us_per_delivery:.2f})",
                f"{o.events_per_second:,.0f}/s",
                f"{b.events_per_second:,.0f}/s (bare grpcio)",
                f"{ratio:.2f}",
                verdict(o.events_per_second, GOAL_RATE, higher_is_better=True, unit="/s")
                if watchers == 10
                else verdict(ratio, 0.9, higher_is_better=True, unit="x"),
                COMMAND,
            )
        )
    # Latency at the goal's load: an open loop at GOAL_RATE, so queues only
    # grow if the server cannot keep up. The report ack (send -> ack: the
    # ingest path) beside it says how much of the delivery latency is the
    # fan-out's own.
    o, b = await best_fan_out(10, int(50_000 * scale), rounds=rounds, rate=GOAL_RATE)
    out.append(
        Figure(
            f"watch fan-out, 10 watchers at {GOAL_RATE:,} events/s offered: delivery latency "
            "p50 / p99 (report sent -> watcher read; in parentheses the report's send -> ack)",
            f"{o.p50_ms:.1f} / {o.p99_ms:.1f} ms ({o.ack_p50_ms:.1f} / {o.ack_p99_ms:.1f}); "
            f"{o.events_per_second:,.0f} events/s",
            f"{b.p50_ms:.1f} / {b.p99_ms:.1f} ms ({b.ack_p50_ms:.1f} / {b.ack_p99_ms:.1f}); "
            f"{b.events_per_second:,.0f} events/s (bare grpcio)",
            f"{o.p99_ms / b.p99_ms:.2f}",
            verdict(o.p99_ms, 10, higher_is_better=False, unit=" ms"),
            COMMAND,
        )
    )
    calls = int(3000 * scale)
    o_get, b_get = await unary_get("connmeta", calls), await unary_get("bare", calls)
    out.append(
        Figure(
            "unary GetConnection, calls/s",
            f"{o_get:,.0f}/s",
            f"{b_get:,.0f}/s (bare unary echo)",
            f"{o_get / b_get:.2f}",
            verdict(o_get / b_get, 0.85, higher_is_better=True, unit="x"),
            COMMAND,
        )
    )
    return out


def figures(quick: bool) -> list[Figure]:
    """connmeta and bare grpcio through gRPC, side by side (see bench/_report.py)."""
    return asyncio.run(_figures(quick))
