"""The connmeta command as people use it, against a real sidecar."""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import pytest

from connmeta.cli import build_parser, parse_via
from connmeta.server import Config, Sidecar
from connmeta.v1 import connection_pb2 as pb
from tests import factories
from tests.factories import Reporter


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
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def sidecar(tmp_path: object) -> object:
    sidecar = Sidecar(Config(listen="127.0.0.1:0", unix_socket=""))
    await sidecar.start()
    yield sidecar
    await sidecar.stop(grace=0)


async def test_list_prints_a_table_with_one_row_per_connection(sidecar: Sidecar) -> None:
    snapshot = factories.server(host="table.example", port=8443)
    async with grpc.aio.insecure_channel(sidecar.tcp_address) as ch:
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
    async with grpc.aio.insecure_channel(sidecar.tcp_address) as ch:
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
    async with grpc.aio.insecure_channel(sidecar.tcp_address) as ch:
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
    async with grpc.aio.insecure_channel(sidecar.tcp_address) as ch:
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
    )
    assert process.stdout is not None
    try:
        added = json.loads(await asyncio.wait_for(process.stdout.readline(), 20))
        end = json.loads(await asyncio.wait_for(process.stdout.readline(), 20))
    finally:
        process.kill()
        await process.wait()
    assert added["type"] == "ADDED"
    assert added["connection"]["server"]["connection"]["id"] == snapshot.server.connection.id
    assert end["type"] == "INITIAL_EVENTS_END"


def test_every_serve_flag_has_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNMETA_WATCH_MAX_LAG", "123")
    monkeypatch.setenv("CONNMETA_LISTEN", "")
    args = build_parser().parse_args(["serve"])
    assert args.watch_max_lag == 123
    assert args.listen == ""
    assert build_parser().parse_args(["serve", "--watch-max-lag", "7"]).watch_max_lag == 7


def test_via_text_must_name_a_lower_case_scheme() -> None:
    assert parse_via("https://[::1]:8443") == pb.ServerSpec(
        scheme=pb.SCHEME_HTTPS, address=pb.Address(host="::1", port=8443)
    )
    for text in ("HTTP://p:1", "socks5://p:1", "p:1"):
        with pytest.raises(ValueError, match="SCHEME://HOST:PORT"):
            parse_via(text)
