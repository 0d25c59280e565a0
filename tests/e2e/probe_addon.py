"""A mitmdump script for the e2e tests: mitmproxy's own view, written down.

Loaded after the connmeta addon (``-s addon.py -s probe_addon.py``), so each
hook here sees the objects as the connmeta addon left them. Writes, under
$CONNMETA_PROBE_DIR: ``listen`` (the proxy's listen addresses, from
``running``) and ``hooks.log`` (one Python literal per line: hook, kind, id,
state and get_state() of the connection, or the request's target for HTTP
hooks). Python literals because get_state() holds bytes and tuples.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from mitmproxy import ctx, http, tls
from mitmproxy.connection import Client, Connection
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

_DIR = Path(os.environ["CONNMETA_PROBE_DIR"])


def _write(entry: dict[str, Any]) -> None:
    entry["t"] = time.time()
    # Small appends from the proxy's loop: acceptable in a test probe only.
    with (_DIR / "hooks.log").open("a") as f:
        f.write(repr(entry) + "\n")


def _conn(hook: str, conn: Connection, client_id: str = "") -> None:
    _write(
        {
            "hook": hook,
            "kind": "client" if isinstance(conn, Client) else "server",
            "id": conn.id,
            "client_id": client_id,
            "state": int(conn.state.value),
            "get_state": conn.get_state(),
        }
    )


class Probe:
    async def running(self) -> None:
        proxyserver: Any = ctx.master.addons.get("proxyserver")  # type: ignore[no-untyped-call]
        addrs = proxyserver.listen_addrs()
        tmp = _DIR / "listen.tmp"
        tmp.write_text(json.dumps([list(a[:2]) for a in addrs]))
        tmp.rename(_DIR / "listen")

    async def client_connected(self, client: Client) -> None:
        _conn("client_connected", client)

    async def client_disconnected(self, client: Client) -> None:
        _conn("client_disconnected", client)

    async def server_connect(self, data: ServerConnectionHookData) -> None:
        _conn("server_connect", data.server, data.client.id)

    async def server_connected(self, data: ServerConnectionHookData) -> None:
        _conn("server_connected", data.server, data.client.id)

    async def server_connect_error(self, data: ServerConnectionHookData) -> None:
        _conn("server_connect_error", data.server, data.client.id)

    async def server_disconnected(self, data: ServerConnectionHookData) -> None:
        _conn("server_disconnected", data.server, data.client.id)

    async def tls_established_client(self, data: tls.TlsData) -> None:
        _conn("tls_established_client", data.conn)

    async def tls_established_server(self, data: tls.TlsData) -> None:
        _conn("tls_established_server", data.conn, data.context.client.id)

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        _write({"hook": "http_connect", "target": [flow.request.host, flow.request.port]})

    async def request(self, flow: http.HTTPFlow) -> None:
        _write(
            {
                "hook": "request",
                "target": [flow.request.host, flow.request.port],
                "server_id": flow.server_conn.id,
                "via": flow.server_conn.via,
            }
        )


addons = [Probe()]
