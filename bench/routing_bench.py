"""Routing hold: what a subscribed router adds to a server connect.

    .venv/bin/python -m bench routing          (or bench/routing_bench.py [--connects N])

One mitmdump with the connmeta addon reports to a real sidecar over its Unix
socket, as in the pod. One client makes requests one after another, each on a
new connection (so each has a server connect), through the proxy to a local
origin. A router process answers every query at once with "no change"; it
subscribes and unsubscribes in alternating blocks of connects, so both series
come from the same run under the same machine load. Two figures per series:

- end-to-end request latency seen by the client: the figure a user sees, the
  router's share being the difference of the two series;
- the time ``server_connect`` is held inside the proxy, measured by two timing
  addons loaded around the connmeta addon.

Each connect is tagged inside the proxy with whether the addon believed a
router was subscribed when the hook started; a connect whose tag does not
match its block (the routing state was still on its way) is left out and
counted.

The router is the leanest we have in Python: grpc.aio in the call's
``write()``/``read()`` form, one coroutine, no queue, no iterator, answering
each query before it reads the next (queries come one at a time here). Its
CPU per query is printed beside the sidecar's and the proxy's, so a slow
router would show.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench._report import Figure, verdict

REPO = Path(__file__).resolve().parent.parent
GOAL_MS = 1.5
COMMAND = "python -m bench routing"


# -- the mitmdump side ---------------------------------------------------------


def _mitmdump_addons() -> list[Any]:
    from mitmproxy import ctx
    from mitmproxy.proxy.server_hooks import ServerConnectionHookData

    from connmeta.mitm.addon import ConnmetaAddon

    out = Path(os.environ["BENCH_DIR"])
    connmeta = ConnmetaAddon()
    started: dict[str, tuple[float, bool]] = {}
    held: list[tuple[float, bool]] = []

    class Listen:
        async def running(self) -> None:
            proxyserver: Any = ctx.master.addons.get("proxyserver")  # type: ignore[no-untyped-call]
            (out / "listen.tmp").write_text(json.dumps(proxyserver.listen_addrs()[0][1]))
            (out / "listen.tmp").rename(out / "listen")

    class Start:
        async def server_connect(self, data: ServerConnectionHookData) -> None:
            routing = connmeta._routing_active and connmeta._connected
            started[data.server.id] = (time.perf_counter(), routing)

    class End:
        async def server_connect(self, data: ServerConnectionHookData) -> None:
            start, routing = started.pop(data.server.id)
            held.append((time.perf_counter() - start, routing))

        async def done(self) -> None:
            (out / "held.json").write_text(json.dumps(held))

    return [Listen(), Start(), connmeta, End()]


if __name__ != "__main__" and "BENCH_DIR" in os.environ:
    addons = _mitmdump_addons()


# -- the router ------------------------------------------------------------------


async def _router(target: str, tls: list[bytes] | None = None) -> None:
    """Subscribe on "on", leave on "off" (lines on stdin); answer every query
    at once with "no change". Prints "subscribed" / "left" when done. ``tls``:
    CA, certificate and key (PEM) for mTLS over TCP."""
    import grpc

    from connmeta.v1 import router_service_pb2 as rt
    from connmeta.v1 import router_service_pb2_grpc as rt_grpc

    loop = asyncio.get_running_loop()
    if tls:
        ca, cert, key = tls
        credentials = grpc.ssl_channel_credentials(ca, key, cert)
        channel = grpc.aio.secure_channel(target, credentials)
    else:
        channel = grpc.aio.insecure_channel(target)
    stub = rt_grpc.RouterServiceStub(channel)
    subscribe = rt.RouteRequest(subscribe=rt.RouteSubscribe(name="bench"))
    call: Any = None
    serving: asyncio.Task[None] | None = None

    async def serve(call: Any) -> None:
        await call.write(subscribe)
        first = await call.read()
        assert first.WhichOneof("message") == "subscribed", first
        print("subscribed", flush=True)
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            await call.write(
                rt.RouteRequest(answer=rt.RouteAnswer(query_id=response.query.query_id))
            )

    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        command = line.strip()
        if command == "on":
            call = stub.Route()
            serving = asyncio.create_task(serve(call))
        elif command == "off" and call is not None and serving is not None:
            await call.done_writing()
            await serving
            print("left", flush=True)
        else:
            return


# -- a bare grpcio relay: the floor --------------------------------------------------


async def _bare_relay(path: str) -> None:
    """What grpcio alone costs for a routed connect: the same four messages
    (report in, query out, answer in, decision out, plus the report's ack),
    each parsed and built with the public types, no store, no checks. Serves
    ReportService and RouterService on the Unix socket ``path``; prints
    "serving" once it does."""
    import grpc

    from connmeta.v1 import report_service_pb2 as rs
    from connmeta.v1 import router_service_pb2 as rt

    queries: asyncio.Queue[bytes] = asyncio.Queue()
    waiting: dict[str, asyncio.Queue[bytes]] = {}
    ids = iter(range(1, 1 << 62))

    async def route(requests: Any, context: Any) -> Any:
        await anext(requests)  # subscribe
        yield rt.RouteResponse(
            subscribed=rt.RouteSubscribed(active=True, active_router="bench")
        ).SerializeToString()

        async def read() -> None:
            async for data in requests:
                answer = rt.RouteRequest.FromString(data).answer
                out = waiting.pop(answer.query_id, None)
                if out is not None:
                    decision = rs.RouteDecision(query_id=answer.query_id, actor="bench")
                    out.put_nowait(rs.ReportResponse(route_decision=decision).SerializeToString())

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await queries.get()
        finally:
            reader.cancel()

    async def report(requests: Any, context: Any) -> Any:
        out: asyncio.Queue[bytes] = asyncio.Queue()
        yield rs.ReportResponse(
            routing_state=rs.RoutingState(active=True, router="bench")
        ).SerializeToString()

        async def read() -> None:
            async for data in requests:
                request = rs.ReportRequest.FromString(data)
                for snap in request.batch.snapshots:
                    if snap.WhichOneof("connection") == "server" and snap.hook == 3:
                        query_id = str(next(ids))
                        waiting[query_id] = out
                        query = rt.RouteQuery(query_id=query_id)
                        query.server.server.CopyFrom(snap.server)
                        queries.put_nowait(rt.RouteResponse(query=query).SerializeToString())
                ack = rs.ReportAck(sequence=request.sequence)
                out.put_nowait(rs.ReportResponse(ack=ack).SerializeToString())

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await out.get()
        finally:
            reader.cancel()

    def identity(data: bytes) -> bytes:
        return data

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                service,
                {
                    method: grpc.stream_stream_rpc_method_handler(
                        handler, request_deserializer=identity, response_serializer=identity
                    )
                },
            )
            for service, method, handler in (
                ("connmeta.v1.ReportService", "Report", report),
                ("connmeta.v1.RouterService", "Route", route),
            )
        ]
    )
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


def _connect_snapshots() -> tuple[Any, Any]:
    """A new client and its server in server_connect, held, as the addon
    reports them."""
    from connmeta.v1 import connection_pb2 as pb
    from connmeta.v1 import report_service_pb2 as rs

    tcp = pb.TRANSPORT_PROTOCOL_TCP
    client = pb.Connection(id=str(uuid.uuid4()), state=pb.CONNECTION_STATE_OPEN,
                           transport_protocol=tcp,
                           peername=pb.Address(host="198.51.100.7", port=51234),
                           sockname=pb.Address(host="127.0.0.1", port=8080))  # fmt: skip
    client.timestamp_start.GetCurrentTime()
    server = pb.Connection(
        id=str(uuid.uuid4()), state=pb.CONNECTION_STATE_CLOSED, transport_protocol=tcp
    )
    return (
        rs.ConnectionSnapshot(
            hook=pb.HOOK_CLIENT_CONNECTED,
            client=pb.Client(connection=client, proxy_mode=pb.ProxyMode(full_spec="regular")),
        ),
        rs.ConnectionSnapshot(
            hook=pb.HOOK_SERVER_CONNECT,
            client_id=client.id,
            server=pb.Server(
                connection=server, address=pb.Address(host="origin.example", port=443)
            ),
            route_hold=rs.ROUTE_HOLD_HELD,
        ),
    )


async def _round_trips(target: str, count: int) -> list[float]:
    """A proxy without mitmproxy: report a client and its server in
    server_connect (held), wait for the decision; ``count`` times, in µs."""
    import grpc

    from connmeta.v1 import report_service_pb2 as rs
    from connmeta.v1 import report_service_pb2_grpc as rs_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        call = rs_grpc.ReportServiceStub(channel).Report()
        decided: asyncio.Queue[float] = asyncio.Queue()

        async def read() -> None:
            while (response := await call.read()) is not grpc.aio.EOF:
                assert isinstance(response, rs.ReportResponse)
                if response.WhichOneof("message") == "route_decision":
                    decided.put_nowait(time.perf_counter())

        reader = asyncio.create_task(read())
        times = []
        try:
            for i in range(count):
                client, server = _connect_snapshots()
                request = rs.ReportRequest(
                    sequence=i + 1, batch=rs.ReportBatch(snapshots=[client, server])
                )
                if i == 0:
                    request.proxy_id = "bench"
                started = time.perf_counter()
                await call.write(request)
                times.append((await asyncio.wait_for(decided.get(), 5) - started) * 1e6)
                await asyncio.sleep(0.002)  # a connect now and then, not a flood
        finally:
            reader.cancel()
            call.cancel()
    return times


# -- the bench side --------------------------------------------------------------


class _Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _request(proxy_port: int, origin_port: int) -> float:
    """One request on a new connection through the proxy; seconds taken."""
    request = (
        f"GET http://127.0.0.1:{origin_port}/ HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", proxy_port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(request)
        received = b""
        while not received.endswith(b"ok"):
            chunk = conn.recv(4096)
            if not chunk:
                raise RuntimeError(f"proxy closed early: {received!r}")
            received += chunk
    return time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@functools.cache
def _go_router() -> Path:
    """bench/gorouter built once per run, into a directory removed at exit."""
    directory = tempfile.TemporaryDirectory(prefix="connmeta-gorouter-")
    atexit.register(directory.cleanup)
    binary = Path(directory.name) / "gorouter"
    subprocess.run(
        ["go", "build", "-o", str(binary), "."],
        cwd=REPO / "bench" / "gorouter",
        check=True,
        env={**os.environ, "GOFLAGS": "-mod=mod"},
    )
    return binary


def _router_command(kind: str, target: str, tls: list[str] | None = None) -> list[str]:
    """The router process: "go" (bench/gorouter) or "python"; ``tls``: CA,
    certificate and key for mTLS to a TCP ``target``."""
    if kind == "go":
        return [str(_go_router()), target, *(tls or [])]
    command = [sys.executable, "-m", "bench.routing_bench", "--router", target]
    return command + (["--router-tls", *tls] if tls else [])


def default_router() -> str:
    """Go when it is installed (``make test`` needs it anyway): its router
    costs a fraction of grpc.aio's CPU per message."""
    return "go" if shutil.which("go") else "python"


class _Run:
    """Processes of one measurement: sidecar, origin, mitmdump, router."""

    def __init__(self, tmp: Path, router: str) -> None:
        self.tmp = tmp
        sock = tmp / "connmeta.sock"
        self.target = f"unix://{sock}"
        self.sidecar = subprocess.Popen(
            [sys.executable, "-m", "connmeta", "serve", "--listen", "", "--unix-socket", str(sock)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.sidecar.stdout is not None
        self.sidecar.stdout.readline()
        self.origin = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
        self.origin.daemon_threads = True
        threading.Thread(target=self.origin.serve_forever, daemon=True).start()
        self.origin_port = int(self.origin.server_address[1])
        directory = tmp / "proxy"
        directory.mkdir()
        path = os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), str(REPO))))
        env = {**os.environ, "BENCH_DIR": str(directory), "PYTHONPATH": path}
        self.proxy = subprocess.Popen(
            [str(Path(sys.executable).parent / "mitmdump"), "-q", "--listen-host", "127.0.0.1",
             "--listen-port", "0", "-s", __file__, "--set", f"confdir={directory / 'conf'}",
             "--set", f"connmeta_target={self.target}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        end = time.monotonic() + 30
        while not (directory / "listen").exists():
            if time.monotonic() > end or self.proxy.poll() is not None:
                raise RuntimeError("mitmdump did not start")
            time.sleep(0.05)
        self.proxy_port = int((directory / "listen").read_text())
        self.router = subprocess.Popen(
            _router_command(router, self.target),
            cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.held_file = directory / "held.json"

    def route(self, on: bool) -> None:
        assert self.router.stdin is not None
        assert self.router.stdout is not None
        self.router.stdin.write("on\n" if on else "off\n")
        self.router.stdin.flush()
        line = self.router.stdout.readline().strip()
        assert line == ("subscribed" if on else "left"), line
        time.sleep(0.1)  # the RoutingState reaches the proxy

    def close(self) -> list[tuple[float, bool]]:
        for proc in (self.router, self.proxy, self.sidecar):
            proc.terminate()
            proc.wait(10)
        for stream in (self.router.stdin, self.router.stdout, self.sidecar.stdout):
            if stream is not None:
                stream.close()
        self.origin.shutdown()
        self.origin.server_close()
        return [(seconds, routed) for seconds, routed in json.loads(self.held_file.read_text())]


def measure(connects: int, router: str, block: int = 50) -> dict[str, Any]:
    """``connects`` per series, in alternating blocks of ``block``."""
    with tempfile.TemporaryDirectory(prefix="connmeta-bench-") as directory:
        run = _Run(Path(directory), router)
        try:
            warmup = min(50, connects // 5)
            for _ in range(warmup):  # warm up: the addon's stream, mitmproxy's caches
                _request(run.proxy_port, run.origin_port)
            run.route(True)
            for _ in range(warmup):
                _request(run.proxy_port, run.origin_port)
            run.route(False)
            warmup *= 2
            e2e: dict[bool, list[float]] = {False: [], True: []}
            order: list[bool] = []
            cpu = {
                routed: dict.fromkeys(("proxy", "sidecar", "router"), 0.0)
                for routed in (False, True)
            }
            pids = {"proxy": run.proxy.pid, "sidecar": run.sidecar.pid, "router": run.router.pid}
            routed = False
            while len(e2e[True]) < connects or len(e2e[False]) < connects:
                if len(e2e[routed]) >= connects:
                    routed = not routed
                if routed:
                    run.route(True)
                before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
                for _ in range(block):
                    e2e[routed].append(_request(run.proxy_port, run.origin_port))
                    order.append(routed)
                for name, pid in pids.items():
                    cpu[routed][name] += _cpu_seconds(pid) - before[name]
                if routed:
                    run.route(False)
                routed = not routed
        finally:
            held = run.close()
    measured = held[warmup:]
    assert len(measured) == len(order), (len(measured), len(order))
    hold: dict[bool, list[float]] = {False: [], True: []}
    latency: dict[bool, list[float]] = {False: [], True: []}
    mismatched = 0
    it = {False: iter(e2e[False]), True: iter(e2e[True])}
    for routed, (seconds, tagged) in zip(order, measured, strict=True):
        latency_s = next(it[routed])
        if routed != tagged:
            mismatched += 1
            continue
        hold[routed].append(seconds * 1000)
        latency[routed].append(latency_s * 1000)
    return {
        "hold": hold,
        "latency": latency,
        "mismatched": mismatched,
        # CPU per connect, from /proc in clock ticks (10 ms): read the
        # difference of the two series, over many blocks.
        "cpu_us": {
            routed: {k: v / len(e2e[routed]) * 1e6 for k, v in cpu[routed].items()}
            for routed in (False, True)
        },
    }


def measure_round_trips(count: int, rounds: int, router: str) -> dict[str, list[float]]:
    """Decision round trips of a proxy without mitmproxy (``_round_trips``),
    in µs, each series with its own server and router of kind ``router``,
    in alternating rounds:

    - "connmeta": the router on the sidecar's Unix socket, like the proxy;
    - "connmeta-mtls": the router over loopback TCP with mTLS, as a router in
      another container of the pod reaches the sidecar (the proxy stays on
      the Unix socket);
    - "bare": the bare grpcio relay (``_bare_relay``), router on its socket.
    """
    with tempfile.TemporaryDirectory(prefix="connmeta-bench-") as directory:
        tmp = Path(directory)
        certs = tmp / "certs"
        subprocess.run(
            [sys.executable, "-m", "connmeta", "certs", "init", "--dir", str(certs)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        mtls = [
            "--listen", "127.0.0.1:0", "--tls-cert", str(certs / "server.pem"),
            "--tls-key", str(certs / "server.key"), "--client-ca", str(certs / "ca.pem"),
            "--authz-policy", str(certs / "policy.json"),
        ]  # fmt: skip
        router_tls = [str(certs / name) for name in ("ca.pem", "router.pem", "router.key")]
        procs: list[subprocess.Popen[str]] = []
        try:
            targets = {}
            for kind in ("connmeta", "connmeta-mtls", "bare"):
                path = tmp / f"{kind}.sock"
                command = (
                    ["-m", "bench.routing_bench", "--bare-relay", str(path)]
                    if kind == "bare"
                    else ["-m", "connmeta", "serve", "--listen", "", "--unix-socket", str(path)]
                    + (mtls if kind == "connmeta-mtls" else [])
                )
                server = subprocess.Popen(
                    [sys.executable, *command], cwd=REPO, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, text=True,
                )  # fmt: skip
                procs.append(server)
                assert server.stdout is not None
                serving = server.stdout.readline()
                targets[kind] = f"unix://{path}"
                if kind == "connmeta-mtls":
                    tcp = re.search(r"tcp=(\S+)", serving)
                    assert tcp is not None, serving
                    command = _router_command(router, tcp.group(1), router_tls)
                else:
                    command = _router_command(router, targets[kind])
                routing = subprocess.Popen(
                    command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
                procs.append(routing)
                assert routing.stdin is not None
                assert routing.stdout is not None
                routing.stdin.write("on\n")
                routing.stdin.flush()
                assert routing.stdout.readline().strip() == "subscribed"
            out: dict[str, list[float]] = {kind: [] for kind in targets}
            for target in targets.values():  # warm up
                asyncio.run(_round_trips(target, min(50, count // 2)))
            for _ in range(rounds):
                for kind, target in targets.items():
                    out[kind] += asyncio.run(_round_trips(target, count))
            return out
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
                for stream in (proc.stdin, proc.stdout):
                    if stream is not None:
                        stream.close()


def _stats(values: list[float]) -> tuple[float, float, float]:
    return _percentile(values, 0.5), _percentile(values, 0.99), max(values)


def figures(quick: bool) -> list[Figure]:
    router = default_router()
    connects = 150 if quick else 1000
    result = measure(connects, router)
    trips = measure_round_trips(connects // 5, 5, router)
    return _figures(result, connects, router) + _trip_figures(trips, router)


def _trip_figures(trips: dict[str, list[float]], router: str) -> list[Figure]:
    ms = {kind: [v / 1000 for v in values] for kind, values in trips.items()}
    unix, mtls, bare = _stats(ms["connmeta"]), _stats(ms["connmeta-mtls"]), _stats(ms["bare"])
    note = (
        f"a proxy without mitmproxy reports a client and its held server_connect and waits "
        f"for the decision; {router} router; {len(ms['bare'])} round trips each, 5 "
        "alternating rounds"
    )
    return [
        Figure(
            "routing: decision round trip through the sidecar (proxy and router on Unix "
            "sockets), connmeta vs a bare grpcio relay of the same messages",
            f"p50 {unix[0]:.2f} ms, p99 {unix[1]:.2f} ms",
            f"bare: p50 {bare[0]:.2f} ms, p99 {bare[1]:.2f} ms",
            f"{unix[0] / bare[0]:.2f} (p50)",
            f"the floor of the hold above: {note}",
            COMMAND,
        ),
        Figure(
            "routing: the same round trip with the router over loopback TCP and mTLS "
            "(a router in another container of the pod)",
            f"p50 {mtls[0]:.2f} ms, p99 {mtls[1]:.2f} ms",
            f"router on the Unix socket: p50 {unix[0]:.2f} ms, p99 {unix[1]:.2f} ms",
            f"{mtls[0] / unix[0]:.2f} (p50)",
            "",
            COMMAND,
        ),
    ]


def _figures(result: dict[str, Any], connects: int, router: str) -> list[Figure]:
    hold, latency = result["hold"], result["latency"]
    h_on, h_off = _stats(hold[True]), _stats(hold[False])
    l_on, l_off = _stats(latency[True]), _stats(latency[False])
    added50, added99 = l_on[0] - l_off[0], l_on[1] - l_off[1]
    on, off = result["cpu_us"][True], result["cpu_us"][False]
    note = (
        f"{router} router; {connects} connects per series, alternating blocks of 50; "
        "CPU a routed connect "
        f"adds: proxy {on['proxy'] - off['proxy']:.0f} µs, sidecar "
        f"{on['sidecar'] - off['sidecar']:.0f} µs, router {on['router']:.0f} µs; "
        f"{result['mismatched']} connects left out (routing state in transit)"
    )
    return [
        Figure(
            "routing: end-to-end request latency added by a router answering at once "
            "(new connection per request, proxy ↔ sidecar and router ↔ sidecar on Unix sockets)",
            f"{added50:+.2f} ms p50, {added99:+.2f} ms p99 "
            f"(with router: p50 {l_on[0]:.2f}, p99 {l_on[1]:.2f} ms)",
            f"no router: p50 {l_off[0]:.2f} ms, p99 {l_off[1]:.2f} ms",
            f"{l_on[1] / l_off[1]:.2f} (p99)",
            verdict(added99, GOAL_MS, higher_is_better=False, unit=" ms") + f"; {note}",
            COMMAND,
        ),
        Figure(
            "routing: `server_connect` held, router answering at once",
            f"p50 {h_on[0]:.3f} ms, p99 {h_on[1]:.3f} ms, max {h_on[2]:.3f} ms",
            f"no router: p50 {h_off[0]:.3f} ms, p99 {h_off[1]:.3f} ms, max {h_off[2]:.3f} ms",
            "",
            verdict(h_on[1], GOAL_MS, higher_is_better=False, unit=" ms"),
            COMMAND,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connects", type=int, default=1000, help="per series")
    parser.add_argument("--router-kind", choices=("go", "python"), default=default_router())
    parser.add_argument("--router", metavar="TARGET", help=argparse.SUPPRESS)
    parser.add_argument("--router-tls", nargs=3, metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--bare-relay", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--round-trips", action="store_true", help="only the round-trip figure")
    args = parser.parse_args()
    if args.router:
        tls = [Path(name).read_bytes() for name in args.router_tls or ()]
        asyncio.run(_router(args.router, tls or None))
        return
    if args.bare_relay:
        asyncio.run(_bare_relay(args.bare_relay))
        return
    trips = measure_round_trips(args.connects // 5, 5, args.router_kind)
    rows = _trip_figures(trips, args.router_kind)
    if not args.round_trips:
        result = measure(args.connects, args.router_kind)
        rows = _figures(result, args.connects, args.router_kind) + rows
    for figure in rows:
        print(f"{figure.measure}\n  {figure.value}\n  baseline: {figure.baseline}\n  {figure.goal}")


if __name__ == "__main__":
    main()
