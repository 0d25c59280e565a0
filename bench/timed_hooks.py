"""A mitmdump script: the connmeta addon with every hook timed, for
``bench/proxy_bench.py``'s per-hook figures (a proxy of its own, never one of
the pair whose CPU is compared).

perf_counter around each hook's coroutine: none of them awaits anything while
no router is subscribed. SIGUSR1 writes the times (seconds, by hook) to
``$BENCH_DIR/hooks.json`` and clears them. Not a dataclass anywhere: mitmdump
loads a script without a sys.modules entry.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

# Every hook the addon implements; each is wrapped.
HOOKS = (
    "client_connected",
    "client_disconnected",
    "server_connect",
    "server_connected",
    "server_connect_error",
    "server_disconnected",
    "tls_established_client",
    "tls_established_server",
    "tls_failed_client",
    "tls_failed_server",
    "http_connected",
    "responseheaders",
    "error",
    "tcp_start",
    "requestheaders",
)


def timed_addon() -> Any:
    """A ConnmetaAddon whose hooks record their times."""
    from connmeta.mitm.addon import ConnmetaAddon

    times: dict[str, list[float]] = {name: [] for name in HOOKS}

    def timed(name: str) -> Any:
        inner = getattr(ConnmetaAddon, name)
        record = times[name].append
        clock = time.perf_counter

        async def hook(self: Any, data: Any) -> None:
            begun = clock()
            await inner(self, data)
            record(clock() - begun)

        return hook

    async def running(self: Any) -> None:
        await ConnmetaAddon.running(self)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)

    def dump() -> None:
        out = Path(os.environ["BENCH_DIR"]) / "hooks.json"
        out.with_suffix(".tmp").write_text(json.dumps(times))
        out.with_suffix(".tmp").rename(out)
        for values in times.values():
            values.clear()

    namespace = {name: timed(name) for name in HOOKS}
    namespace["running"] = running
    return type("TimedConnmetaAddon", (ConnmetaAddon,), namespace)()


if "BENCH_DIR" in os.environ:
    addons = [timed_addon()]
