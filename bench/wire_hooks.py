"""In-process cost of the addon's hooks for one plain HTTP request, by encoder.

Calls ConnmetaAddon's hooks directly (client_connected, server_connect,
server_connected, responseheaders, server_disconnected, client_disconnected:
five snapshots) on fresh mitmproxy objects per request, with each encoder in
interleaved rounds: connmeta._wirecore compiled (mypyc), its Python source,
and optionally an older ``_wire.py`` (``--old FILE``, e.g. main's). Prints the
median µs per request of each. ``python -m bench.wire_hooks [--requests N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from mitmproxy.connection import Client, ConnectionState, Server
from mitmproxy.proxy.mode_specs import ProxyMode

import connmeta
from connmeta import _wirecore
from connmeta.mitm import _wire, addon
from connmeta.v1 import connection_pb2 as pb


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Data:
    def __init__(self, client: Client, server: Server) -> None:
        self.client, self.server = client, server


class _Flow:
    def __init__(self, client: Client, server: Server) -> None:
        self.client_conn, self.server_conn = client, server


def _one(a: Any, mode: ProxyMode, n: int) -> float:
    now = time.time()
    client = Client(
        peername=("127.0.0.1", 1024 + n % 60000), sockname=("127.0.0.1", 8080),
        timestamp_start=now, proxy_mode=mode,
    )  # fmt: skip
    server = Server(address=("127.0.0.1", 9000))
    data, flow = _Data(client, server), _Flow(client, server)
    started = time.perf_counter()
    a.client_connected(client)
    coro = a.server_connect(data)
    with contextlib.suppress(StopIteration):  # no router: returns without awaiting
        coro.send(None)
    server.peername = ("127.0.0.1", 9000)
    server.sockname = ("127.0.0.1", 1024 + (n * 7 + 1) % 60000)
    server.timestamp_start = server.timestamp_tcp_setup = now + 0.0003
    server.state = ConnectionState.OPEN
    a.server_connected(data)
    a.responseheaders(flow)
    server.timestamp_end = now + 0.002
    server.state = ConnectionState.CLOSED
    a.server_disconnected(data)
    client.timestamp_end = now + 0.0021
    client.state = ConnectionState.CLOSED
    a.client_disconnected(client)
    elapsed = time.perf_counter() - started
    assert len(a._queue) == 5, len(a._queue)
    a._queue.clear()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--old", type=Path, help="an older connmeta/mitm/_wire.py")
    args = parser.parse_args()
    source = _load(Path(connmeta.__file__).parent / "_wirecore.py", "wirecore_source")
    encoders: dict[str, Callable[[], None]] = {}
    if _wirecore.compiled():
        encoders["compiled"] = lambda: _wire._bind(_wirecore)
    encoders["pure Python"] = lambda: _wire._bind(source)
    if args.old:
        old = _load(args.old, "old_wire")

        def use_old() -> None:
            setattr(addon, "snapshot_bytes", old.snapshot_bytes)  # noqa: B010

        encoders["old"] = use_old
    fixed = _wire.snapshot_bytes(
        Client(peername=("a", 1), sockname=("b", 2), timestamp_start=1.0),
        pb.HOOK_CLIENT_CONNECTED,
    )

    def no_encoding() -> None:  # the floor: the hooks' own work, a constant snapshot
        setattr(addon, "snapshot_bytes", lambda *args, **kwargs: fixed)  # noqa: B010

    encoders["no encoding"] = no_encoding
    a = addon.ConnmetaAddon()
    a._connected = True
    mode = ProxyMode.parse("regular")
    times: dict[str, list[float]] = {name: [] for name in encoders}
    per_round = args.requests // args.rounds
    n = 0  # new ports on every request, as a proxy's clients have
    for _ in range(args.rounds):
        for name, use in encoders.items():
            setattr(addon, "snapshot_bytes", _wire.snapshot_bytes)  # noqa: B010
            use()
            for _ in range(per_round):
                n += 1
                times[name].append(_one(a, mode, n))
    _wire._bind(_wirecore)
    for name, values in times.items():
        median = statistics.median(values) * 1e6
        print(f"{name:12} {median:7.1f} µs per request (median of {len(values)})")


if __name__ == "__main__":
    main()
