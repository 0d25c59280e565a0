"""``--log-format json``: the formatter, and the audit log of a real ``connmeta serve``:
one JSON line per accepted write, none for a refused one, its fields as JSON fields."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from connmeta.logs import JsonFormatter, configure
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import connection_service_pb2_grpc as cs_grpc
from connmeta.v1 import router_service_pb2 as rt
from tests import factories
from tests.test_router_service import Proxy, Router, waiting_server

UPDATE = "/connmeta.v1.ConnectionService/UpdateServerConnection"
REPORT = "/connmeta.v1.ReportService/Report"
ROUTE = "/connmeta.v1.RouterService/Route"


def record(message: str, *args: object, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("connmeta.test", logging.WARNING, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_json_line_has_time_level_logger_message_and_the_records_own_fields() -> None:
    line = json.loads(JsonFormatter().format(record("%s went", "it", principal="unix", n=3)))
    assert line.pop("time").endswith("Z")
    assert line == {
        "level": "WARNING",
        "logger": "connmeta.test",
        "message": "it went",
        "principal": "unix",
        "n": 3,
    }


def test_control_characters_stay_inside_one_json_line() -> None:
    hostile = "a\nINFO forged line\r\x1b[31m\x00"
    text = JsonFormatter().format(record("%s", hostile, actor=hostile))
    assert not any(c in text for c in "\n\r\x1b\x00")
    line = json.loads(text)
    assert (line["message"], line["actor"]) == (hostile, hostile)


def test_an_extra_never_replaces_the_fields_every_line_has() -> None:
    line = json.loads(JsonFormatter().format(record("real", level="forged", logger="forged")))
    assert (line["level"], line["logger"], line["message"]) == ("WARNING", "connmeta.test", "real")


def test_exception_and_unserializable_extra_are_written_as_text() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = record("failed", path=Path("/x"))
        failed.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(failed))
    assert line["path"] == "/x"
    assert "RuntimeError: boom" in line["exception"]


def test_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text, json"):
        configure("logfmt", "INFO")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[str, Any]]:
    """``connmeta serve --log-format json`` on a Unix socket; its stderr."""
    socket = tmp_path / "s.sock"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connmeta",
        "serve",
        "--log-format",
        "json",
        "--listen",
        "",
        "--unix-socket",
        str(socket),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    ready = await asyncio.wait_for(process.stdout.readline(), 20)
    assert ready.startswith(b"connmeta "), ready
    try:
        yield f"unix://{socket}", process
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def test_serve_writes_one_json_audit_line_per_accepted_write_and_none_per_refused(
    served: tuple[str, Any],
) -> None:
    target, process = served
    async with grpc.aio.insecure_channel(target) as channel:
        router = Router(channel)
        await router.subscribe("r1")
        proxy = Proxy(channel)
        await proxy.resync()  # two writes: resync start, resync end
        idle = factories.server(state=factories.CLOSED)
        await proxy.report(idle)
        stub = cs_grpc.ConnectionServiceStub(channel)

        def update(etag: str = "") -> Any:
            return stub.UpdateServerConnection(
                cs.UpdateServerConnectionRequest(
                    id=idle.server.connection.id,
                    address=pb.Address(host="b.example", port=443),
                    update_mask=field_mask_pb2.FieldMask(paths=["address"]),
                    actor="ops",
                    etag=etag,
                )
            )

        await update()  # accepted
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await update(etag='"1"')
        assert refused.value.code() == grpc.StatusCode.ABORTED

        waiting = waiting_server(port=443)
        await proxy.report(waiting)  # the router is asked
        query = (await router.read()).query
        answer = rt.RouteAnswer(query_id=query.query_id, address=pb.Address(host="c", port=1))
        answer.update_mask.paths.append("address")
        await router.call.write(rt.RouteRequest(answer=answer))
        assert (await proxy.read()).WhichOneof("message") == "route_decision"
        await proxy.close()
        await router.leave()
    process.terminate()
    _, err = await asyncio.wait_for(process.communicate(), 20)

    lines = [json.loads(raw) for raw in err.decode().splitlines()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    audit = [line for line in lines if line["logger"] == "connmeta.audit"]
    assert [(a["action"], a["method"], a["principal"]) for a in audit] == [
        ("resync start", REPORT, "unix"),
        ("resync end", REPORT, "unix"),
        ("update accepted", UPDATE, "unix"),
        ("route decision accepted", ROUTE, "unix"),
    ]
    assert audit[2]["connection_id"] == idle.server.connection.id
    assert (audit[2]["fields"], audit[2]["actor"]) == ("address", "ops")
    assert audit[3]["connection_id"] == waiting.server.connection.id
    assert audit[3]["router"] == "r1"
    assert audit[1]["closed"] == 0, "a count is a JSON number"
    assert all(a["level"] == "INFO" for a in audit)
