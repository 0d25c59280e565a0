"""Plain counters the sidecar keeps for its metrics, without any metrics library.

The domain core and the servicers count with ints where events happen (an
addition per batch, never per record); ``connmeta.export.prometheus`` reads
them at scrape time. So nothing on the ingest path knows about Prometheus,
and a scrape costs the same whatever the load.

Proxy ids become label values, so they are capped: the first
``MAX_PROXY_LABELS`` proxies a sidecar meets keep their own value, later ones
share ``OTHER``.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

from connmeta.v1 import report_service_pb2 as rs

__all__ = [
    "MAX_PROXY_LABELS",
    "OTHER",
    "ROUTE_WAIT_BUCKETS",
    "Buckets",
    "ProxyLabels",
    "ReportStats",
]

MAX_PROXY_LABELS: Final = 64
"""Distinct ``proxy`` label values at most, ``OTHER`` included."""
OTHER: Final = "other"
"""The ``proxy`` label of every proxy beyond the first ``MAX_PROXY_LABELS - 1``."""
_OTHER_PROXIES: Final = 1024
"""Proxies folded into ``OTHER`` whose latest ProxyStats are kept (oldest forgotten)."""

ROUTE_WAIT_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)
"""Upper bounds (seconds) for connmeta_route_wait_seconds: around the default
route deadline of 200 ms, fine below it, where a router should answer."""


class Buckets:
    """A histogram's cumulative state: counts per upper bound, sum and count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count of values <= le) for every bound and +Inf, as exposition wants."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class ProxyLabels:
    """The label value of each proxy id: its own for the first ones, then ``OTHER``."""

    def __init__(self, limit: int = MAX_PROXY_LABELS) -> None:
        self._limit = limit - 1  # one value is OTHER
        self._known: dict[str, str] = {}

    def __call__(self, proxy: str) -> str:
        label = self._known.get(proxy)
        if label is None:
            if len(self._known) >= self._limit:
                return OTHER
            label = self._known[proxy] = proxy
        return label


class ReportStats:
    """What the report streams count, by proxy label."""

    def __init__(self, labels: ProxyLabels | None = None) -> None:
        self.label = labels or ProxyLabels()
        self.snapshots: dict[str, int] = {}
        """Snapshots received in batches (applied, skipped as unchanged, or refused)."""
        self.resyncs = 0
        """Resyncs started (ResyncStart), on every stream."""
        # The latest ProxyStats of each labelled proxy; of folded ones, a
        # bounded number, summed under OTHER when exported.
        self._proxy_stats: dict[str, rs.ProxyStats] = {}
        self._other_stats: OrderedDict[str, rs.ProxyStats] = OrderedDict()

    def batch(self, proxy: str, count: int) -> None:
        label = self.label(proxy)
        self.snapshots[label] = self.snapshots.get(label, 0) + count

    def proxy_stats(self, proxy: str, stats: rs.ProxyStats) -> None:
        """Keep a proxy's latest counters (they are cumulative: the latest wins)."""
        label = self.label(proxy)
        if label != OTHER:
            self._proxy_stats[label] = stats
            return
        others = self._other_stats
        others[proxy] = stats
        others.move_to_end(proxy)
        if len(others) > _OTHER_PROXIES:
            others.popitem(last=False)

    def latest(self) -> dict[str, tuple[int, int]]:
        """(snapshots_dropped, reconnects) by proxy label, as the proxies last sent them."""
        out = {
            label: (stats.snapshots_dropped, stats.reconnects)
            for label, stats in self._proxy_stats.items()
        }
        if self._other_stats:
            out[OTHER] = (
                sum(s.snapshots_dropped for s in self._other_stats.values()),
                sum(s.reconnects for s in self._other_stats.values()),
            )
        return out
