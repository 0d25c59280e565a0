"""Lifecycle of the real server: listeners, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from connmeta.server import Config, ListenError, Sidecar
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import connection_service_pb2_grpc as cs_grpc
from tests import factories
from tests.factories import Reporter
from tests.sidecar import StartSidecar, channel, start_sidecar, transport

__all__ = ["channel", "start_sidecar", "transport"]


async def test_reflection_lists_every_service(channel: grpc.aio.Channel) -> None:
    # typeshed types these stubs for sync channels only.
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    assert isinstance(response, reflection_pb2.ServerReflectionResponse)
    names = {s.name for s in response.list_services_response.service}
    assert {
        "connmeta.v1.ConnectionService",
        "connmeta.v1.ReportService",
        "grpc.health.v1.Health",
    } <= names


async def test_health_reports_serving_for_the_server_and_its_service(
    channel: grpc.aio.Channel,
) -> None:
    stub: Any = health_pb2_grpc.HealthStub(channel)
    for service in ("", "connmeta.v1.ConnectionService"):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_unix_socket_is_private_to_its_owner(start_sidecar: StartSidecar) -> None:
    sidecar, _ = await start_sidecar()
    mode = stat.S_IMODE(os.stat(sidecar.unix_socket).st_mode)
    assert mode == 0o600


async def test_second_sidecar_on_the_same_socket_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "one.sock")
    first = Sidecar(Config(listen="", unix_socket=path))
    await first.start()
    try:
        with pytest.raises(ListenError, match="another process is serving"):
            await Sidecar(Config(listen="", unix_socket=path)).start()
    finally:
        await first.stop(grace=0)


async def test_stale_socket_file_from_a_crash_is_replaced(tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(path)
    leftover.close()  # bound, never listened: what a killed process leaves behind
    sidecar = Sidecar(Config(listen="", unix_socket=path))
    await sidecar.start()
    await sidecar.stop(grace=0)


async def test_health_listener_serves_health_only(tmp_path: Path) -> None:
    sidecar = Sidecar(
        Config(listen="", unix_socket=str(tmp_path / "h.sock"), health_listen="127.0.0.1:0")
    )
    await sidecar.start()
    try:
        async with grpc.aio.insecure_channel(sidecar.health_address) as ch:
            health: Any = health_pb2_grpc.HealthStub(ch)
            response = await health.Check(health_pb2.HealthCheckRequest())
            assert response.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await cs_grpc.ConnectionServiceStub(ch).GetConnection(
                    cs.GetConnectionRequest(id="x")
                )
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await sidecar.stop(grace=0)


async def test_sigterm_turns_health_off_sends_a_final_bookmark_and_exits_cleanly(
    tmp_path: Path,
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connmeta",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--unix-socket",
        str(tmp_path / "term.sock"),
        "--shutdown-grace",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
    match = re.search(r"tcp=(\S+)", line)
    assert match, line
    # The Unix socket: a plaintext TCP caller may not report.
    async with grpc.aio.insecure_channel(f"unix://{tmp_path / 'term.sock'}") as ch:
        revision = await Reporter(ch).report(factories.server())
        stub = cs_grpc.ConnectionServiceStub(ch)
        watch = stub.WatchConnections(
            cs.WatchConnectionsRequest(start_after_revision=revision, allow_bookmarks=True)
        )
        health_stub: Any = health_pb2_grpc.HealthStub(ch)
        health = health_stub.Watch(health_pb2.HealthCheckRequest())
        first = await health.read()
        assert isinstance(first, health_pb2.HealthCheckResponse)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        await asyncio.sleep(0.1)  # let the watch register before the signal
        process.send_signal(signal.SIGTERM)
        second = await asyncio.wait_for(health.read(), 10)
        assert isinstance(second, health_pb2.HealthCheckResponse)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        events: list[cs.WatchEvent] = []
        async for response in watch:
            events += response.events
        assert events, "the watcher got a final bookmark before the stream ended"
        assert events[-1].type == cs.WATCH_EVENT_TYPE_BOOKMARK
        assert events[-1].revision == revision
    assert await asyncio.wait_for(process.wait(), 15) == 0
    assert not (tmp_path / "term.sock").exists(), "the socket file is removed on exit"
