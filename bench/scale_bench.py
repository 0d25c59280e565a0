"""Scale curves of the domain core (no gRPC): List, Watch resume, memory, restart.

    .venv/bin/python -m bench scale            # 10k, 100k and 1M stored connections
    .venv/bin/python -m bench scale --quick    # 10k and 100k

One store grows through each size (built once: the 1M store is the 100k
store plus 900k more), fed through ``Store.apply`` in batches of 1,000 as the
Report method feeds it (request bytes, raw view beside the parsed message),
so every figure includes what ingest really builds: records, history and
indexes. The mix: one client per three servers, ~5,000 server names, 1 % of
connections CLOSED, and 50 servers (whatever the size) under ``rare.example``,
the few records the selective host and SNI filters match.

At each size, best of several rounds, each List timed right after a few
writes (10 new connections, 10 changed), so that no figure hides a cost
deferred from the writes to the next read. Figures that should be flat (any
page, a page filtered by host, SNI, client id, kind or state) are printed at
1M beside the same at 10k; the goal is a ratio ≤ 2.

Memory per connection is the growth of the process's RSS (what a deployment
pays: pymalloc rounding and fragmentation included) over the store's
growth, history (100k events) and indexes included, after a collection;
``bench/store_bench.py`` prints the tracemalloc figure of the same workload.
"""

from __future__ import annotations

import functools
import gc
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench._report import Figure, verdict
from connmeta._rawview import RawReportRequest
from connmeta.records import Event, EventType, Record, encode_field, encode_repeated
from connmeta.state_file import StateFile, open_store
from connmeta.store import Filter, Kind, Store
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs

COMMAND = ".venv/bin/python -m bench scale"
BATCH = 1000
HISTORY = 100_000
RARE = 50
_NS = 1_700_000_000_000_000_000
OPEN, CLOSED = pb.CONNECTION_STATE_OPEN, pb.CONNECTION_STATE_CLOSED


class Workload:
    """Connections in arrival order: per client, the client then three servers.

    Snapshots are serialized from two templates whose fields are set per
    connection (a few µs each, against ~15 µs for building each message),
    so that building the 1M store takes seconds, not minutes.
    """

    def __init__(self, seed: int = 14) -> None:
        self.rng = random.Random(seed)
        tlds = ["com", "net", "org", "io", "de"]
        self.hosts = [
            f"{self.rng.choice(['api', 'www', 'cdn', 'static', 'auth'])}.site{i}."
            f"{self.rng.choice(tlds)}"
            for i in range(5000)
        ]
        self.made = 0
        self.rare = 0
        self.first_client = ""
        self.ids: list[str] = []  # every 50th id made, for picking a later change
        self._client = rs.ConnectionSnapshot(
            hook=pb.HOOK_CLIENT_CONNECTED,
            client=pb.Client(
                connection=pb.Connection(
                    transport_protocol=pb.TRANSPORT_PROTOCOL_TCP,
                    sockname=pb.Address(host="10.0.0.5", port=8080),
                ),
                proxy_mode=pb.ProxyMode(full_spec="regular"),
            ),
        )
        self._server = rs.ConnectionSnapshot(
            server=pb.Server(
                connection=pb.Connection(
                    transport_protocol=pb.TRANSPORT_PROTOCOL_TCP,
                    sockname=pb.Address(host="10.0.0.5"),
                    tls=True,
                    alpn=b"h2",
                    tls_version=pb.TLS_VERSION_TLS_V1_3,
                ),
                address=pb.Address(port=443),
            )
        )

    def _id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def batch(self, n: int) -> list[bytes]:
        """``n`` or a few more serialized ConnectionSnapshots."""
        rng = self.rng
        out: list[bytes] = []
        snap = self._client
        conn = snap.client.connection
        while len(out) < n:
            client_id = self._id()
            if not self.first_client:
                self.first_client = client_id
            if len(out) % 50 == 0:
                self.ids.append(client_id)
            start = _NS + rng.randrange(10**12)
            conn.id = client_id
            conn.state = CLOSED if rng.random() < 0.01 else OPEN
            conn.peername.host = f"198.51.{rng.randrange(4)}.{rng.randrange(256)}"
            conn.peername.port = rng.randrange(32768, 61000)
            conn.timestamp_start.FromNanoseconds(start)
            out.append(snap.SerializeToString())
            for _ in range(3):
                if self.rare < RARE and self.made % 97 == 5:
                    host = f"n{self.rare % 10}.rare.example"
                    self.rare += 1
                else:
                    host = rng.choice(self.hosts)
                out.append(self._server_bytes(client_id, host, start))
            self.made += 4
        return out

    def _server_bytes(self, client_id: str, host: str, start: int) -> bytes:
        rng = self.rng
        state = CLOSED if rng.random() < 0.01 else OPEN
        snap = self._server
        server = snap.server
        conn = server.connection
        conn.id = self._id()
        conn.state = state
        conn.peername.host = f"203.0.{rng.randrange(256)}.{rng.randrange(256)}"
        conn.peername.port = 443
        conn.sockname.port = rng.randrange(32768, 61000)
        conn.sni = host
        conn.timestamp_start.FromNanoseconds(start)
        conn.timestamp_tls_setup.FromNanoseconds(start + 40_000_000)
        server.address.host = host
        server.timestamp_tcp_setup.FromNanoseconds(start + 20_000_000)
        snap.hook = pb.HOOK_TLS_ESTABLISHED_SERVER if state == OPEN else pb.HOOK_SERVER_DISCONNECTED
        snap.client_id = client_id
        return snap.SerializeToString()


def _request(snaps: list[bytes]) -> bytes:
    """A serialized ReportRequest carrying ``snaps`` as one batch."""
    return encode_field(2, encode_repeated(1, snaps))


def _apply(store: Store, snaps: list[bytes]) -> None:
    """As the Report method does: the request bytes, parsed and as the raw view."""
    data = _request(snaps)
    rejected = store.apply(
        rs.ReportRequest.FromString(data).batch.snapshots,
        RawReportRequest.FromString(data).batch.snapshots,
    )
    assert not rejected, rejected[0]


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _churn(store: Store, work: Workload) -> None:
    """A few writes before a timed read: 10 new connections (a client and its
    servers) and a changed (re-reported, now CLOSED) older one."""
    _apply(store, work.batch(8))
    old = store.get(work.ids[work.rng.randrange(len(work.ids) // 2)])
    if old is not None and old.kind is Kind.SERVER and old.state == OPEN:
        msg = old.message()
        msg.server.connection.state = CLOSED
        _apply(
            store,
            [
                rs.ConnectionSnapshot(
                    hook=pb.HOOK_SERVER_DISCONNECTED,
                    client_id=msg.metadata.client_id,
                    server=msg.server,
                ).SerializeToString()
            ],
        )


def _best(store: Store, work: Workload, call: Callable[[], object], rounds: int = 7) -> float:
    """Fastest of ``rounds`` calls, each right after a few writes; seconds."""
    times = []
    for _ in range(rounds):
        _churn(store, work)
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times)


def _measure(store: Store, work: Workload) -> dict[str, float]:
    """Every timed figure at the store's current size, in seconds."""
    out: dict[str, float] = {}
    ids = sorted(store._records)  # a copy: the churn adds ids
    n = len(ids)
    for limit in (100, 1000):
        for where, after in (
            ("first", ""),
            ("middle", ids[n // 2]),
            ("last", ids[n - limit - 1]),
        ):
            out[f"{where} page of {limit}"] = _best(
                store, work, functools.partial(store.list, Filter(), after_id=after, limit=limit)
            )
    filters = {
        "host exact (5 match)": Filter(host="n3.rare.example"),
        "host *.suffix (50 match)": Filter(host="*.rare.example"),
        "SNI exact (5 match)": Filter(sni="N3.rare.example"),
        "client id (1 client, 3 servers)": Filter(client_id=work.first_client),
        "kind CLIENT (25 %)": Filter(kind=Kind.CLIENT),
        "state CLOSED (1 %)": Filter(states=frozenset({CLOSED})),
    }
    for label, flt in filters.items():
        out[f"first page of 100 by {label}"] = _best(
            store, work, functools.partial(store.list, flt, limit=100)
        )
    # A pinned listing (page 2 of a snapshot taken before the writes).
    _, pinned, _ = store.list(Filter(), limit=100)
    middle = ids[n // 2]
    out["pinned page of 100 (middle)"] = _best(
        store, work, lambda: store.list(Filter(), after_id=middle, limit=100, at_revision=pinned)
    )
    out["watch resume from the oldest retained revision"] = _best(
        store, work, lambda: store.events_after(store.oldest_revision), rounds=3
    )
    return out


def _start_names(store: Store) -> float:
    """Seconds the first List by host or SNI spends building the name index
    (reading every record's host and SNI, ~3 µs each), on copies of the records."""
    try:
        from connmeta.index import Index
    except ImportError:  # a tree before the index: every List scans
        return 0.0
    fresh = [
        Record(r.id, r.client_id, None, None, None, r._bits, r.data, r.proxy)
        for r in store._records.values()
    ]
    index = Index()
    t0 = time.perf_counter()
    index.activate_names(fresh)
    return time.perf_counter() - t0


def _restart(store: Store) -> float:
    """Seconds to open a --state-dir holding ``store``'s records and history."""
    options: dict[str, Any] = {"history_size": HISTORY}
    with tempfile.TemporaryDirectory() as directory:
        fresh = Store(**options)
        state = StateFile.open(
            directory, incarnation=fresh.incarnation, revision=fresh.revision, boot="bench"
        )
        state.begin(fresh.incarnation, fresh.revision, "bench")
        # The saved state as the journal would have left it: each record's
        # latest version, then the history's events from the oldest on.
        history = store.events_after(store.oldest_revision)
        in_history = {e.record.id for e in history}
        older = sorted(
            (r for r in store._records.values() if r.id not in in_history),
            key=lambda r: r.revision,
        )
        events = [Event(r.revision, EventType.ADDED, r, None) for r in older]
        events.extend(
            Event(e.revision, e.type, e.record, None)
            if e.prev is None or e.prev.id not in in_history
            else e
            for e in history
        )
        for i in range(0, len(events), 10_000):
            state.append(events[i : i + 10_000], store.oldest_revision)
        state.close()
        gc.collect()
        t0 = time.perf_counter()
        restored, state = open_store(directory, boot="bench", **options)
        seconds = time.perf_counter() - t0
        assert len(restored) == len(store), (len(restored), len(store))
        state.close()
        del restored
    return seconds


def _ingest_cost(work: Workload, n: int = 20_000) -> dict[str, float]:
    """µs per new connection through apply(): indexes kept vs not, interleaved
    batch by batch; and with the host/SNI index started."""

    from connmeta.index import Index

    class _NoIndex(Index):
        def update(self, events: Sequence[Event]) -> None:
            pass

    batches = [_request(work.batch(500)) for _ in range(n // 500)]
    stores = {"none": Store(), "indexed": Store(), "names": Store()}
    stores["none"]._index = _NoIndex()
    stores["names"]._index.activate_names(())
    spent = dict.fromkeys(stores, 0.0)
    gc.disable()
    try:
        for i, data in enumerate(batches):
            order = list(stores)
            order = order[i % 3 :] + order[: i % 3]
            for name in order:
                t0 = time.perf_counter()
                stores[name].apply(
                    rs.ReportRequest.FromString(data).batch.snapshots,
                    RawReportRequest.FromString(data).batch.snapshots,
                )
                spent[name] += time.perf_counter() - t0
    finally:
        gc.enable()
    out = {k: v * 1e6 / n for k, v in spent.items()}
    # The index's own work, timed alone (less noisy than the difference of two
    # apply() figures): following the same events into a fresh index, best
    # of 5; with names, on copies of the records whose host and SNI are unread.
    events = stores["none"].events_after(stores["none"].oldest_revision)
    fresh = [
        Event(
            e.revision,
            e.type,
            Record(r.id, r.client_id, None, None, None, r._bits, r.data, r.proxy),
            None,
        )
        for e in events
        if (r := e.record)
    ]
    for label, source, names in (("update", events, False), ("update names", fresh, True)):
        best = float("inf")
        for _ in range(5 if not names else 1):
            index = Index()
            if names:
                index.activate_names(())
            t0 = time.perf_counter()
            for i in range(0, len(source), 500):
                index.update(source[i : i + 500])
            best = min(best, time.perf_counter() - t0)
        out[label] = best * 1e6 / len(source)
    return out


def figures(quick: bool) -> list[Figure]:
    sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
    work = Workload()
    gc.collect()
    base_rss = _rss()
    store = Store(history_size=HISTORY, closed_retention_seconds=1e9, closed_retention_count=10**9)
    results: dict[int, dict[str, float]] = {}
    memory: dict[int, float] = {}
    restart: dict[int, float] = {}
    build: dict[int, float] = {}
    for size in sizes:
        t0 = time.perf_counter()
        while len(store) < size:
            _apply(store, work.batch(min(BATCH, size - len(store))))
        build[size] = time.perf_counter() - t0
        # The first List by host or SNI starts the name index: at 10k here,
        # kept current from then on. What starting it costs at each size is
        # timed on copies of the records, their host and SNI not read yet.
        store.list(Filter(host="x.invalid"), limit=1)
        start_names = _start_names(store)
        gc.collect()
        memory[size] = (_rss() - base_rss) / len(store)
        print(
            f"  {len(store):,} connections: built in {build[size]:.1f} s, "
            f"{memory[size]:.0f} B/connection RSS",
            file=sys.stderr,
        )
        results[size] = _measure(store, work)
        print(
            f"  {size:,}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in results[size].items()),
            file=sys.stderr,
        )
        results[size]["first List by host or SNI (builds the name index; once)"] = start_names
        restart[size] = _restart(store)
        print(f"  {size:,}: restart {restart[size]:.2f} s", file=sys.stderr)
    ingest = _ingest_cost(Workload(seed=15))
    small, big = sizes[0], sizes[-1]
    label = {10_000: "10k", 100_000: "100k", 1_000_000: "1M"}
    rows: list[Figure] = []
    flat = [k for k in results[small] if k.startswith(("first page", "middle", "last", "pinned"))]
    for key in results[small]:
        series = ", ".join(f"{label[s]} {results[s][key] * 1e3:.3f}" for s in sizes)
        ratio = results[big][key] / results[small][key] if results[small][key] else 0.0
        goal = ""
        if key in flat and not key.startswith("pinned"):
            goal = verdict(ratio, 2, higher_is_better=False, unit="x")
        rows.append(
            Figure(
                f"scale: {key} (ms at {', '.join(label[s] for s in sizes)})",
                f"{results[big][key] * 1e3:.3f} ms at {label[big]} ({series})",
                f"{results[small][key] * 1e3:.3f} ms at {label[small]}",
                f"{ratio:.2f}",
                goal,
                COMMAND,
            )
        )
    rows.append(
        Figure(
            f"scale: memory per stored connection (RSS growth, history {HISTORY // 1000}k, "
            "indexes included)",
            f"{memory[big]:.0f} B at {label[big]} "
            f"({', '.join(f'{label[s]} {memory[s]:.0f}' for s in sizes)})",
            f"{memory[small]:.0f} B at {label[small]}",
            f"{memory[big] / memory[small]:.2f}",
            verdict(memory[big], 450, higher_is_better=False, unit=" B")
            if big == 1_000_000
            else "≤ 450 B at 1M (not measured: --quick)",
            COMMAND,
        )
    )
    rows.append(
        Figure(
            "scale: start-up with --state-dir (load N records + history)",
            f"{restart[big]:.2f} s at {label[big]} "
            f"({', '.join(f'{label[s]} {restart[s]:.2f} s' for s in sizes)})",
            f"{restart[small]:.3f} s at {label[small]}",
            f"{restart[big] / restart[small]:.0f}",
            f"{restart[big] * 1e6 / big:.1f} µs per record",
            COMMAND,
        )
    )
    rows.append(
        Figure(
            "scale: apply() per new connection, indexes kept (ids, kind/state, client id)",
            f"{ingest['indexed']:.2f} µs (with host/SNI index: {ingest['names']:.2f} µs); "
            f"Index.update alone {ingest['update']:.2f} µs per event "
            f"({ingest['update names']:.2f} µs with names, host/SNI read included)",
            f"{ingest['none']:.2f} µs without indexes",
            f"{ingest['indexed'] / ingest['none']:.2f}",
            f"+{ingest['indexed'] - ingest['none']:.2f} µs (+{ingest['names'] - ingest['none']:.2f}"
            " µs with names)",
            COMMAND,
        )
    )
    del store
    gc.collect()
    return rows


def main() -> None:
    from bench._report import HEADER

    rows = figures("--quick" in sys.argv)
    print(HEADER)
    for row in rows:
        print(row.row())


if __name__ == "__main__":
    main()
