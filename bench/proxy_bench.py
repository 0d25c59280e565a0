"""What the connmeta addon costs mitmproxy, measured on real processes.

    .venv/bin/python -m bench proxy [--quick]
    .venv/bin/python -m bench.proxy_bench [--quick]

1. The plain pair: ``mitmdump`` with nothing else loaded beside ``mitmdump -s
   <addon>`` reporting into a real sidecar over its Unix socket (as in the
   pod). The same client load (one new client connection per request, the
   addon's worst case) alternates between them, round after round, the order
   flipped each round; plain HTTP (absolute-form requests) and HTTPS (CONNECT,
   then TLS with the proxy, which does TLS with a loopback origin holding a
   self-signed certificate; ``ssl_insecure``, the client skips verification).
   Figures: proxy CPU per request from /proc and requests/s, each as the
   median over rounds of the ratio plain / with addon (goal >= 0.98).
2. Time inside each hook, p50/p99, in a separate proxy whose addon is wrapped
   by timers (never in the pair above: the timers would cost both alike and
   hide part of the difference).

The client and the origin each run in a process of their own (this module
with ``--load`` / ``--origin``), so neither competes with the proxy for a GIL.

Helpers other benchmarks use (keep their names and signatures stable):
``start_sidecar``, ``start_mitmdump``, ``Origin``, ``LoadClient``,
``cpu_seconds``, ``percentile``, ``free_port``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self

from bench.timed_hooks import HOOKS

if TYPE_CHECKING:
    from bench._report import Figure

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
VENV_BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
COMMAND = "python -m bench proxy"

for _var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
    os.environ.pop(_var, None)


# -- processes ------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values``, nearest rank; 0 for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


@dataclass
class Sidecar:
    proc: subprocess.Popen[str]
    target: str
    """``unix:///path``, as ``connmeta_target`` takes it."""


@contextlib.contextmanager
def start_sidecar(directory: Path, *args: str) -> Iterator[Sidecar]:
    """``connmeta serve`` on a Unix socket in ``directory``; yields once it serves."""
    path = directory / "connmeta.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "connmeta",
            "serve",
            "--listen",
            "",
            "--unix-socket",
            str(path),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "unix=" not in line:
            raise RuntimeError(f"the sidecar did not start: {line!r}")
        yield Sidecar(proc, f"unix://{path}")
    finally:
        _stop(proc)


@dataclass
class Mitmdump:
    proc: subprocess.Popen[bytes]
    port: int
    directory: Path

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)


@contextlib.contextmanager
def start_mitmdump(
    directory: Path,
    *,
    scripts: Sequence[str] = (),
    options: Mapping[str, str] = {},
    env: Mapping[str, str] = {},
) -> Iterator[Mitmdump]:
    """A quiet ``mitmdump`` on a loopback port with ``ssl_insecure`` and its own
    confdir in ``directory``, loading ``scripts`` (none: a plain proxy);
    yields once it accepts connections."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [str(VENV_BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1",
            "--listen-port", str(port), "--set", f"confdir={directory / 'conf'}",
            "--set", "ssl_insecure=true"]  # fmt: skip
    for script in scripts:
        args += ["-s", script]
    for name, value in options.items():
        args += ["--set", f"{name}={value}"]
    log = (directory / "mitmdump.log").open("wb")
    proc = subprocess.Popen(
        args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
    )
    try:
        end = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError(f"mitmdump did not start; see {directory / 'mitmdump.log'}")
            time.sleep(0.05)
        yield Mitmdump(proc, port, directory)
    finally:
        _stop(proc)
        log.close()


class _Child:
    """A helper process of this file speaking JSON lines on stdin/stdout."""

    def __init__(self, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.proxy_bench", mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self.first = self._line()

    def _line(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.proc.args!r} ended")
        return json.loads(line)

    def ask(self, request: Mapping[str, Any]) -> Any:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        return self._line()

    def close(self) -> None:
        _stop(self.proc)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Origin(_Child):
    """Loopback origins in a process of their own: plain HTTP on ``http_port``,
    HTTPS (self-signed EC certificate for localhost) on ``https_port``. Every
    request gets ``200`` with a 2-byte body."""

    def __init__(self) -> None:
        super().__init__("--origin")
        self.http_port: int = self.first["http"]
        self.https_port: int = self.first["https"]

    def port(self, scheme: str) -> int:
        return self.https_port if scheme == "https" else self.http_port


@dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int
    latencies: list[float] = field(default_factory=list)
    """Seconds per request, when asked for."""

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


class LoadClient(_Child):
    """A client process: ``concurrency`` workers, each opening a new connection
    through the proxy per request (``http``: an absolute-form GET; ``https``:
    CONNECT, TLS through the proxy without verification, GET)."""

    def __init__(self) -> None:
        super().__init__("--load")

    def run(
        self,
        proxy_port: int,
        origin_port: int,
        scheme: str,
        *,
        seconds: float = 0.0,
        requests: int = 0,
        concurrency: int = 8,
        latencies: bool = False,
    ) -> LoadResult:
        """Load for ``seconds``, or until ``requests`` requests are done."""
        answer = self.ask(
            {
                "proxy": proxy_port,
                "origin": origin_port,
                "scheme": scheme,
                "seconds": seconds,
                "requests": requests,
                "concurrency": concurrency,
                "latencies": latencies,
            }
        )
        return LoadResult(**answer)


# -- the child processes -------------------------------------------------------------


def _origin_main() -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    with tempfile.TemporaryDirectory() as directory:
        pem = Path(directory) / "origin.pem"
        pem.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pem)
    asyncio.run(_serve_origin(context))


async def _serve_origin(context: ssl.SSLContext) -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(response)
                if b"connection: close" in head.lower():
                    break
        writer.close()

    plain = await asyncio.start_server(handle, "127.0.0.1", 0)
    tls = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    ports = {
        "http": plain.sockets[0].getsockname()[1],
        "https": tls.sockets[0].getsockname()[1],
    }
    print(json.dumps(ports), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def _load_main() -> None:
    print("{}", flush=True)
    for line in sys.stdin:
        print(json.dumps(asyncio.run(_load(**json.loads(line)))), flush=True)


async def _load(
    proxy: int,
    origin: int,
    scheme: str,
    seconds: float,
    requests: int,
    concurrency: int,
    latencies: bool,
) -> dict[str, Any]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if scheme == "https":
        connect = (
            f"CONNECT 127.0.0.1:{origin} HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n\r\n".encode()
        )
        get = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    else:
        get = (
            f"GET http://127.0.0.1:{origin}/ HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
    done = errors = 0
    times: list[float] = []
    started = time.perf_counter()
    stop = started + seconds if seconds else float("inf")

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
        try:
            if scheme == "https":
                writer.write(connect)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head[:80])
                await writer.start_tls(context, server_hostname="localhost")
            writer.write(get)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head[:80])
            await reader.readexactly(2)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def worker() -> None:
        nonlocal done, errors
        while time.perf_counter() < stop and (not requests or done + errors < requests):
            begun = time.perf_counter()
            try:
                await asyncio.wait_for(one(), 10)
            except Exception:
                errors += 1
                continue
            done += 1
            if latencies:
                times.append(time.perf_counter() - begun)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "requests": done,
        "seconds": time.perf_counter() - started,
        "errors": errors,
        "latencies": times,
    }


# -- the figures ---------------------------------------------------------------------


@dataclass
class _Rounds:
    """Per-round figures of each proxy: CPU seconds per request, requests/s."""

    cpu: dict[str, list[float]] = field(default_factory=dict)
    rate: dict[str, list[float]] = field(default_factory=dict)

    def cpu_ratios(self, name: str) -> list[float]:
        """plain / ``name``, round by round (side by side)."""
        return [p / a for p, a in zip(self.cpu["plain"], self.cpu[name], strict=True)]

    def rate_ratios(self, name: str) -> list[float]:
        """``name`` / plain, round by round."""
        return [a / p for p, a in zip(self.rate["plain"], self.rate[name], strict=True)]


def _measure_rounds(
    proxies: dict[str, Mitmdump],
    origin: Origin,
    client: LoadClient,
    scheme: str,
    rounds: int,
    seconds: float,
    concurrency: int,
) -> _Rounds:
    """The same load on each proxy in turn, round after round, the order
    reversed every other round."""
    result = _Rounds({name: [] for name in proxies}, {name: [] for name in proxies})
    for proxy in proxies.values():  # warm up: certificates, caches, the stream
        client.run(proxy.port, origin.port(scheme), scheme, seconds=0.5, concurrency=concurrency)
    for i in range(rounds):
        order = list(proxies) if i % 2 == 0 else list(reversed(proxies))
        for name in order:
            proxy = proxies[name]
            before = proxy.cpu_seconds()
            load = client.run(
                proxy.port, origin.port(scheme), scheme, seconds=seconds, concurrency=concurrency
            )
            used = proxy.cpu_seconds() - before
            if load.errors:
                print(f"  {name} {scheme}: {load.errors} errors", file=sys.stderr)
            result.cpu[name].append(used / load.requests)
            result.rate[name].append(load.rate)
    return result


def _hook_times(
    proxy: Mitmdump, origin: Origin, client: LoadClient, scheme: str, seconds: float
) -> tuple[dict[str, list[float]], int]:
    """Each hook's times (seconds) during ``seconds`` of load, and the requests done."""
    client.run(proxy.port, origin.port(scheme), scheme, seconds=0.5)  # warm up
    out = proxy.directory / "hooks.json"
    _dump_hook_times(proxy, out)  # and forget the warm-up's
    result = client.run(proxy.port, origin.port(scheme), scheme, seconds=seconds)
    times: dict[str, list[float]] = _dump_hook_times(proxy, out)
    return {k: v for k, v in times.items() if v}, result.requests


def _dump_hook_times(proxy: Mitmdump, out: Path) -> Any:
    out.unlink(missing_ok=True)
    proxy.proc.send_signal(signal.SIGUSR1)
    end = time.monotonic() + 10
    while not out.exists():
        if time.monotonic() > end:
            raise RuntimeError("the timed proxy did not write its hook times")
        time.sleep(0.02)
    return json.loads(out.read_text())


def figures(quick: bool, addon: str = "") -> list[Figure]:
    """The suite's figures; ``addon``: another addon file in place of the
    tree's (to compare a change: ``--addon /tmp/old/addon.py``)."""
    from connmeta.mitm.paths import addon_path

    rounds, seconds, hook_seconds = (2, 1.0, 1.5) if quick else (8, 2.0, 5.0)
    concurrency = 8
    addon = addon or addon_path()
    rows: list[Figure] = []
    with (
        tempfile.TemporaryDirectory(prefix="connmeta-proxy-bench-") as tmp,
        start_sidecar(Path(tmp)) as sidecar,
        Origin() as origin,
        LoadClient() as client,
    ):
        directory = Path(tmp)
        target = {"connmeta_target": sidecar.target}
        noop = str(HERE.with_name("noop_hooks.py"))
        with (
            start_mitmdump(directory / "plain") as plain,
            start_mitmdump(directory / "addon", scripts=[addon], options=target) as with_addon,
            start_mitmdump(directory / "noop", scripts=[noop]) as with_noop,
        ):
            proxies = {"plain": plain, "addon": with_addon, "noop": with_noop}
            for scheme in ("http", "https"):
                measured = _measure_rounds(
                    proxies, origin, client, scheme, rounds, seconds, concurrency
                )
                rows.extend(_pair_figures(measured, scheme, rounds, seconds, concurrency, quick))
        env = {"BENCH_DIR": str(directory / "timed"), "BENCH_ADDON": addon}
        timer = str(HERE.with_name("timed_hooks.py"))
        with start_mitmdump(directory / "timed", scripts=[timer], options=target, env=env) as timed:
            for scheme in ("http", "https"):
                times, requests = _hook_times(timed, origin, client, scheme, hook_seconds)
                rows.extend(_hook_figures(times, requests, scheme, quick))
    return rows


def _pair_figures(
    measured: _Rounds, scheme: str, rounds: int, seconds: float, concurrency: int, quick: bool
) -> list[Figure]:
    from bench._report import Figure, verdict

    label = {"http": "plain HTTP", "https": "HTTPS (CONNECT, TLS both sides)"}[scheme]
    load = f"{label}, new connection per request, {concurrency} clients, {rounds} x {seconds:g} s"
    command = COMMAND + (" --quick" if quick else "")
    cpu = {k: statistics.median(v) * 1e3 for k, v in measured.cpu.items()}
    rate = {k: statistics.median(v) for k, v in measured.rate.items()}
    rows = []
    for name, what in (
        ("addon", "addon overhead"),
        ("noop", "floor: an addon with the same hooks doing nothing"),
    ):
        cpu_ratios, rate_ratios = measured.cpu_ratios(name), measured.rate_ratios(name)
        cpu_ratio, rate_ratio = statistics.median(cpu_ratios), statistics.median(rate_ratios)
        extra = (cpu[name] - cpu["plain"]) * 1e3
        rows += [
            Figure(
                f"{what}: proxy CPU per request, {load} alternating (plain / with; "
                f"rounds {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f})",
                f"{cpu[name]:.3f} ms ({extra:+.0f} µs)",
                f"{cpu['plain']:.3f} ms without",
                f"{cpu_ratio:.3f}",
                verdict(cpu_ratio, 0.98, higher_is_better=True) if name == "addon" else "",
                command,
            ),
            Figure(
                f"{what}: requests/s, {load} alternating (with / plain; "
                f"rounds {min(rate_ratios):.3f}-{max(rate_ratios):.3f})",
                f"{rate[name]:,.0f} req/s",
                f"{rate['plain']:,.0f} req/s without",
                f"{rate_ratio:.3f}",
                verdict(rate_ratio, 0.98, higher_is_better=True) if name == "addon" else "",
                command,
            ),
        ]
    return rows


def _hook_figures(
    times: dict[str, list[float]], requests: int, scheme: str, quick: bool
) -> list[Figure]:
    from bench._report import Figure

    label = {"http": "plain HTTP", "https": "HTTPS"}[scheme]
    command = COMMAND + (" --quick" if quick else "")
    rows = []
    for name in HOOKS:
        values = times.get(name)
        if not values:
            continue
        rows.append(
            Figure(
                f"time inside the addon's `{name}`, {label} ({len(values)} calls; timed proxy)",
                f"p50 {percentile(values, 0.5) * 1e6:.1f} µs, "
                f"p99 {percentile(values, 0.99) * 1e6:.1f} µs",
                "",
                "",
                "",
                command,
            )
        )
    total = sum(sum(v) for v in times.values())
    rows.append(
        Figure(
            f"time inside the addon's hooks per request, {label} (timed proxy)",
            f"{total / requests * 1e6:.1f} µs",
            "",
            "",
            "",
            command,
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small loads: a smoke run")
    parser.add_argument("--addon", default="", help="another addon file in place of the tree's")
    parser.add_argument("--origin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.origin:
        _origin_main()
        return
    if args.load:
        _load_main()
        return
    from bench._report import HEADER

    print(HEADER)
    for figure in figures(args.quick, args.addon):
        print(figure.row())


if __name__ == "__main__":
    main()
