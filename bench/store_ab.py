"""Before/after of a change to ``store.py``, in one process, interleaved batch by batch.

    git show be28b06:src/connmeta/store.py > /tmp/store_before.py
    .venv/bin/python bench/store_ab.py /tmp/store_before.py

Both stores (the given file's ``Store`` and the tree's) apply the same
batches of ``store_bench``'s realistic servers, alternating batch by batch, so
a busy machine slows both alike and the ratio stays meaningful where two
separate runs would differ by more than the change costs. The old file is
loaded with today's other modules (records, validation, ...): it only works
for changes confined to ``store.py``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from typing import Any

from bench.store_bench import BATCH, snapshots
from connmeta._rawview import RawReportRequest
from connmeta.store import Store
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs


def _load(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("store_before", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["store_before"] = module
    spec.loader.exec_module(module)
    return module.Store


def _round(n: int, before_cls: Any) -> dict[str, tuple[float, float]]:
    snaps = snapshots(n)
    batches = [snaps[i : i + BATCH] for i in range(0, n, BATCH)]
    stores = (before_cls(history_size=100_000), Store(history_size=100_000))
    out: dict[str, tuple[float, float]] = {}

    def timed(label: str, apply: Any) -> None:
        spent = [0.0, 0.0]
        # A collection lands on whichever side allocates at the wrong moment:
        # off while timing, so both sides pay only their own work.
        gc.disable()
        try:
            _interleave(spent, apply)
        finally:
            gc.enable()
        out[label] = (spent[0] * 1e6 / n, spent[1] * 1e6 / n)

    def _interleave(spent: list[float], apply: Any) -> None:
        for i, batch in enumerate(batches):
            for side in (0, 1) if i % 2 else (1, 0):  # neither always goes first
                t0 = time.perf_counter()
                apply(stores[side], batch)
                spent[side] += time.perf_counter() - t0

    encoded = {
        id(b): rs.ReportRequest(batch=rs.ReportBatch(snapshots=b)).SerializeToString()
        for b in batches
    }

    def from_bytes(store: Any, batch: list[rs.ConnectionSnapshot]) -> None:
        data = encoded[id(batch)]
        store.apply(
            rs.ReportRequest.FromString(data).batch.snapshots,
            RawReportRequest.FromString(data).batch.snapshots,
        )

    timed("new connections, from request bytes (as served)", from_bytes)
    for s in snaps:
        s.hook = pb.HOOK_SERVER_DISCONNECTED
        s.server.connection.state = pb.CONNECTION_STATE_CLOSED
    encoded = {
        id(b): rs.ReportRequest(batch=rs.ReportBatch(snapshots=b)).SerializeToString()
        for b in batches
    }
    timed("changed connections (MODIFIED), from bytes", from_bytes)
    timed("unchanged re-reports (skipped), from bytes", from_bytes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("before", help="an older src/connmeta/store.py")
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    before_cls = _load(args.before)
    results: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for label, pair in _round(args.records, before_cls).items():
            results.setdefault(label, []).append(pair)
        gc.collect()
    print(f"{args.records:,} records x {args.rounds} rounds, interleaved batch by batch ({BATCH})")
    for label, pairs in results.items():
        # The fastest round of each: the one least disturbed by the machine.
        before = min(p[0] for p in pairs)
        after = min(p[1] for p in pairs)
        print(
            f"  {label:<48} before {before:6.2f} µs  after {after:6.2f} µs  "
            f"after/before {after / before:.3f} ({(after - before) * 1000:+.0f} ns each)"
        )


if __name__ == "__main__":
    main()
