"""snapshot_bytes: byte for byte the upb encoding of to_proto's message, or its error.

Every test runs on connmeta._wirecore as the package imports it (compiled by
hatch_build.py unless CONNMETA_PURE_PYTHON=1) and, when that is the compiled
module, once more on its Python source.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.connection import Client, Server

import connmeta
from connmeta import _wirecore
from connmeta.mitm import _wire, to_proto
from connmeta.mitm._timestamps import split_timestamp
from connmeta.mitm._wire import snapshot_bytes
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs
from tests.mitm.strategies import clients, servers


def _source_module() -> ModuleType:
    """connmeta/_wirecore.py run as Python, whichever module the package imported."""
    path = Path(connmeta.__file__).parent / "_wirecore.py"
    spec = importlib.util.spec_from_file_location("connmeta_wirecore_source", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


source = _source_module()
cores = [pytest.param(_wirecore, id="compiled" if _wirecore.compiled() else "pure Python")]
if _wirecore.compiled():
    cores.append(pytest.param(source, id="source"))


@pytest.fixture(scope="module", params=cores, autouse=True)
def core(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    _wire._bind(request.param)
    yield request.param
    _wire._bind(_wirecore)


def test_the_installed_package_runs_the_compiled_module_unless_told_otherwise() -> None:
    if os.environ.get("CONNMETA_PURE_PYTHON"):
        assert not _wirecore.compiled()
    elif os.environ.get("CONNMETA_EXPECT_COMPILED"):
        assert _wirecore.compiled(), _wirecore.__file__
    assert not source.compiled()


hooks = st.sampled_from(list(pb.Hook.values()))
client_ids = st.just("") | st.uuids().map(str) | st.text()


def reference(conn: Client | Server, hook: int, client_id: str, closed: bool = False) -> bytes:
    snap = rs.ConnectionSnapshot(hook=hook, client_id=client_id)  # type: ignore[arg-type]
    part = snap.client if isinstance(conn, Client) else snap.server
    part.CopyFrom(to_proto(conn, describe_certificates=False))  # type: ignore[arg-type]
    if closed:
        part.connection.state = pb.CONNECTION_STATE_CLOSED
    return snap.SerializeToString()


@given(conn=clients | servers, hook=hooks, client_id=client_ids, closed=st.booleans())
def test_snapshot_bytes_are_upbs_bytes_for_every_object(
    conn: Client | Server, hook: int, client_id: str, closed: bool
) -> None:
    try:
        want = reference(conn, hook, client_id, closed)
    except ValueError as error:
        with pytest.raises(ValueError, match=f"^{re.escape(str(error))}$"):
            snapshot_bytes(conn, hook, client_id, closed=closed)  # type: ignore[arg-type]
        return
    # Twice: the second time from the caches.
    assert snapshot_bytes(conn, hook, client_id, closed=closed) == want  # type: ignore[arg-type]
    assert snapshot_bytes(conn, hook, client_id, closed=closed) == want  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "server",
    [
        Server(address=("a", 70000)),
        Server(address=("::1", 1, 0, 0)),  # type: ignore[arg-type]
        Server(address=("a", True)),
        Server(address=None, peername=("a", -1)),
        Server(address=None, tls_version="TLSv9"),  # type: ignore[arg-type]
        Server(address=None, transport_protocol="sctp"),  # type: ignore[arg-type]
        Server(address=None, via=("socks5", ("p", 1))),  # type: ignore[arg-type]
        Server(address=None, sni="bad\udcff"),
        Server(address=None, alpn="h2"),  # type: ignore[arg-type]
        Server(address=None, timestamp_end=math.nan),
        Server(address=None, timestamp_end=1e12),
    ],
)
def test_what_to_proto_refuses_snapshot_bytes_refuses_with_the_same_message(
    server: Server,
) -> None:
    with pytest.raises(ValueError, match=r"^Server\.") as want:
        to_proto(server, describe_certificates=False)
    with pytest.raises(ValueError, match=f"^{re.escape(str(want.value))}$"):
        snapshot_bytes(server, pb.HOOK_SERVER_CONNECT, "c")


def test_a_bool_port_is_not_the_int_port_it_equals() -> None:
    good = Server(address=None, peername=("10.0.0.1", 1))
    snapshot_bytes(good, pb.HOOK_SERVER_CONNECTED, "c")  # cached under ("10.0.0.1", 1)
    bad = Server(address=None, peername=("10.0.0.1", True))
    with pytest.raises(ValueError, match=r"peername\.port"):
        snapshot_bytes(bad, pb.HOOK_SERVER_CONNECTED, "c")


@given(
    st.floats(2.0**20, 2.0**34, exclude_max=True)
    # Ties (a fraction of an odd number of 1024ths is exactly half a nanosecond
    # off) and fractions that round up to the next second.
    | st.builds(lambda s, j: s + j / 1024, st.integers(2**20, 2**34 - 1), st.integers(0, 1023))
    | st.builds(lambda s, k: s + 1 - 2.0**-k, st.integers(2**20, 2**21 - 1), st.integers(20, 32))
)
def test_a_recent_timestamp_is_split_as_the_exact_ratio_splits_it(
    core: ModuleType, value: float
) -> None:
    assert core._split_float(value) == split_timestamp(value, "")
