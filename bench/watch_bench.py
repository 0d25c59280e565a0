"""Filtered watches through gRPC: what a change costs the server per watcher.

Issue 14, goal 4: with 1,000 watchers holding 100 distinct filters (kind,
states, client id, exact host, ``*.suffix`` host, SNI, port and mixtures),
print the server's CPU per delivered event, and show that a change no
filter matches costs O(1) per watcher at most: server CPU per reported
event with 0, 1, 10, 100 and 1,000 watchers whose filters match nothing.
The hub groups watchers by equal Filter and looks filters up in an index
(``connmeta.filters.FilterIndex``), so the second figure should not grow
with the number of watchers at all.

The load is transport_bench's (several report streams, small batches), the
records ``bench._harness.server_snapshot``'s: server connections to
``host{i % 1000}.example.com`` (also their SNI), client ``client-{i % 5000}``,
port 443, OPEN.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from bench._harness import server
from bench._report import Figure, verdict
from bench.transport_bench import FIRST_INDEX, Load, Proxy, _SlimWatchResponse, record_index
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs

COMMAND = ".venv/bin/python -m bench watch"
SERVER = cs.CONNECTION_KIND_SERVER
CLIENT = cs.CONNECTION_KIND_CLIENT
OPEN = pb.CONNECTION_STATE_OPEN
CLOSED = pb.CONNECTION_STATE_CLOSED
STREAMS_PER_CHANNEL = 100
# The first bookmark tells a watch is registered; the next come 2 s later,
# after the load (well under a second): they cost the measured run nothing.
SERVER_ARGS = (
    "--max-watchers",
    "2000",
    "--max-streams-per-principal",
    "2000",
    "--bookmark-interval",
    "2",
)


@dataclass(frozen=True)
class Spec:
    """A filter, and the benchmark records it matches: index % modulus == residue
    (``modulus`` 0: none)."""

    filter: cs.ConnectionFilter
    modulus: int = 0
    residue: int = 0

    def matches(self, index: int) -> bool:
        return bool(self.modulus) and index % self.modulus == self.residue


def unmatched(count: int) -> list[Spec]:
    """``count`` distinct filters, of every kind of condition, that no record matches."""
    shapes: list[Callable[[int], cs.ConnectionFilter]] = [
        lambda k: cs.ConnectionFilter(client_id=f"nobody-{k}"),
        lambda k: cs.ConnectionFilter(host=f"host{k}.example.org"),
        lambda k: cs.ConnectionFilter(host=f"*.zone{k}.example.com"),
        lambda k: cs.ConnectionFilter(sni=f"sni{k}.example.net"),
        lambda k: cs.ConnectionFilter(sni=f"*.zone{k}.example.net"),
        lambda k: cs.ConnectionFilter(port=1000 + k),
        lambda k: cs.ConnectionFilter(kind=CLIENT, port=2000 + k),
        lambda k: cs.ConnectionFilter(states=[CLOSED], host="*.example.com", port=3000 + k),
        lambda k: cs.ConnectionFilter(kind=SERVER, states=[CLOSED], client_id=f"client-{k}"),
        lambda k: cs.ConnectionFilter(kind=CLIENT, host=f"host{k}.example.com"),
    ]
    return [Spec(shapes[i % len(shapes)](i)) for i in range(count)]


def mixed() -> list[Spec]:
    """100 distinct filters: one that every record matches, 40 that match about
    one record in 1,000 to 5,000 each (exact host, SNI, client id, mixtures),
    the rest nothing: what a fleet of dashboards might hold."""
    specs = [Spec(cs.ConnectionFilter(host="*.example.com", port=443, states=[OPEN]), 1, 0)]
    for k in range(15):
        specs.append(Spec(cs.ConnectionFilter(host=f"host{k * 61}.example.com"), 1000, k * 61))
    for k in range(10):
        flt = cs.ConnectionFilter(sni=f"HOST{k * 67 + 1}.example.com", kind=SERVER)
        specs.append(Spec(flt, 1000, k * 67 + 1))
    for k in range(10):
        specs.append(Spec(cs.ConnectionFilter(client_id=f"client-{k * 487}"), 5000, k * 487))
    for k in range(5):
        flt = cs.ConnectionFilter(client_id=f"client-{k * 13 + 7}", states=[OPEN], port=443)
        specs.append(Spec(flt, 5000, k * 13 + 7))
    specs.extend(unmatched(100 - len(specs)))
    return specs


@dataclass
class Run:
    watchers: int
    events: int
    delivered: int
    seconds: float
    server_cpu: float  # seconds, while the load ran and was delivered

    @property
    def cpu_us_per_event(self) -> float:
        return self.server_cpu / self.events * 1e6

    @property
    def cpu_us_per_delivery(self) -> float:
        return self.server_cpu / max(1, self.delivered) * 1e6


async def _watch(
    channel: grpc.aio.Channel,
    after: int,
    spec: Spec,
    expected: int,
    registered: asyncio.Queue[None],
    done: asyncio.Event,
) -> int:
    """Read ``expected`` events (what ``spec`` matches of the load), or until ``done``
    when it matches nothing; returns how many came.

    The first BOOKMARK (``--bookmark-interval`` after the watch started) tells
    that the server has registered the watch; the load starts once every
    watcher has had one.
    """
    call = channel.unary_stream(
        "/connmeta.v1.ConnectionService/WatchConnections",
        request_serializer=cs.WatchConnectionsRequest.SerializeToString,
        response_deserializer=_SlimWatchResponse.FromString,
    )(
        cs.WatchConnectionsRequest(
            start_after_revision=after, filter=spec.filter, allow_bookmarks=True
        )
    )
    seen = 0
    first = True
    reader = aiter(call)
    try:
        while seen < expected or first:
            response = await anext(reader)
            seen += sum(1 for event in response.events if event.connection)
            if first:
                first = False
                registered.put_nowait(None)
        if not expected:
            await done.wait()
    finally:
        call.cancel()
    return seen


async def run(specs: list[Spec], watchers: int, events: int) -> Run:
    """``watchers`` watches (watcher i: ``specs[i % len(specs)]``) while ``events`` are reported."""
    load = Load(events)
    indices = range(FIRST_INDEX, FIRST_INDEX + load.total)
    expected = [sum(map(spec.matches, indices)) for spec in specs]
    registered: asyncio.Queue[None] = asyncio.Queue()
    done = asyncio.Event()
    async with server("connmeta", *SERVER_ARGS) as proc:
        channels = [
            grpc.aio.insecure_channel(proc.target)
            for _ in range(1 + -(-watchers // STREAMS_PER_CHANNEL))
        ]
        try:
            proxy = Proxy(channels[0])
            await proxy.send([_warm_up()])
            await proxy.call.done_writing()
            after = proxy.revision
            tasks = [
                asyncio.create_task(
                    _watch(
                        channels[1 + i // STREAMS_PER_CHANNEL],
                        after,
                        specs[i % len(specs)],
                        expected[i % len(specs)],
                        registered,
                        done,
                    )
                )
                for i in range(watchers)
            ]
            for _ in range(watchers):
                await registered.get()
            await asyncio.sleep(0.2)  # the bookmarks' writes done
            cpu = proc.cpu_seconds()
            start = time.perf_counter()
            await load.send(channels[0])
            done.set()
            delivered = sum(await asyncio.gather(*tasks))
            elapsed = time.perf_counter() - start
            server_cpu = proc.cpu_seconds() - cpu
        finally:
            for channel in channels:
                await channel.close()
    return Run(watchers, load.total, delivered, elapsed, server_cpu)


def _warm_up() -> bytes:
    from bench._harness import batch

    return batch(0, FIRST_INDEX, sequence=1)


# Only to keep record_index importable from here for ad-hoc checks.
__all__ = ["Run", "Spec", "mixed", "record_index", "run", "unmatched"]


async def _figures(quick: bool) -> list[Figure]:
    events = 4_000 if quick else 20_000
    rounds = 1 if quick else 2
    out: list[Figure] = []
    # CPU per reported event vs watchers whose filters match nothing; interleaved
    # rounds, the lowest CPU of each (noise only ever adds).
    counts = (0, 1, 10, 100, 1000)
    best: dict[int, float] = {}
    for _ in range(rounds):
        for watchers in counts:
            result = await run(unmatched(100), watchers, events)
            assert result.delivered == 0
            cpu = result.cpu_us_per_event
            best[watchers] = min(best.get(watchers, cpu), cpu)
    # Per watcher: the slope from 10 watchers (every bucket family of the
    # index in use from there on, so the record's host and SNI are read) to
    # 1,000. Matching each watcher alone cost ~520 ns per watcher per event
    # (before issue 14: 36.5 -> 555.5 µs per event from 10 to 1,000 watchers).
    per_watcher_ns = (best[1000] - best[10]) / 990 * 1e3
    out.append(
        Figure(
            "filtered watch, events matching no filter: server CPU per reported event with "
            "0 / 1 / 10 / 100 / 1,000 watchers (100 distinct filters); ratio: per watcher "
            "and event, from 10 to 1,000 watchers",
            " / ".join(f"{best[w]:.1f}" for w in counts) + " µs",
            f"{best[0]:.1f} µs (no watcher)",
            f"{per_watcher_ns:+.1f} ns",
            verdict(per_watcher_ns, 10, higher_is_better=False, unit=" ns per watcher"),
            COMMAND,
        )
    )
    mix = await run(mixed(), 1000, events)
    alone = await run(mixed(), 0, events)
    out.append(
        Figure(
            "filtered watch, 1,000 watchers with 100 distinct filters (mixed; "
            f"{mix.delivered:,} deliveries of {mix.events:,} events): server CPU per delivered "
            "event (all server CPU beyond ingest / deliveries)",
            f"{(mix.server_cpu - alone.server_cpu) / max(1, mix.delivered) * 1e6:.2f} µs",
            f"{mix.cpu_us_per_event:.1f} µs per reported event ({alone.cpu_us_per_event:.1f} "
            "with no watcher)",
            "",
            "printed",
            COMMAND,
        )
    )
    return out


def figures(quick: bool) -> list[Figure]:
    """Filtered watch cost vs watchers through gRPC (see bench/_report.py)."""
    return asyncio.run(_figures(quick))
