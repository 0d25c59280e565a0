"""A mitmdump script for the e2e tests: UDP "connections" end after 1 s idle.

mitmproxy has no option for it: a UDP client is disconnected after
``mitmproxy.proxy.server.UDP_TIMEOUT`` (20 s) without datagrams, read when
each connection handler starts. Tests that wait for a UDP client to close
load this to wait one second instead.
"""

from __future__ import annotations

from mitmproxy.proxy import server

server.UDP_TIMEOUT = 1
