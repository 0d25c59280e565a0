"""A mitmdump script for the e2e tests: mitmproxy's own view, written down.

Loaded after the connmeta addon (``-s addon.py -s probe_addon.py``), so each
hook here sees the objects as the connmeta addon left them. Writes, under
$CONNMETA_PROBE_DIR: ``listen`` (the proxy's listen addresses, from
``running``) and ``hooks.log`` (one Python literal per line: hook, kind, id,
state and get_state() of the connection, or the request's target for HTTP
hooks). Python literals because get_state() holds bytes and tuples. It
also lets a test set options at runtime (``CONTROL_HOST``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from mitmproxy import ctx, dns, http, tcp, tls, udp
from mitmproxy.connection import Client, Connection
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

_DIR = Path(os.environ["CONNMETA_PROBE_DIR"])
CONTROL_HOST = "connmeta-control.invalid"
"""A request to http://connmeta-control.invalid/?option=value sets options."""


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


def _flow(hook: str, flow: http.HTTPFlow | tcp.TCPFlow | udp.UDPFlow | dns.DNSFlow) -> None:
    server = flow.server_conn
    _write(
        {
            "hook": hook,
            "client_id": flow.client_conn.id,
            "server_id": server.id,
            "server_state": int(server.state.value),
            "server": server.get_state(),
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
        if flow.request.host == CONTROL_HOST:
            if flow.request.path == "/routing":
                # Whether the connmeta addon knows a router is subscribed: a
                # test waits for it instead of sleeping a guessed while.
                addon: Any = ctx.master.addons.get("connmetaaddon")  # type: ignore[no-untyped-call]
                active = bool(addon is not None and addon._routing_active)
                flow.response = http.Response.make(200, b"active" if active else b"inactive")
                return
            # Options set at runtime, as an operator would with mitmweb:
            # answered here, so no server connection is made.
            # Parsed as --set parses them, so numbers work too.
            ctx.options.set(*(f"{k}={v}" for k, v in flow.request.query.items()))
            flow.response = http.Response.make(200, b"ok")
            return
        _write(
            {
                "hook": "request",
                "target": [flow.request.host, flow.request.port],
                "server_id": flow.server_conn.id,
                "via": flow.server_conn.via,
            }
        )

    # The server a flow really used (for a request through an upstream
    # proxy: the logical server, which no server_* hook sees). Written under
    # "server_id", not "id", so views built from connection hooks ignore it.

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        _flow("responseheaders", flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        _flow("error", flow)

    async def tcp_start(self, flow: tcp.TCPFlow) -> None:
        _flow("tcp_start", flow)

    async def udp_start(self, flow: udp.UDPFlow) -> None:
        _flow("udp_start", flow)

    async def dns_response(self, flow: dns.DNSFlow) -> None:
        _flow("dns_response", flow)


addons = [Probe()]
