"""A mitmdump script: an addon with the connmeta addon's hooks, each doing
nothing. What mitmproxy's dispatch alone costs an addon that implements them
(looking the hook up on every event, building its arguments, the call): the
floor under the connmeta addon's overhead in bench/proxy_bench.py."""

from __future__ import annotations

from typing import Any


def _nothing(self: Any, data: Any) -> None:
    pass


# The hooks the connmeta addon implements on every event (requestheaders only
# while a via waits to be applied, so not here).
_HOOKS = (
    "client_connected", "client_disconnected", "server_connect", "server_connected",
    "server_connect_error", "server_disconnected", "tls_established_client",
    "tls_established_server", "tls_failed_client", "tls_failed_server", "http_connected",
    "responseheaders", "error", "tcp_start",
)  # fmt: skip

NoopHooks = type("NoopHooks", (), dict.fromkeys(_HOOKS, _nothing))
addons = [NoopHooks()]
