"""A mitmdump script: the connmeta addon with every hook timed, for
``bench/proxy_bench.py``'s per-hook figures (a proxy of its own, never one of
the pair whose CPU is compared).

perf_counter around each hook (a coroutine until it returns: server_connect
awaits only while a router is subscribed). SIGUSR1 writes the times (seconds, by hook) to
``$BENCH_DIR/hooks.json`` and clears them. Not a dataclass anywhere: mitmdump
loads a script without a sys.modules entry.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
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
    """A ConnmetaAddon (the tree's, or $BENCH_ADDON's) whose hooks record their times."""
    if os.environ.get("BENCH_ADDON"):
        spec = importlib.util.spec_from_file_location("bench_addon", os.environ["BENCH_ADDON"])
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        ConnmetaAddon = module.ConnmetaAddon
    else:
        from connmeta.mitm.addon import ConnmetaAddon

    times: dict[str, list[float]] = {name: [] for name in HOOKS}

    def timed(name: str) -> Any:
        inner = inspect.getattr_static(ConnmetaAddon, name)
        record = times[name].append
        clock = time.perf_counter

        if isinstance(inner, property):  # a hook only while needed (None otherwise)
            getter = inner.fget
            assert getter is not None

            def get(self: Any) -> Any:
                func = getter(self)
                if func is None:
                    return None

                def hook(data: Any) -> Any:
                    begun = clock()
                    func(data)
                    record(clock() - begun)

                return hook

            return property(get)

        def call(self: Any, data: Any) -> Any:
            begun = clock()
            result = inner(self, data)
            if result is None:  # a plain function
                record(clock() - begun)
                return None

            async def finish() -> None:  # a coroutine: timed until it returns
                await result
                record(clock() - begun)

            return finish()

        return call

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
