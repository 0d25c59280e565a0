"""Real processes and sockets for the e2e tests: the sidecar, mitmdump, loopback
origins, a blocking HTTP client, and a router speaking RouterService."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import http.client
import ipaddress
import json
import os
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import certs
from mitmproxy import dns as mdns

from connmeta.mitm.paths import addon_path
from connmeta.v1 import connection_service_pb2_grpc as cs_grpc
from connmeta.v1 import router_service_pb2 as rt
from connmeta.v1 import router_service_pb2_grpc as rt_grpc

VENV_BIN = Path(sys.executable).parent
HERE = Path(__file__).parent
PROBE = HERE / "probe_addon.py"
SHORT_UDP_TIMEOUT = HERE / "short_udp_timeout.py"

for _var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
    os.environ.pop(_var, None)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


async def async_wait_for(predicate: Callable[[], Awaitable[Any]], within: float, what: str) -> Any:
    end = time.monotonic() + within
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


# -- the sidecar ---------------------------------------------------------------


class SidecarProcess:
    """``connmeta serve`` (with routing) as a subprocess on a fixed Unix socket."""

    def __init__(self, unix_socket: Path, args: Sequence[str] = ()) -> None:
        self.unix_socket = unix_socket
        self.args = list(args)
        self.proc: subprocess.Popen[str] | None = None
        self.tcp = ""
        self.metrics = ""
        """HOST:PORT of its /metrics (a new port after every start)."""

    @property
    def target(self) -> str:
        return f"unix://{self.unix_socket}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connmeta", "serve", "--listen", "127.0.0.1:0",
             "--unix-socket", str(self.unix_socket), "--metrics-listen", "127.0.0.1:0",
             *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("connmeta "), f"unexpected first line {line!r}"
        parts = dict(p.split("=", 1) for p in line.split() if "=" in p)
        self.tcp = parts["tcp"]
        self.metrics = parts["metrics"]

    def scrape(self) -> str:
        """The text exposition of its /metrics."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def kill(self) -> None:
        """SIGKILL: no goodbye to the proxy, like a crash."""
        if self.proc is not None:
            self.proc.kill()
            self._reap()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self._reap()

    def _reap(self) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target)


# -- mitmdump ------------------------------------------------------------------


@dataclass
class Mitmdump:
    """A mitmdump subprocess with the connmeta addon and the probe."""

    directory: Path
    args: list[str]
    with_connmeta: bool = True
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        scripts = ["-s", addon_path()] if self.with_connmeta else []
        self._log = (self.directory / "log").open("ab")
        env = {**os.environ, "CONNMETA_PROBE_DIR": str(self.directory)}
        conf = f"confdir={self.directory / 'conf'}"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mitmdump"), "--set", "flow_detail=0", "--listen-host", "127.0.0.1",
             "--listen-port", "0", *scripts, "-s", str(PROBE), "--set", conf, *self.args],
            env=env,
            stdout=self._log,  # mitmproxy's log: addon errors, connmeta warnings
            stderr=self._log,
        )  # fmt: skip
        listen = self.directory / "listen"
        wait_for(lambda: listen.exists() or self.proc.poll() is not None, 30, "mitmdump")  # type: ignore[union-attr]
        assert self.proc.poll() is None, (self.directory / "log").read_text()
        self.port = int(json.loads(listen.read_text())[0][1])

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.directory / "conf" / "mitmproxy-ca-cert.pem"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
            self._log.close()

    def hooks(self) -> list[dict[str, Any]]:
        """Every entry the probe wrote so far."""
        path = self.directory / "hooks.log"
        if not path.exists():
            return []
        return [ast.literal_eval(line) for line in path.read_text().splitlines() if line]

    def log(self) -> str:
        return (self.directory / "log").read_text(errors="replace")


def live_in_proxy(proxy: Mitmdump) -> set[str]:
    """Connections mitmproxy opened and has not reported closed."""
    live: set[str] = set()
    for entry in proxy.hooks():
        if entry["hook"] in ("client_connected", "server_connected"):
            live.add(entry["id"])
        elif entry["hook"] in ("client_disconnected", "server_disconnected"):
            live.discard(entry["id"])
    return live


# -- origins -------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a server connection can stay OPEN
    # Headers and body leave in two writes: without TCP_NODELAY, Nagle and
    # delayed ACKs add 40 ms to every response.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        body = f"{self.server.name}:{self.path}".encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Origin:
    name: str
    server: ThreadingHTTPServer
    tls: bool = False

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        host = "localhost" if self.tls else "127.0.0.1"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


@contextlib.contextmanager
def origin(name: str, tls_context: ssl.SSLContext | None = None) -> Iterator[Origin]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.name = name  # type: ignore[attr-defined]
    if tls_context is not None:
        server.socket = tls_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Origin(name, server, tls_context is not None)
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class OriginCA:
    ca_pem: Path
    context: ssl.SSLContext


def origin_ca(directory: Path) -> OriginCA:
    """A CA made by mitmproxy's CertStore and a localhost leaf it signed."""
    directory.mkdir(parents=True, exist_ok=True)
    store = certs.CertStore.from_store(str(directory), "originca", 2048)
    entry = store.get_cert(
        "localhost",
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    chain = directory / "leaf.pem"
    chain.write_bytes(
        entry.cert.to_pem()
        + entry.privatekey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    return OriginCA(directory / "originca-ca-cert.pem", context)


class _UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(self.server.answer(data), self.client_address)  # type: ignore[attr-defined]


@contextlib.contextmanager
def udp_origin(answer: Callable[[bytes], bytes]) -> Iterator[int]:
    """A UDP server on loopback answering each datagram with ``answer(data)``;
    yields its port."""
    server = socketserver.ThreadingUDPServer(("127.0.0.1", 0), _UdpHandler)
    server.daemon_threads = True
    server.answer = answer  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def dns_answer(query: bytes) -> bytes:
    """A DNS server's answer: every name is 127.0.0.1."""
    message = mdns.DNSMessage.unpack(query)
    name = message.questions[0].name
    return message.succeed([mdns.ResourceRecord.A(name, ipaddress.IPv4Address("127.0.0.1"))]).packed


# -- clients -------------------------------------------------------------------


def get(proxy: str, url: str, cafile: Path | None = None, timeout: float = 10) -> str:
    """One GET through the proxy (a new client connection, closed after)."""
    handlers: list[Any] = [urllib.request.ProxyHandler({"http": proxy, "https": proxy})]
    if cafile is not None:
        context = ssl.create_default_context(cafile=cafile)
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    with opener.open(url, timeout=timeout) as response:
        return str(response.read().decode())


async def routing_reached(proxy: Mitmdump, active: bool = True, within: float = 10) -> None:
    """Until the proxy's addon knows whether a router is subscribed (the
    routing state travels sidecar → report stream → addon)."""
    want = "active" if active else "inactive"

    async def reached() -> bool:
        url = "http://connmeta-control.invalid/routing"
        return await asyncio.to_thread(get, proxy.proxy, url) == want

    await async_wait_for(reached, within, f"routing {want} in the proxy")


def _read_http_body(sock: socket.socket) -> str:
    """The body of one HTTP/1.1 response sent with Connection: close."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:80]
    return body.decode()


def raw_get(port: int, path: str, sock: socket.socket | None = None) -> str:
    """GET ``path`` over a plain TCP connection to 127.0.0.1:port (reverse
    modes), or over ``sock`` (an established SOCKS5 tunnel), then close."""
    sock = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n".encode())
        return _read_http_body(sock)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def socks5_get(proxy_port: int, target_port: int, path: str) -> str:
    """GET through a SOCKS5 proxy (no authentication) to 127.0.0.1:target_port."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert _recv_exact(sock, 2) == b"\x05\x00"
    sock.sendall(
        b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", target_port)
    )
    reply = _recv_exact(sock, 10)
    assert reply[1] == 0, f"SOCKS5 connect refused: {reply!r}"
    return raw_get(proxy_port, path, sock)


def dns_query(name: str, query_id: int = 0x1234) -> bytes:
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return header + qname + struct.pack("!HH", 1, 1)  # type A, class IN


def udp_exchange(port: int, payload: bytes) -> bytes:
    """One datagram to 127.0.0.1:port and its answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(payload, ("127.0.0.1", port))
        return sock.recv(65536)


class KeepAlive:
    """One client connection to the proxy that stays open between requests."""

    def __init__(self, proxy_port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)

    def get(self, url: str) -> str:
        self.conn.request("GET", url)
        return self.conn.getresponse().read().decode()

    def close(self) -> None:
        self.conn.close()


# -- the sidecar's API -----------------------------------------------------------


def stub(channel: grpc.aio.Channel) -> cs_grpc.ConnectionServiceAsyncStub:
    return cs_grpc.ConnectionServiceStub(channel)


Decide = Callable[[rt.RouteQuery], rt.RouteAnswer | None]


@dataclass
class RouterClient:
    """A router over RouterService; ``decide`` returning None never answers."""

    channel: grpc.aio.Channel
    name: str
    decide: Decide
    queries: list[rt.RouteQuery] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RouterClient:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.subscribed.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        outgoing: asyncio.Queue[rt.RouteRequest] = asyncio.Queue()
        outgoing.put_nowait(rt.RouteRequest(subscribe=rt.RouteSubscribe(name=self.name)))

        async def requests() -> AsyncIterator[rt.RouteRequest]:
            while True:
                yield await outgoing.get()

        call = rt_grpc.RouterServiceStub(self.channel).Route(requests())
        async for response in call:
            if response.WhichOneof("message") == "subscribed":
                if response.subscribed.active:
                    self.subscribed.set()
                continue
            self.queries.append(response.query)
            answer = self.decide(response.query)
            if answer is not None:
                answer.query_id = response.query.query_id
                outgoing.put_nowait(rt.RouteRequest(answer=answer))
