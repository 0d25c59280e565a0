"""The Go and Rust clients against the real server: every case of cases.md in every language.

Each language's interop program is built once per session; the server is the real
``connmeta serve`` subprocess, one per distinct set of flags (cases.md, "server flags").
Missing toolchains fail these tests rather than skip them: CI has Go and Rust, and a
silently skipped interop suite proves nothing.

The TCP listener requires mutual TLS (``--tls-cert/--tls-key/--client-ca``, the files of
``connmeta certs init``): plaintext TCP callers may only read, and the cases report, route
and update. The programs get the writer's certificate (without ``--authz-policy`` any
verified client certificate may call everything) and the certificate directory for
``authz_roles``, whose server runs with the example policy.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
CASES_MD = Path(__file__).with_name("cases.md")
GO_DIR = ROOT / "clients" / "go"
RUST_DIR = ROOT / "clients" / "rust"
# One fixed target dir and one profile (debug), shared with developers' plain `cargo build`
# and `cargo test` (and cacheable in CI): a cold tonic build takes minutes on two cores, a
# warm one seconds. Debug, not release: it builds in about half the CPU time, and the
# interop programs wait on the server, not on their own code.
RUST_TARGET_DIR = RUST_DIR / "target"
LANGUAGES = ("go", "rust")

# Every case gets these; cases.md's "server flags" column overrides some.
DEFAULT_FLAGS = {
    "--history-size": "100000",
    "--watch-max-lag": "10000",
    "--bookmark-interval": "1",
}
KEEPALIVE_ENV = "CONNMETA_INTEROP_KEEPALIVE_SECONDS"
# In cases.md's server flags, CERTS/ stands for the directory of `connmeta certs init`.
CERTS_PLACEHOLDER = "CERTS/"
# The certificate every case's connections present (the roles are in cases.md).
CLIENT_ROLE = "writer"
# A program prints this line to have its server killed (-9) and started again on the same
# TCP address and Unix socket; it reads "restarted" on stdin once the server serves again.
RESTART_REQUEST = "connmeta-interop: restart-server"
BUILD_TIMEOUT = 1800  # seconds; a cold Rust build on a 2-core runner takes ~2 minutes
CASE_TIMEOUT = 120  # seconds, on top of the keepalive duration


@dataclass(frozen=True)
class Case:
    id: str
    proves: str
    flags: tuple[str, ...]
    # The case has a server of its own, which it asks the harness to restart (kill -9):
    # cases.md says "restarts it" in the server flags column.
    restarts: bool = False


def _parse_cases() -> list[Case]:
    """The rows of the "## Cases" table in cases.md."""
    text = CASES_MD.read_text(encoding="utf-8")
    section = text.split("\n## Cases\n", 1)[1].split("\n## ", 1)[0]
    cases = []
    for match in re.finditer(r"^\| `(\w+)` \| (.+?) \| (.+?) \|$", section, re.MULTILINE):
        case_id, proves, flags_cell = match.groups()
        flags = dict(DEFAULT_FLAGS)
        for name, value in re.findall(r"`(--[\w-]+) (\S+)`", flags_cell):
            flags[name] = value
        argv = tuple(x for kv in sorted(flags.items()) for x in kv)
        cases.append(Case(case_id, proves, argv, restarts="restarts it" in flags_cell))
    assert cases, f"no case rows found in {CASES_MD}"
    return cases


CASES = _parse_cases()


def _keepalive_seconds() -> str | None:
    """How long the keepalive case runs, or None when it is not asked for."""
    value = os.environ.get(KEEPALIVE_ENV)
    if value:
        return value
    return "60" if os.environ.get("CI") else None


def _run_build(argv: list[str], cwd: Path, env: dict[str, str], what: str) -> None:
    tool = argv[0]
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not on PATH: the interop suite needs it to build the {what}")
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"building the {what} took more than {BUILD_TIMEOUT} s: {' '.join(argv)}")
    if done.returncode != 0:
        pytest.fail(
            f"building the {what} failed ({' '.join(argv)} in {cwd}):\n{done.stdout}{done.stderr}"
        )


class Programs:
    """The interop program of each language, built on first use."""

    def __init__(self, out_dir: Path) -> None:
        self._out_dir = out_dir
        self._built: dict[str, Path] = {}

    def get(self, language: str) -> Path:
        if language not in self._built:
            self._built[language] = getattr(self, f"_build_{language}")()
        return self._built[language]

    def _build_go(self) -> Path:
        # Every package compiles (and vets), not only the interop program.
        _run_build(["go", "vet", "./..."], GO_DIR, dict(os.environ), "Go client (go vet)")
        binary = self._out_dir / "connmeta-interop"
        _run_build(
            ["go", "build", "-o", str(binary), "./cmd/connmeta-interop"],
            GO_DIR,
            dict(os.environ),
            "Go interop program",
        )
        return binary

    def _build_rust(self) -> Path:
        env = dict(os.environ, CARGO_TARGET_DIR=str(RUST_TARGET_DIR))
        _run_build(
            ["cargo", "build", "--locked", "--examples"],
            RUST_DIR,
            env,
            "Rust examples (interop, get_connection, watch)",
        )
        return RUST_TARGET_DIR / "debug" / "examples" / "interop"

    def rust_example(self, name: str) -> Path:
        """Another example of the crate; `cargo build --examples` built them all."""
        return self.get("rust").with_name(name)


def make_certs(directory: Path) -> Path:
    """The files of ``connmeta certs init --dir DIR``: CA, server certificate, one
    client certificate per role, the example policy."""
    done = subprocess.run(
        [_connmeta_executable(), "certs", "init", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"connmeta certs init failed:\n{done.stdout}{done.stderr}"
    missing = [
        name
        for name in ("ca.pem", "server.pem", "server.key", "policy.json", f"{CLIENT_ROLE}.pem")
        if not (directory / name).is_file()
    ]
    assert not missing, f"certificate directory {directory} lacks {missing}"
    return directory


@dataclass(frozen=True)
class Certs:
    """The session's certificate directory (``connmeta certs init``)."""

    directory: Path

    def serve_flags(self, flags: tuple[str, ...]) -> list[str]:
        d = self.directory
        resolved = [f.replace(CERTS_PLACEHOLDER, f"{d}/") for f in flags]
        return [
            *resolved,
            "--tls-cert",
            str(d / "server.pem"),
            "--tls-key",
            str(d / "server.key"),
            "--client-ca",
            str(d / "ca.pem"),
        ]

    def program_flags(self) -> list[str]:
        d = self.directory
        return [
            "--tls-ca",
            str(d / "ca.pem"),
            "--tls-cert",
            str(d / f"{CLIENT_ROLE}.pem"),
            "--tls-key",
            str(d / f"{CLIENT_ROLE}.key"),
            "--roles-dir",
            str(d),
        ]


@dataclass
class Server:
    """One ``connmeta serve`` subprocess."""

    process: subprocess.Popen[str]
    tcp: str
    unix: str
    log: Path
    directory: Path
    flags: tuple[str, ...]
    certs: Certs
    _drain: threading.Thread = field(repr=False)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"(no server log: {error})"

    def restart(self) -> None:
        """kill -9, then serve again on the same TCP address and Unix socket: a new store."""
        self.process.kill()
        self.process.wait()
        self._close_pipe()
        tcp, unix = self.tcp, self.unix
        self.process, self._drain, self.tcp, self.unix = _launch(
            _serve_argv(tcp, unix, self.certs.serve_flags(self.flags)), self.log, self.directory
        )
        assert (self.tcp, self.unix) == (tcp, unix), "the restarted server moved"

    def _close_pipe(self) -> None:
        self._drain.join(timeout=5)
        assert self.process.stdout is not None
        self.process.stdout.close()

    def stop(self) -> None:
        """SIGTERM, as the contract says; kill only if it ignores that."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"connmeta serve did not stop within 15 s of SIGTERM\n{self.log_tail()}"
                ) from None
        self._close_pipe()
        shutil.rmtree(self.directory, ignore_errors=True)


def _connmeta_executable() -> str:
    beside_python = Path(sys.executable).parent / "connmeta"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("connmeta")
    if found is None:
        pytest.fail("no connmeta executable beside the interpreter or on PATH (pip install -e .)")
    return found


def _drain(stream: IO[str], first_line: queue.Queue[str], log: Path) -> None:
    """Hand the first stdout line over, then keep the pipe empty so the server never blocks."""
    first_line.put(stream.readline())
    with log.open("a", encoding="utf-8") as out:
        for line in stream:
            out.write(line)


def _serve_argv(tcp: str, unix: str, flags: list[str]) -> list[str]:
    return [_connmeta_executable(), "serve", "--listen", tcp, "--unix-socket", unix, *flags]


def _launch(
    argv: list[str], log: Path, directory: Path
) -> tuple[subprocess.Popen[str], threading.Thread, str, str]:
    """Start the server; return it, its stdout drain, and the addresses of its ready line."""
    with log.open("a", encoding="utf-8") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert process.stdout is not None
    first: queue.Queue[str] = queue.Queue()
    drain = threading.Thread(target=_drain, args=(process.stdout, first, log), daemon=True)
    drain.start()
    try:
        line = first.get(timeout=30)
    except queue.Empty:
        line = ""
    tcp = re.search(r"\btcp=(\S+)", line)
    unix = re.search(r"\bunix=(\S+)", line)
    if tcp is None or unix is None:
        process.kill()
        process.wait()
        drain.join(timeout=5)
        process.stdout.close()
        tail = log.read_text(errors="replace")
        shutil.rmtree(directory, ignore_errors=True)
        pytest.fail(
            f"{' '.join(argv)} did not print 'connmeta <version> serving tcp=... unix=...' "
            f"within 30 s; first line {line!r}\n{tail}"
        )
    return process, drain, tcp.group(1), unix.group(1)


def start_server(flags: tuple[str, ...], certs: Certs) -> Server:
    # Short directory: a Unix socket path must fit in sun_path (108 bytes).
    directory = Path(tempfile.mkdtemp(prefix="cm-"))
    log = directory / "server.log"
    log.write_text("")
    argv = _serve_argv("127.0.0.1:0", str(directory / "connmeta.sock"), certs.serve_flags(flags))
    process, drain, tcp, unix = _launch(argv, log, directory)
    return Server(process, tcp, unix, log, directory, flags, certs, drain)


class Servers:
    """One server per distinct flag set (and one per case that restarts its server), started
    on first use, stopped at session end."""

    def __init__(self, certs: Certs) -> None:
        self.certs = certs
        self._running: dict[tuple[str, ...], Server] = {}

    def get(self, flags: tuple[str, ...], own: str = "") -> Server:
        key = (*flags, own)
        server = self._running.get(key)
        if server is None or server.process.poll() is not None:
            server = self._running[key] = start_server(flags, self.certs)
        return server

    def stop_all(self) -> None:
        errors = []
        for server in self._running.values():
            try:
                server.stop()
            except AssertionError as error:
                errors.append(str(error))
        assert not errors, "\n".join(errors)


@pytest.fixture(scope="session")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Programs:
    return Programs(tmp_path_factory.mktemp("interop-bin"))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(make_certs(tmp_path_factory.mktemp("certs")))


@pytest.fixture(scope="session")
def servers(certs: Certs) -> Iterator[Servers]:
    pool = Servers(certs)
    yield pool
    pool.stop_all()


@pytest.mark.parametrize(
    ("language", "case"),
    [pytest.param(lang, case, id=f"{lang}-{case.id}") for lang in LANGUAGES for case in CASES],
)
def test_interop(language: str, case: Case, programs: Programs, servers: Servers) -> None:
    env = dict(os.environ)
    timeout = CASE_TIMEOUT
    if case.id == "keepalive":
        seconds = _keepalive_seconds()
        if seconds is None:
            pytest.skip(
                f"keepalive holds an idle watch for 60 s per language; set {KEEPALIVE_ENV}=60 "
                "(CI runs it because CI is set)"
            )
        env[KEEPALIVE_ENV] = seconds
        timeout += int(seconds)
    program = programs.get(language)
    server = servers.get(case.flags, own=case.id if case.restarts else "")
    argv = [
        str(program),
        "--target",
        server.tcp,
        "--unix-target",
        f"unix://{server.unix}",
        *servers.certs.program_flags(),
        "--case",
        case.id,
    ]
    returncode, output = run_case(argv, env, timeout, server)
    if returncode is None:
        pytest.fail(f"{language} {case.id} ran longer than {timeout} s\n{output}")
    crashed = server.process.poll() is not None
    if returncode != 0 or crashed:
        pytest.fail(
            f"{language} {case.id} exited {returncode}"
            f"{' and the server died' if crashed else ''}\n"
            f"{output}\n--- server log (tail) ---\n{server.log_tail()}"
        )


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_case(
    argv: list[str], env: dict[str, str], timeout: float, server: Server
) -> tuple[int | None, str]:
    """Run one interop program, restarting the server whenever it asks (RESTART_REQUEST).

    Returns its exit status (None if it ran out of time and was killed) and its output,
    stdout and stderr interleaved.
    """
    deadline = time.monotonic() + timeout
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []
    with subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        assert process.stdin is not None
        assert process.stdout is not None
        reader = threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True)
        reader.start()
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                process.kill()
                process.wait()
                reader.join(timeout=5)
                return None, "".join(output)
            if line is None:  # the program closed its output: it is ending
                break
            output.append(line)
            if line.rstrip("\n") == RESTART_REQUEST:
                server.restart()
                output.append("(harness: the server was killed with SIGKILL and restarted)\n")
                try:
                    process.stdin.write("restarted\n")
                    process.stdin.flush()
                except BrokenPipeError:
                    pass  # it ended meanwhile; its exit status says why
        try:
            returncode = process.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None, "".join(output)
        reader.join(timeout=5)
        return returncode, "".join(output)


@pytest.mark.parametrize("language", LANGUAGES)
def test_cases_md_matches_the_program(language: str, programs: Programs) -> None:
    """cases.md, the Go program and the Rust program name the same cases, in the same words."""
    done = subprocess.run(
        [str(programs.get(language)), "--list"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    listed = [tuple(line.split("\t", 1)) for line in done.stdout.splitlines()]
    assert listed == [(case.id, case.proves) for case in CASES]


def _rust_env() -> dict[str, str]:
    return dict(os.environ, CARGO_TARGET_DIR=str(RUST_TARGET_DIR))


@pytest.mark.parametrize("language", LANGUAGES)
def test_client_unit_tests(language: str, programs: Programs) -> None:
    """go test / cargo test of the client packages (fakes only, no server)."""
    programs.get(language)  # the build fails here first, with its own message
    if language == "go":
        argv, cwd, env = ["go", "test", "-count=1", "./..."], GO_DIR, dict(os.environ)
    else:
        argv, cwd, env = ["cargo", "test", "--locked"], RUST_DIR, _rust_env()
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize("language", LANGUAGES)
def test_readme_examples_against_the_server(
    language: str, programs: Programs, servers: Servers
) -> None:
    """The documented examples (Go Example tests, Rust examples/) work as written."""
    programs.get(language)
    server = servers.get(CASES[0].flags)
    certs = servers.certs.directory
    unix = f"unix://{server.unix}"
    # The TCP listener takes only mTLS: the plaintext examples use the Unix socket, the
    # mTLS ones (with the reader's certificate: reading is all they do) the TCP listener.
    role = [str(certs / "ca.pem"), str(certs / "reader.pem"), str(certs / "reader.key")]
    if language == "go":
        tls_env = dict(
            zip(
                ("CONNMETA_TLS_CA", "CONNMETA_TLS_CERT", "CONNMETA_TLS_KEY"),
                role,
                strict=True,
            ),
            CONNMETA_TLS_TARGET=server.tcp,
        )
        done = subprocess.run(
            ["go", "test", "-count=1", "-v", "-run", "^Example", "./connmeta"],
            cwd=GO_DIR,
            env=dict(os.environ, CONNMETA_TARGET=unix, **tls_env),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"Go examples against {unix} and {server.tcp}:\n{done.stdout}"
        assert "--- PASS: ExampleWithTLS" in done.stdout, done.stdout
        return
    done = subprocess.run(
        [str(programs.rust_example("get_connection")), unix],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "no such connection\n"), done.stderr
    done = subprocess.run(
        [str(programs.rust_example("watch")), unix, "*.example.invalid", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "listed 0 servers (Start)\nstopped\n"), done.stderr
    done = subprocess.run(
        [str(programs.rust_example("reflector")), unix, "*.example.invalid", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "synced 0 servers (Start)\nstopped\n"), done.stderr
    done = subprocess.run(
        [str(programs.rust_example("mtls")), server.tcp, *role],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "no such connection\n"), done.stderr


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["cargo", "clippy", "--locked", "--all-targets", "--", "-D", "warnings"], {}),
        (["cargo", "doc", "--locked", "--no-deps"], {"RUSTDOCFLAGS": "-D warnings"}),
        # The published crate builds on its own (proto files included through the
        # proto/ symlink). --allow-dirty: a developer's uncommitted edits are packaged too.
        (["cargo", "package", "--locked", "--allow-dirty"], {}),
    ],
    ids=["clippy", "doc", "package"],
)
def test_rust_lints_clean(argv: list[str], env: dict[str, str], programs: Programs) -> None:
    """cargo clippy (every target, warnings are errors), cargo doc (broken intra-doc
    links and other rustdoc warnings are errors) and cargo package pass, as CI requires."""
    programs.get("rust")  # the build fails here first, with its own message
    done = subprocess.run(
        argv,
        cwd=RUST_DIR,
        env={**_rust_env(), **env},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}"


def _code_line(line: str) -> str:
    """A line without indentation and trailing comment: what must match."""
    return re.sub(r"\s*//.*$", "", line).strip()


@pytest.mark.parametrize(
    ("readme", "language", "source"),
    [
        (GO_DIR / "README.md", "go", GO_DIR / "connmeta" / "example_test.go"),
        (RUST_DIR / "README.md", "rust", RUST_DIR / "examples" / "mtls.rs"),
    ],
    ids=["go", "rust"],
)
def test_client_readme_mtls_snippet_is_the_tested_example(
    readme: Path, language: str, source: Path
) -> None:
    """The clients' "Mutual TLS" snippets are code the suite runs (ExampleWithTLS,
    examples/mtls.rs), line for line and in order, not a copy that drifts."""
    section = readme.read_text().split("## Mutual TLS\n", 1)[1]
    block = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert block, f"{readme} has no {language} block under Mutual TLS"
    lines = [c for c in map(_code_line, block.group(1).splitlines()) if c]
    assert len(lines) >= 4, lines
    code = [_code_line(line) for line in source.read_text().splitlines()]
    position = 0
    for line in lines:
        assert line in code[position:], f"README line {line!r} is not in {source.name} (in order)"
        position = code.index(line, position) + 1
