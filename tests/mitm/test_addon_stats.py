"""The addon's counters on the report stream (ReportRequest.proxy_stats): what
they carry, how often, and that an idle stream still delivers them to a real
sidecar (tests/e2e/test_outage.py checks them in /metrics with mitmdump)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from connmeta.mitm import addon as addon_module
from connmeta.mitm.addon import ConnmetaAddon
from connmeta.server import Config, Sidecar
from connmeta.v1 import report_service_pb2 as rs
from tests.e2e.harness import async_wait_for
from tests.mitm.test_addon_buffer import running


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_proxy_stats_carry_every_counter_of_the_addon() -> None:
    addon = ConnmetaAddon()
    for n, key in enumerate(
        ["sent", "dropped", "buffered", "replayed", "rejected", "reconnects", "route_timeouts"]
    ):
        addon.stats[key] = 10 + n
    assert addon.proxy_stats() == rs.ProxyStats(
        snapshots_sent=10,
        snapshots_dropped=11,
        snapshots_buffered=12,
        snapshots_replayed=13,
        snapshots_rejected=14,
        reconnects=15,
        route_timeouts=16,
    )


def test_stats_go_out_at_most_once_a_second_and_only_when_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(addon_module, "time", SimpleNamespace(monotonic=clock))
    addon = ConnmetaAddon()
    first = addon._stats_due()
    assert first is not None, "the first request carries them"
    assert first.snapshots_sent == 0
    addon.stats["sent"] += 5
    clock.now += 0.5
    assert addon._stats_due() is None, "changed, but within the second"
    clock.now += 0.5
    assert addon._stats_due(peek=True) is not None
    due = addon._stats_due()
    assert due is not None
    assert due.snapshots_sent == 5
    clock.now += 5
    assert addon._stats_due() is None, "unchanged: nothing to send"
    addon.stats["reconnects"] += 1
    due = addon._stats_due()
    assert due is not None
    assert due.reconnects == 1


async def test_an_idle_stream_delivers_changed_stats_to_the_sidecar(tmp_path: Path) -> None:
    sidecar = Sidecar(Config(listen="", unix_socket=str(tmp_path / "s.sock")))
    await sidecar.start()
    addon = ConnmetaAddon()
    try:
        with running(addon) as options:
            options.configure(
                connmeta_target=f"unix://{sidecar.unix_socket}", connmeta_proxy_id="proxy-1"
            )
            await addon.running()
            try:

                async def latest() -> tuple[int, int] | None:
                    return sidecar.reports.latest().get("proxy-1")

                assert await async_wait_for(latest, 5, "the first stats") == (0, 0)
                # Nothing else to send: the stream is idle, and the stats ride
                # on an empty batch of their own.
                addon.stats["dropped"] = 7
                addon.stats["reconnects"] = 3

                async def updated() -> bool:
                    return sidecar.reports.latest().get("proxy-1") == (7, 3)

                await async_wait_for(updated, 5, "the changed stats")
                assert sidecar.reports.snapshots.get("proxy-1", 0) == 0, "no snapshot was sent"
            finally:
                await addon.done()
    finally:
        await sidecar.stop(grace=0)
