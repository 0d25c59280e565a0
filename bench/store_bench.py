"""Domain-core benchmark: ingest, watch fan-out and memory per stored connection.

    .venv/bin/python bench/store_bench.py            # 100k and 1M connections
    .venv/bin/python bench/store_bench.py --quick    # 100k only

No gRPC: these are the costs the core adds on top of the transport's
(about 100 µs of CPU per stream message in grpcio, 1-2 µs per record to
decode a report).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import random
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from connmeta import _ingest
from connmeta import store as store_module
from connmeta._rawview import RawReportRequest
from connmeta.state_file import open_store
from connmeta.store import Filter, Store
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs
from connmeta.watch import WatchHub

BATCH = 500
_NS = 1_700_000_000_000_000_000


def _hosts(rng: random.Random, n: int = 5000) -> list[str]:
    tlds = ["com", "net", "org", "io", "de"]
    return [
        f"{rng.choice(['api', 'www', 'cdn', 'static', 'auth'])}.site{i}.{rng.choice(tlds)}"
        for i in range(n)
    ]


def realistic_server(
    rng: random.Random, hosts: list[str], client_id: str, state: int = pb.CONNECTION_STATE_OPEN
) -> rs.ConnectionSnapshot:
    """A connected TLS server as the proxy reports it after tls_established_server."""
    host = rng.choice(hosts)
    conn = pb.Connection(
        id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        state=state,  # type: ignore[arg-type]
        transport_protocol=pb.TRANSPORT_PROTOCOL_TCP,
        peername=pb.Address(host=f"203.0.{rng.randrange(256)}.{rng.randrange(256)}", port=443),
        sockname=pb.Address(host="10.0.0.5", port=rng.randrange(32768, 61000)),
        tls=True,
        alpn=b"h2",
        tls_version=pb.TLS_VERSION_TLS_V1_3,
        sni=host,
    )
    start = _NS + rng.randrange(10**12)
    conn.timestamp_start.FromNanoseconds(start)
    conn.timestamp_tls_setup.FromNanoseconds(start + 40_000_000)
    server = pb.Server(connection=conn, address=pb.Address(host=host, port=443))
    server.timestamp_tcp_setup.FromNanoseconds(start + 20_000_000)
    return rs.ConnectionSnapshot(
        hook=pb.HOOK_TLS_ESTABLISHED_SERVER,
        client_id=client_id,
        server=server,
    )


def snapshots(n: int, seed: int = 1) -> list[rs.ConnectionSnapshot]:
    rng = random.Random(seed)
    hosts = _hosts(rng)
    client_ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n // 3 + 1)]
    return [realistic_server(rng, hosts, client_ids[i // 3]) for i in range(n)]


def _rate(label: str, count: int, seconds: float, unit: str = "records/s") -> None:
    print(f"  {label:<52} {count / seconds:>12,.0f} {unit}   ({seconds * 1e6 / count:.2f} µs each)")


# The ingest paths to compare: compiled first when this install has it.
_INGEST_PATHS: list[tuple[str, Any]] = (
    [("compiled", _ingest.apply_plain)] if _ingest.compiled() else []
) + [("pure Python", None)]


def _as_served(store: Store, requests: list[bytes]) -> None:
    """Apply report requests as the Report method does: both parses, then the store."""
    for data in requests:
        store.apply(
            rs.ReportRequest.FromString(data).batch.snapshots,
            RawReportRequest.FromString(data).batch.snapshots,
        )


def _closed(data: bytes) -> bytes:
    """The same report with every server disconnected (a MODIFIED each)."""
    request = rs.ReportRequest.FromString(data)
    for s in request.batch.snapshots:
        s.hook = pb.HOOK_SERVER_DISCONNECTED
        s.server.connection.state = pb.CONNECTION_STATE_CLOSED
    return request.SerializeToString()


def bench_apply(n: int) -> None:
    print(f"apply() in batches of {BATCH}, {n:,} realistic servers")
    snaps = snapshots(n)
    batches = [snaps[i : i + BATCH] for i in range(0, n, BATCH)]
    # As the Report method receives them: parsed once with the public types and
    # once with the raw view, so the store keeps the payload bytes as they came.
    encoded = [
        rs.ReportRequest(batch=rs.ReportBatch(snapshots=b)).SerializeToString() for b in batches
    ]
    # The compiled ingest path (connmeta._ingest) and the pure-Python one,
    # interleaved round by round in this process, fastest of three, on the
    # first 50k (the pure path's rounds are long).
    served = min(n, 50_000)
    encoded = encoded[: served // BATCH]
    closed = [_closed(data) for data in encoded]
    for label, before, timed in (
        ("new", [], encoded),
        ("changed", [encoded], closed),
        ("unchanged", [encoded, closed], closed),
    ):
        best: dict[str, float] = {}
        for _ in range(3):
            for path, loop in _INGEST_PATHS:
                store_module._APPLY_PLAIN = loop  # type: ignore[misc]
                raw_store = Store(history_size=100_000)
                for requests in before:
                    _as_served(raw_store, requests)
                gc.collect()
                t0 = time.perf_counter()
                _as_served(raw_store, timed)
                elapsed = time.perf_counter() - t0
                best[path] = min(best.get(path, elapsed), elapsed)
                del raw_store
        store_module._APPLY_PLAIN = _INGEST_PATHS[0][1]  # type: ignore[misc]
        for path, seconds in best.items():
            _rate(f"{label}, from request bytes (as served), {path}", served, seconds)
    del encoded, closed
    store = Store(history_size=100_000)
    t0 = time.perf_counter()
    for batch in batches:
        store.apply(batch)
    _rate("new connections (ADDED)", n, time.perf_counter() - t0)
    for s in snaps:
        s.hook = pb.HOOK_SERVER_DISCONNECTED
        s.server.connection.state = pb.CONNECTION_STATE_CLOSED
    t0 = time.perf_counter()
    for batch in batches:
        store.apply(batch)
    _rate("changed connections (MODIFIED)", n, time.perf_counter() - t0)
    t0 = time.perf_counter()
    for batch in batches:
        store.apply(batch)
    _rate("unchanged re-reports (skipped)", n, time.perf_counter() - t0)
    hub = WatchHub(store)
    for _ in range(10):
        hub.watch()
    for s in snaps:
        s.hook = pb.HOOK_SERVER_CONNECTED
    t0 = time.perf_counter()
    for batch in batches:
        store.apply(batch)
    _rate("MODIFIED with 10 idle watchers subscribed", n, time.perf_counter() - t0)


def bench_state_dir(n: int, history: int = 20_000) -> None:
    """Ingest with --state-dir beside the in-memory store, batch by batch.

    Both stores get each batch in turn (alternating which goes first), so
    the machine's noise falls on both alike. The history is smaller than the
    ingest, so the saved history is trimmed as in steady state.
    """
    print(
        f"apply() with --state-dir vs in memory, {n:,} servers in batches of {BATCH}, "
        f"history {history:,}, interleaved batch by batch"
    )
    snaps = snapshots(n, seed=4)
    added = [
        rs.ReportRequest(batch=rs.ReportBatch(snapshots=snaps[i : i + BATCH])).SerializeToString()
        for i in range(0, n, BATCH)
    ]
    for s in snaps:
        s.hook = pb.HOOK_SERVER_DISCONNECTED
        s.server.connection.state = pb.CONNECTION_STATE_CLOSED
    modified = [
        rs.ReportRequest(batch=rs.ReportBatch(snapshots=snaps[i : i + BATCH])).SerializeToString()
        for i in range(0, n, BATCH)
    ]
    with tempfile.TemporaryDirectory() as directory:
        options: dict[str, Any] = {"history_size": history, "closed_retention_seconds": 1e9}
        memory = Store(**options)
        saved, state = open_store(directory, **options)
        for label, requests in (
            ("new connections (ADDED)", added),
            ("changed connections (MODIFIED)", modified),
        ):
            spent = {id(memory): 0.0, id(saved): 0.0}
            for i, data in enumerate(requests):
                for store in (memory, saved) if i % 2 else (saved, memory):
                    t0 = time.perf_counter()
                    store.apply(
                        rs.ReportRequest.FromString(data).batch.snapshots,
                        RawReportRequest.FromString(data).batch.snapshots,
                    )
                    spent[id(store)] += time.perf_counter() - t0
            mem, sta = spent[id(memory)], spent[id(saved)]
            print(
                f"  {label:<32} in memory {n / mem:>9,.0f}/s   --state-dir {n / sta:>9,.0f}/s"
                f"   ratio {mem / sta:.2f}   (+{(sta - mem) * 1e6 / n:.1f} µs each)"
            )
        state.close()
        size = sum(f.stat().st_size for f in Path(directory).iterdir())
    print(f"  state file after {2 * n:,} changes: {size / 1e6:.1f} MB (history {history:,})")


def bench_fanout(watchers: int, events: int) -> None:
    """Store apply + hub broadcast + every watcher taking and encoding its batches."""
    snaps = snapshots(events, seed=2)
    store = Store(history_size=100_000)
    hub = WatchHub(store, max_lag=10**9)
    ws = [hub.watch() for _ in range(watchers)]

    async def run() -> float:
        t0 = time.perf_counter()
        for i in range(0, events, BATCH):
            store.apply(snaps[i : i + BATCH])
            for w in ws:
                while w.pending:
                    await w.next()
        return time.perf_counter() - t0

    seconds = asyncio.run(run())
    apply_only = Store(history_size=100_000)
    t0 = time.perf_counter()
    for i in range(0, events, BATCH):
        apply_only.apply(snaps[i : i + BATCH])
    store_seconds = time.perf_counter() - t0
    fan = seconds - store_seconds
    deliveries = events * watchers
    print(f"fan-out to {watchers} watchers, {events:,} events (unfiltered, batches of {BATCH})")
    _rate("events through store + all watchers", events, seconds, "events/s")
    _rate("per delivery (one event to one watcher, excl. store)", deliveries, fan, "deliveries/s")
    batches_per_watcher = -(-events // 1024) * watchers
    grpc = batches_per_watcher * 100e-6
    print(
        f"  + grpcio ~100 µs per stream message x {batches_per_watcher:,} messages "
        f"= {grpc:.2f} s -> ~{events / (seconds + grpc):,.0f} events/s end to end"
    )


def bench_memory(n: int) -> None:
    snaps = snapshots(n, seed=3)
    store = Store(history_size=100_000)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(0, n, BATCH):
        store.apply(snaps[i : i + BATCH])
    store.list(Filter(), limit=1)  # builds the id index
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    sample = store.get(snaps[0].server.connection.id)
    size = len(sample.data) if sample else 0
    print(
        f"memory, {n:,} stored connections (history {min(n, 100_000):,} events): "
        f"{(after - before) / n:,.0f} B per connection (serialized record {size} B)"
    )


def _chain(length: int = 4) -> list[bytes]:
    """A certificate chain of ``length`` DER certificates, leaf first (RSA 2048)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding

    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    ders = []
    for i in range(length):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"level-{i}.example")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1000 + i)
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=90))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(f"*.site{i}.example")]), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        ders.append(cert.public_bytes(Encoding.DER))
    return ders


def bench_tls_memory(connections: int) -> None:
    """A TLS-heavy churn (4-certificate chains, every connection opened and
    closed): what the store holds at the default bounds, beside the same
    store bounded by count only (history 100k events, 10k closed), as before
    --history-bytes and --closed-retention-bytes."""
    chain = _chain()
    snaps = snapshots(connections, seed=5)
    for snap in snaps:
        snap.server.connection.certificate_list.extend(pb.Certificate(der=d) for d in chain)
    for label, store in (
        ("bounded by count only", Store(history_bytes=1 << 40, closed_retention_bytes=1 << 40)),
        ("default byte bounds", Store()),
    ):
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, connections, BATCH):
            batch = snaps[i : i + BATCH]
            store.apply(batch)
            for snap in batch:
                snap.hook = pb.HOOK_SERVER_DISCONNECTED
                snap.server.connection.state = pb.CONNECTION_STATE_CLOSED
            store.apply(batch)
            for snap in batch:
                snap.hook = pb.HOOK_TLS_ESTABLISHED_SERVER
                snap.server.connection.state = pb.CONNECTION_STATE_OPEN
            store.expire()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        print(
            f"TLS churn, {connections:,} connections, {label}: store holds "
            f"{(after - before) / 2**20:,.0f} MiB ({len(store):,} records, history from "
            f"{store.revision - store.oldest_revision:,} events)"
        )
        del store
        gc.collect()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100k connections only")
    args = parser.parse_args(argv)
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    print(f"python {sys.version.split()[0]}, ingest path {_ingest.implementation()}")
    steps: list[Callable[[], None]] = [
        lambda: bench_apply(100_000),
        lambda: bench_state_dir(50_000),
        lambda: bench_fanout(10, 50_000),
        lambda: bench_fanout(100, 10_000),
        *[(lambda n=n: bench_memory(n)) for n in sizes],
        lambda: bench_tls_memory(60_000),
    ]
    for step in steps:
        step()
        gc.collect()


if __name__ == "__main__":
    main()
