"""Fixtures for the e2e tests: one sidecar, one proxy and three origins per
module (each mitmdump costs about a second to start); tests that kill a
process start their own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from tests.e2e.harness import Mitmdump, Origin, OriginCA, SidecarProcess, origin, origin_ca

ROUTE_DEADLINE_MS = 400


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> OriginCA:
    return origin_ca(tmp_path_factory.mktemp("originca"))


@pytest.fixture(scope="module")
def origin_a() -> Iterator[Origin]:
    with origin("A") as o:
        yield o


@pytest.fixture(scope="module")
def origin_b() -> Iterator[Origin]:
    with origin("B") as o:
        yield o


@pytest.fixture(scope="module")
def origin_tls(ca: OriginCA) -> Iterator[Origin]:
    with origin("S", ca.context) as o:
        yield o


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    process = SidecarProcess(tmp_path_factory.mktemp("sidecar") / "connmeta.sock")
    process.start()
    yield process
    process.stop()


def proxy_args(
    sidecar: SidecarProcess, ca: OriginCA, *extra: str, route_deadline_ms: int = ROUTE_DEADLINE_MS
) -> list[str]:
    # Each option once: mitmdump given one option twice never reaches
    # running() (12.2.3).
    return [
        "--set", f"connmeta_target={sidecar.target}",
        "--set", f"connmeta_route_deadline={route_deadline_ms}",
        "--set", f"ssl_verify_upstream_trusted_ca={ca.ca_pem}",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, sidecar: SidecarProcess, ca: OriginCA
) -> Iterator[Mitmdump]:
    dump = Mitmdump(tmp_path_factory.mktemp("proxy"), proxy_args(sidecar, ca))
    dump.start()
    yield dump
    dump.stop()


@pytest.fixture
async def channel(sidecar: SidecarProcess) -> AsyncIterator[grpc.aio.Channel]:
    ch = sidecar.channel()
    yield ch
    await ch.close(None)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
