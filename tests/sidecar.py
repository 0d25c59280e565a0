"""A real sidecar for tests: the grpc.aio server on a Unix socket and on TCP,
in the test's own event loop, with typed stubs.

TCP is as a deployment runs it: mTLS with certificates from ``connmeta certs
init`` (``tests.tls``), the client holding a certificate that, without a
policy, may call everything."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from connmeta.server import Config, Sidecar
from connmeta.v1 import connection_service_pb2_grpc as cs_grpc
from tests import tls

StartSidecar = Callable[..., Awaitable[tuple[Sidecar, grpc.aio.Channel]]]


@pytest.fixture(params=["unix", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    """Every test that uses it runs once over each listener."""
    return str(request.param)


@pytest.fixture
async def start_sidecar(tmp_path: Path, transport: str) -> AsyncIterator[StartSidecar]:
    """Start a sidecar with config overrides; a channel to it over ``transport``."""
    started: list[tuple[Sidecar, grpc.aio.Channel]] = []

    async def start(**overrides: Any) -> tuple[Sidecar, grpc.aio.Channel]:
        config = dataclasses.replace(
            Config(
                listen="127.0.0.1:0",
                unix_socket=str(tmp_path / f"s{len(started)}.sock"),
                **tls.server_config(),
            ),
            **overrides,
        )
        sidecar = Sidecar(config)
        await sidecar.start()
        target = sidecar.tcp_address if transport == "tcp" else f"unix://{sidecar.unix_socket}"
        channel = tls.channel(target)
        started.append((sidecar, channel))
        return sidecar, channel

    yield start
    for sidecar, channel in started:
        await channel.close()
        await sidecar.stop(grace=0)


@pytest.fixture
async def channel(start_sidecar: StartSidecar) -> grpc.aio.Channel:
    _, ch = await start_sidecar()
    return ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> cs_grpc.ConnectionServiceAsyncStub:
    return cs_grpc.ConnectionServiceStub(channel)


def details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The google.rpc details of a failed call, by type name."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw is not None, f"no status details on {error.code()}: {error.details()}"
    status = status_pb2.Status.FromString(raw if isinstance(raw, bytes) else raw.encode())
    assert status.code == error.code().value[0]
    found: dict[str, Any] = {}
    for kind in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.PreconditionFailure,
    ):
        for packed in status.details:
            if packed.Is(kind.DESCRIPTOR):
                message = kind()
                packed.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    info = found.get("ErrorInfo")
    assert info is not None, "every error carries ErrorInfo"
    assert info.domain == "connmeta.v1"
    return found


__all__ = ["StartSidecar", "channel", "details", "start_sidecar", "stub", "transport"]
