"""(c) The addon loses nothing it saw within its bound: connections that open
and close while the sidecar is down reach the restarted sidecar CLOSED, with
mitmproxy's own timestamps; with a small buffer, what it dropped is counted
exactly and the sidecar holds exactly the rest, and the restarted sidecar's
/metrics shows the addon's count (ProxyStats on the report stream).

One mitmdump, one sidecar killed and restarted twice on the same socket. The
probe (loaded after the addon) writes every connection hook in the order the
addon saw them, so the test knows which snapshots the outage produced
without asking the addon.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.parser import text_string_to_metric_families

from connmeta.v1 import connection_pb2 as pb
from tests.e2e.conftest import proxy_args
from tests.e2e.harness import (
    Mitmdump,
    Origin,
    OriginCA,
    SidecarProcess,
    async_wait_for,
    get,
    live_in_proxy,
)
from tests.e2e.sidecar_view import conn_of, records

pytestmark = pytest.mark.e2e

REQUESTS = 20
KEPT = 5
CONTROL_HOST = "connmeta-control.invalid"  # the probe's; importing it needs its env
SUMMARY = re.compile(r"(\d+) snapshots buffered, (\d+) replayed, (\d+) dropped")


def reported(proxy: Mitmdump) -> list[dict[str, Any]]:
    """The probe's connection hooks: in plain HTTP, one snapshot each."""
    return [entry for entry in proxy.hooks() if "id" in entry]


def hook_of(entry: dict[str, Any]) -> int:
    return pb.Hook.Value("HOOK_" + entry["hook"].upper())


def seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def summaries(proxy: Mitmdump) -> list[tuple[int, int, int]]:
    return [
        (int(m[1]), int(m[2]), int(m[3]))
        for line in proxy.log().splitlines()
        if (m := SUMMARY.search(line))
    ]


def proxy_metrics(exposition: str) -> tuple[float, float] | None:
    """connmeta_proxy_snapshots_dropped_total and _reconnects_total of the one proxy."""
    found = {
        sample.name: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name.startswith("connmeta_proxy_")
    }
    if not found:
        return None
    return (
        found["connmeta_proxy_snapshots_dropped_total"],
        found["connmeta_proxy_reconnects_total"],
    )


async def requests_during_outage(
    proxy: Mitmdump, sidecar: SidecarProcess, origin: Origin
) -> list[dict[str, Any]]:
    """Kill the sidecar, make REQUESTS requests (a new connection each), wait
    until mitmproxy closed them all, restart the sidecar; the probe entries
    of the outage."""
    sidecar.kill()
    mark = len(reported(proxy))
    for i in range(REQUESTS):
        assert await asyncio.to_thread(get, proxy.proxy, f"{origin.url}/down{i}") == f"A:/down{i}"
    await async_wait_for(lambda: asyncio.sleep(0, not live_in_proxy(proxy)), 10, "every close")
    outage = reported(proxy)[mark:]
    sidecar.start()
    return outage


async def settled(channel: grpc.aio.Channel, proxy: Mitmdump, since: int) -> None:
    """Everything the proxy reported since the probe's entry ``since`` is in
    the sidecar (and, a moment later, acknowledged: nothing of it is left for
    a replay)."""
    wanted = {entry["id"] for entry in reported(proxy)[since:]}

    async def there() -> bool:
        return wanted <= (await records(channel)).keys()

    await async_wait_for(there, 10, "the sidecar to hold every reported connection")
    await asyncio.sleep(0.3)


async def test_what_the_outage_saw_reaches_the_restarted_sidecar_and_drops_are_counted(
    tmp_path: Path, origin_a: Origin, ca: OriginCA
) -> None:
    sidecar = SidecarProcess(tmp_path / "connmeta.sock")
    sidecar.start()
    # A short RPC deadline: the outage is noticed and left quickly.
    proxy = Mitmdump(
        tmp_path / "proxy", proxy_args(sidecar, ca, "--set", "connmeta_rpc_deadline=500")
    )
    proxy.start()
    try:
        assert await asyncio.to_thread(get, proxy.proxy, origin_a.url + "/up") == "A:/up"
        channel = sidecar.channel()
        try:
            await settled(channel, proxy, 0)
        finally:
            await channel.close(None)

        # 1. Everything kept: every connection of the outage, CLOSED, with
        # mitmproxy's timestamps (the new sidecar starts empty, and a resync
        # reports only live connections: these came from the replay).
        before = time.time()
        outage = await requests_during_outage(proxy, sidecar, origin_a)
        after = time.time()
        final = {entry["id"]: entry for entry in outage}
        assert len({e["id"] for e in outage if e["kind"] == "client"}) >= REQUESTS
        channel = sidecar.channel()
        try:

            async def all_there() -> dict[str, pb.ConnectionRecord] | None:
                held = await records(channel)
                return held if final.keys() <= held.keys() else None

            held = await async_wait_for(all_there, 15, "every connection of the outage")
            for id, entry in final.items():
                conn = conn_of(held[id])
                assert conn.state == pb.CONNECTION_STATE_CLOSED, id
                assert held[id].metadata.last_hook == hook_of(entry), (
                    "closed by mitmproxy, not a resync"
                )
                mitm = entry["get_state"]
                assert conn.HasField("timestamp_start")
                assert conn.HasField("timestamp_end")
                assert seconds(conn.timestamp_start) == pytest.approx(
                    mitm["timestamp_start"], abs=1e-6
                )
                assert seconds(conn.timestamp_end) == pytest.approx(mitm["timestamp_end"], abs=1e-6)
                assert (
                    before - 1
                    <= seconds(conn.timestamp_start)
                    <= seconds(conn.timestamp_end)
                    <= after
                )
            assert summaries(proxy)[-1] == (len(outage), len(outage), 0)

            # 2. A buffer of KEPT snapshots: the oldest are dropped, counted.
            mark = len(reported(proxy))
            await asyncio.to_thread(
                get, proxy.proxy, f"http://{CONTROL_HOST}/?connmeta_buffer_size={KEPT}"
            )
            await settled(channel, proxy, mark)
        finally:
            await channel.close(None)

        outage = await requests_during_outage(proxy, sidecar, origin_a)
        kept = outage[-KEPT:]
        channel = sidecar.channel()
        try:
            last = {entry["id"]: entry for entry in kept}

            async def replayed() -> bool:
                return last.keys() <= (await records(channel)).keys()

            await async_wait_for(replayed, 15, "the replay")
            await asyncio.sleep(0.3)  # anything more would have arrived by now
            held = await records(channel)
        finally:
            await channel.close(None)
        assert summaries(proxy)[-1] == (len(outage), KEPT, len(outage) - KEPT), (
            "buffered, replayed, dropped: every snapshot of the outage, the newest KEPT, the rest"
        )
        assert held.keys() == last.keys(), "exactly the connections of the kept snapshots"
        # One scrape of the sidecar covers the proxy's reporting too.
        dropped = len(outage) - KEPT

        async def proxy_counters() -> tuple[float, float] | None:
            found = proxy_metrics(await asyncio.to_thread(sidecar.scrape))
            return found if found and found[0] == dropped else None

        counters = await async_wait_for(proxy_counters, 5, "the addon's counters in /metrics")
        assert counters[1] >= 2, "two outages: at least two reconnects"
        for id, entry in last.items():
            # Dropping the oldest keeps each connection's newest snapshot:
            # its close, reported by mitmproxy's hook.
            assert entry["state"] == 0
            assert conn_of(held[id]).state == pb.CONNECTION_STATE_CLOSED
            assert held[id].metadata.last_hook == hook_of(entry)
    finally:
        proxy.stop()
        sidecar.stop()
