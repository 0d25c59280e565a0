"""The connmeta command as people use it, against a real sidecar."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from connmeta.cli import build_parser, parse_via
from connmeta.server import Config, Sidecar
from connmeta.v1 import connection_pb2 as pb
from tests import factories, tls
from tests.factories import Reporter

# TCP sidecars here serve mTLS (tests.tls); the client commands get their
# certificate from CONNMETA_TLS_* like a user's shell would give it.
MTLS = tls.server_config()

# -o ndjson types: the proto's WatchEventType names, and the CLI's RELISTED.
ADDED, MODIFIED, DELETED = (f"WATCH_EVENT_TYPE_{t}" for t in ("ADDED", "MODIFIED", "DELETED"))
BOOKMARK, END = "WATCH_EVENT_TYPE_BOOKMARK", "WATCH_EVENT_TYPE_INITIAL_EVENTS_END"


async def run(target: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connmeta",
        *args,
        "--target",
        target,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **tls.cli_env(target)},
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def sidecar(tmp_path: object) -> object:
    sidecar = Sidecar(Config(listen="127.0.0.1:0", unix_socket="", **MTLS))
    await sidecar.start()
    yield sidecar
    await sidecar.stop(grace=0)


async def test_list_prints_a_table_with_one_row_per_connection(sidecar: Sidecar) -> None:
    snapshot = factories.server(host="table.example", port=8443)
    async with tls.channel(sidecar.tcp_address) as ch:
        await Reporter(ch).report(snapshot, factories.client())
    code, out, _ = await run(sidecar.tcp_address, "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["KIND", "ID", "STATE", "TARGET", "SNI", "REVISION"]
    assert len(rows) == 2
    (row,) = [r for r in rows if snapshot.server.connection.id in r]
    assert "table.example:8443" in row
    assert "OPEN" in row


async def test_get_unknown_id_prints_status_and_details_on_one_line(sidecar: Sidecar) -> None:
    code, out, err = await run(sidecar.tcp_address, "get", "missing")
    assert code == 1
    assert out == ""
    (line,) = err.splitlines()
    assert "NOT_FOUND" in line
    assert "ErrorInfo CONNECTION_NOT_FOUND (id=missing)" in line


async def test_update_server_on_open_connection_prints_the_precondition_failure(
    sidecar: Sidecar,
) -> None:
    snapshot = factories.server()
    async with tls.channel(sidecar.tcp_address) as ch:
        await Reporter(ch).report(snapshot)
    code, _, err = await run(
        sidecar.tcp_address,
        "update-server",
        snapshot.server.connection.id,
        "--address",
        "elsewhere.example:443",
    )
    assert code == 1
    (line,) = err.splitlines()
    assert line.startswith("connmeta: FAILED_PRECONDITION")
    assert "ErrorInfo CONNECTION_OPEN" in line
    assert "PreconditionFailure CONNECTION_STATE" in line


async def test_update_server_on_closed_connection_prints_the_new_record(sidecar: Sidecar) -> None:
    snapshot = factories.server(state=factories.CLOSED, hook=pb.HOOK_SERVER_CONNECT)
    async with tls.channel(sidecar.tcp_address) as ch:
        await Reporter(ch).report(snapshot)
    code, out, err = await run(
        sidecar.tcp_address,
        "update-server",
        snapshot.server.connection.id,
        "--via",
        "http://proxy.example:3128",
    )
    assert code == 0, err
    record = json.loads(out)
    assert "via" not in record["server"], "the proxy has not applied it yet"
    assert record["metadata"]["pending_change"]["via"] == {
        "scheme": "SCHEME_HTTP",
        "address": {"host": "proxy.example", "port": 3128},
    }


async def test_watch_ndjson_prints_one_json_object_per_event(sidecar: Sidecar) -> None:
    snapshot = factories.server()
    async with tls.channel(sidecar.tcp_address) as ch:
        await Reporter(ch).report(snapshot)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connmeta",
        "watch",
        "-o",
        "ndjson",
        "--target",
        sidecar.tcp_address,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **tls.cli_env(sidecar.tcp_address)},
    )
    assert process.stdout is not None
    try:
        added = json.loads(await asyncio.wait_for(process.stdout.readline(), 20))
        end = json.loads(await asyncio.wait_for(process.stdout.readline(), 20))
    finally:
        process.kill()
        await process.wait()
    assert added["type"] == ADDED
    assert added["connection"]["server"]["connection"]["id"] == snapshot.server.connection.id
    assert end["type"] == END


def test_every_serve_flag_has_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNMETA_WATCH_MAX_LAG", "123")
    monkeypatch.setenv("CONNMETA_LISTEN", "")
    args = build_parser().parse_args(["serve"])
    assert args.watch_max_lag == 123
    assert args.listen == ""
    assert build_parser().parse_args(["serve", "--watch-max-lag", "7"]).watch_max_lag == 7


def test_top_level_help_is_whole_sentences_without_markup() -> None:
    description = build_parser().description or ""
    assert "``" not in description, "RST markup"
    assert description.rstrip().endswith("."), description
    assert "CONNMETA_<FLAG>" in description


def test_via_text_must_name_a_lower_case_scheme() -> None:
    assert parse_via("https://[::1]:8443") == pb.ServerSpec(
        scheme=pb.SCHEME_HTTPS, address=pb.Address(host="::1", port=8443)
    )
    for text in ("HTTP://p:1", "socks5://p:1", "p:1"):
        with pytest.raises(ValueError, match="SCHEME://HOST:PORT"):
            parse_via(text)


# --- watch across ends and restarts ----------------------------------------------------------

Line = dict[str, Any]


async def spawn_watch(target: str, *args: str, stdout: Any = asyncio.subprocess.PIPE) -> Any:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connmeta",
        "watch",
        *args,
        "--target",
        target,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **tls.cli_env(target)},
    )


async def read_line(process: Any) -> Line:
    raw = await asyncio.wait_for(process.stdout.readline(), 20)
    assert raw, "watch ended its output"
    line: Line = json.loads(raw)
    return line


async def read_until(process: Any, kind: str) -> list[Line]:
    """Lines up to and including the first of type ``kind``, bookmarks left out."""
    lines = []
    while True:
        line = await read_line(process)
        if line["type"] != BOOKMARK:
            lines.append(line)
        if line["type"] == kind:
            return lines


async def stopped(process: Any) -> None:
    if process.returncode is None:
        process.kill()
    await process.wait()


def conn_id(connection: Line) -> str:
    kind = connection.get("server") or connection["client"]
    return str(kind["connection"]["id"])


def apply(lines: list[Line], state: dict[str, int]) -> None:
    """What a consumer of -o ndjson does: keep id -> revision of each record."""
    for line in lines:
        if line["type"] in (ADDED, MODIFIED):
            state[conn_id(line["connection"])] = int(line["connection"]["metadata"]["revision"])
        elif line["type"] == DELETED:
            del state[conn_id(line["connection"])]


def store_state(sidecar: Sidecar) -> dict[str, int]:
    records, _ = sidecar.store.snapshot()
    return {r.id: r.revision for r in records}


@pytest.fixture(params=["unix", "tcp"])
async def restartable(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """A sidecar and a way to replace it by a new one (a new store) on the same
    Unix socket or TCP port: what a container restart looks like to a client."""
    sidecars: list[Sidecar] = []
    config = Config(listen="127.0.0.1:0", unix_socket=str(tmp_path / "c.sock"), **MTLS)
    if request.param == "tcp":
        config = dataclasses.replace(config, unix_socket="")

    async def start(*snapshots: Any) -> tuple[Sidecar, str]:
        nonlocal config
        sidecar = Sidecar(config)
        # Present before the first call is served, so the watch relists them.
        assert not sidecar.store.apply(list(snapshots))
        await sidecar.start()
        sidecars.append(sidecar)
        if sidecar.tcp_address:
            config = dataclasses.replace(config, listen=sidecar.tcp_address)
        target = f"unix://{sidecar.unix_socket}" if sidecar.unix_socket else sidecar.tcp_address
        return sidecar, target

    yield start
    for sidecar in sidecars:
        await sidecar.stop(grace=0)


async def test_watch_relists_after_a_restart_and_ends_with_the_new_stores_state(
    restartable: Any,
) -> None:
    kept, changed, gone = factories.server(), factories.server(), factories.client()
    old, target = await restartable(kept, changed, gone)
    watch = await spawn_watch(target, "-o", "ndjson")
    try:
        lines = await read_until(watch, END)
        async with tls.channel(target) as ch:
            changed.server.connection.state = factories.CLOSED
            await Reporter(ch).report(changed)
        lines += await read_until(watch, MODIFIED)
        await old.stop(grace=0)

        new_one = factories.client()
        new, _ = await restartable(factories.server(kept.server.connection.id), new_one)
        relisted = await read_until(watch, "RELISTED")
        marker = relisted[-1]
        diff = [await read_line(watch) for _ in range(4)]
        async with tls.channel(target) as ch:
            later = factories.server()
            await Reporter(ch).report(later)
        after = await read_until(watch, ADDED)
    finally:
        await stopped(watch)
    assert marker["relisted"]["reason"] == "restarted"
    assert marker["incarnation"] == new.store.incarnation
    assert {d["incarnation"] for d in diff} == {new.store.incarnation}
    counts = marker["relisted"]
    assert (counts["deleted"], counts["added"], counts["modified"]) == (2, 1, 1)
    assert [(d["type"], conn_id(d["connection"])) for d in diff] == [
        *sorted([(DELETED, changed.server.connection.id), (DELETED, gone.client.connection.id)]),
        (ADDED, new_one.client.connection.id),
        (MODIFIED, kept.server.connection.id),
    ]
    assert {d["revision"] for d in diff} == {marker["revision"]}
    assert conn_id(after[-1]["connection"]) == later.server.connection.id
    state: dict[str, int] = {}
    apply(lines + relisted + diff + after, state)
    assert state == store_state(new)


async def test_watch_table_says_it_relisted(restartable: Any) -> None:
    old, target = await restartable(factories.server())
    watch = await spawn_watch(target)
    assert watch.stdout is not None
    try:
        header = await asyncio.wait_for(watch.stdout.readline(), 20)
        assert header.split()[:2] == [b"EVENT", b"KIND"]
        assert b"ADDED" in await asyncio.wait_for(watch.stdout.readline(), 20)
        await old.stop(grace=0)
        await restartable()
        line = await asyncio.wait_for(watch.stdout.readline(), 20)
        deleted = await asyncio.wait_for(watch.stdout.readline(), 20)
    finally:
        await stopped(watch)
    assert line.startswith(b"-- relisted at revision ")
    assert b"the sidecar restarted" in line
    assert b"1 deleted, 0 added, 0 modified" in line
    assert deleted.startswith(b"DELETED")


async def test_watch_since_a_revision_of_another_incarnation_relists(restartable: Any) -> None:
    old, target = await restartable(factories.server())
    old_revision = old.store.revision
    await old.stop(grace=0)
    present = factories.server()
    new, _ = await restartable(present)
    watch = await spawn_watch(target, "-o", "ndjson", "--since", str(old_revision))
    try:
        relisted = await read_until(watch, "RELISTED")
        added = await read_line(watch)
    finally:
        await stopped(watch)
    (marker,) = relisted
    assert marker["relisted"]["reason"] == "compacted"
    assert marker["incarnation"] == new.store.incarnation
    assert marker["revision"] == str(new.store.revision)
    assert added["type"] == ADDED
    assert conn_id(added["connection"]) == present.server.connection.id


class Cutter:
    """A TCP forwarder whose connections the test can cut: a network blip
    that ends the watch without ending the sidecar (same incarnation)."""

    def __init__(self, upstream: str) -> None:
        self.host, port = upstream.rsplit(":", 1)
        self.port = int(port)
        self.writers: list[asyncio.StreamWriter] = []
        self.address = ""

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


async def test_watch_ndjson_prints_every_change_once_across_reconnects(
    sidecar: Sidecar,
) -> None:
    cutter = Cutter(sidecar.tcp_address)
    forwarder = await cutter.start()
    watch = await spawn_watch(cutter.address, "-o", "ndjson", "--max-backoff", "0.2")
    try:
        (end,) = await read_until(watch, END)
        printed: list[int] = []

        async def catch_up() -> None:
            while not printed or printed[-1] < sidecar.store.revision:
                line = await read_line(watch)
                assert line["type"] != "RELISTED", "a resume in one incarnation needs no relist"
                if line["type"] != BOOKMARK:
                    printed.append(int(line["revision"]))

        async with tls.channel(sidecar.tcp_address) as ch:
            reporter = Reporter(ch)
            for _ in range(3):
                for _ in range(20):
                    await reporter.report(factories.server())
                await catch_up()
                cutter.cut()
                # Changes while the watch is away: it must catch up on them.
                for _ in range(5):
                    await reporter.report(factories.client())
            await catch_up()
    finally:
        await stopped(watch)
        forwarder.close()
    assert printed == [e.revision for e in sidecar.store.events_after(int(end["revision"]))]
    assert len(printed) == 75
    assert watch.stderr is not None
    notes = (await watch.stderr.read()).decode()
    assert notes.count("reconnecting") == 3, notes


async def test_watch_piped_into_head_exits_quietly(tmp_path: Path) -> None:
    sidecar = Sidecar(Config(listen="127.0.0.1:0", unix_socket="", bookmark_interval=0.1, **MTLS))
    sidecar.store.apply([factories.server() for _ in range(5)])
    await sidecar.start()
    read_end, write_end = os.pipe()
    try:
        # Bookmarks: something is written after head exits, so the watch sees the closed pipe.
        watch = await spawn_watch(
            sidecar.tcp_address, "-o", "ndjson", "--bookmarks", stdout=write_end
        )
        head = await asyncio.create_subprocess_exec(
            "head", "-n", "3", stdin=read_end, stdout=asyncio.subprocess.PIPE
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    try:
        out, _ = await asyncio.wait_for(head.communicate(), 20)
        _, err = await asyncio.wait_for(watch.communicate(), 20)
    finally:
        await stopped(watch)
        await sidecar.stop(grace=0)
    assert len(out.splitlines()) == 3
    assert watch.returncode == 0
    assert err == b""


async def test_watch_once_exits_non_zero_when_the_sidecar_dies() -> None:
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connmeta",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--unix-socket",
        "",
        *(f"--{k.replace('_', '-')}={v}" for k, v in MTLS.items()),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert server.stdout is not None
    try:
        ready = await asyncio.wait_for(server.stdout.readline(), 20)
        (target,) = [p.removeprefix("tcp=") for p in ready.decode().split() if "tcp=" in p]
        watch = await spawn_watch(target, "-o", "ndjson", "--once")
        await read_until(watch, END)
        server.send_signal(signal.SIGKILL)
        _, err = await asyncio.wait_for(watch.communicate(), 20)
    finally:
        await stopped(server)
    assert watch.returncode == 1
    (line,) = err.decode().splitlines()
    assert line.startswith("connmeta: UNAVAILABLE")


async def test_watch_once_exits_zero_when_the_sidecar_ends_it_cleanly(sidecar: Sidecar) -> None:
    watch = await spawn_watch(sidecar.tcp_address, "-o", "ndjson", "--once", "--bookmarks")
    await read_until(watch, END)
    await sidecar.stop(grace=5)
    out, err = await asyncio.wait_for(watch.communicate(), 20)
    assert watch.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["type"] == BOOKMARK, "the final bookmark"


def test_certs_init_writes_private_keys_role_certificates_and_a_valid_policy(
    tmp_path: Path,
) -> None:
    from cryptography import x509

    from connmeta.cli import main
    from connmeta.policy import Policy

    target = tmp_path / "certs"
    assert main(["certs", "init", "--dir", str(target), "--dns", "connmeta.example.svc"]) == 0
    assert (target.stat().st_mode & 0o777) == 0o700
    for role in ("reader", "writer", "router", "reporter"):
        assert ((target / f"{role}.key").stat().st_mode & 0o777) == 0o600
        cert = x509.load_pem_x509_certificate((target / f"{role}.pem").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://connmeta.local/{role}"
        ]
    server = x509.load_pem_x509_certificate((target / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "connmeta.example.svc"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert ((target / "ca.key").stat().st_mode & 0o777) == 0o600
    assert Policy.parse((target / "policy.json").read_text()).name == "connmeta-example"


async def test_health_exits_zero_while_serving_over_the_socket_and_over_mtls(
    tmp_path: Path,
) -> None:
    sidecar = Sidecar(Config(listen="127.0.0.1:0", unix_socket=str(tmp_path / "h.sock"), **MTLS))
    await sidecar.start()
    try:
        for target in (f"unix://{sidecar.unix_socket}", sidecar.tcp_address):
            code, out, err = await run(
                target, "health", "--service", "connmeta.v1.ConnectionService"
            )
            assert (code, out.strip()) == (0, "SERVING"), err
        code, _, err = await run(sidecar.tcp_address, "health", "--service", "no.such.Service")
        assert code == 1
        assert "NOT_FOUND" in err
    finally:
        await sidecar.stop(grace=0)
