"""(e) The sidecar dies mid-traffic: the proxy keeps serving, and after the
resync the restarted sidecar holds every live connection again."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from connmeta.v1 import connection_pb2 as pb
from tests.e2e.conftest import proxy_args
from tests.e2e.harness import (
    KeepAlive,
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


async def test_proxy_keeps_serving_without_the_sidecar_and_resyncs_after_its_restart(
    tmp_path: Path, origin_a: Origin, ca: OriginCA
) -> None:
    sidecar = SidecarProcess(tmp_path / "connmeta.sock")
    sidecar.start()
    proxy = Mitmdump(tmp_path / "proxy", proxy_args(sidecar, ca))
    proxy.start()
    keep = [KeepAlive(proxy.port) for _ in range(2)]
    stop = threading.Event()
    served: list[str] = []

    def traffic() -> None:
        while not stop.is_set():
            served.append(get(proxy.proxy, origin_a.url + "/t"))

    worker = threading.Thread(target=traffic)
    try:
        for k in keep:
            assert await asyncio.to_thread(k.get, origin_a.url + "/k") == "A:/k"
        worker.start()
        await asyncio.sleep(0.3)
        sidecar.kill()
        during = len(served)
        await asyncio.sleep(1.0)
        assert len(served) > during, "the proxy kept serving while the sidecar was down"
        for k in keep:
            assert await asyncio.to_thread(k.get, origin_a.url + "/down") == "A:/down"
        sidecar.start()
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.to_thread(worker.join, 10)
        assert set(served) == {"A:/t"}

        await async_wait_for(
            lambda: asyncio.sleep(0, len(live_in_proxy(proxy)) == 4),
            10,
            "only the two keep-alive clients and their servers to remain",
        )
        channel = sidecar.channel()
        try:

            async def converged() -> bool:
                held = await records(channel)
                not_closed = {
                    i for i, r in held.items() if conn_of(r).state != pb.CONNECTION_STATE_CLOSED
                }
                return not_closed == live_in_proxy(proxy)

            await async_wait_for(converged, 15, "the sidecar to hold every live connection")
            held = await records(channel)
            live = live_in_proxy(proxy)
            assert all(conn_of(held[i]).state == pb.CONNECTION_STATE_OPEN for i in live)
        finally:
            await channel.close(None)
    finally:
        stop.set()
        for k in keep:
            k.close()
        if worker.is_alive():
            worker.join(10)
        proxy.stop()
        sidecar.stop()
