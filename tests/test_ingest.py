"""The ingest fast path (connmeta._ingest) against its oracle, compiled against pure.

``scan`` may only ever be stricter than ``connmeta.validation``: whatever it
reads, the full checks accept, and the fields it hands over are the parsed
snapshot's. The compiled module and its Python source give the same answers,
and a store fed through the fast path keeps exactly the bytes and refuses
exactly the snapshots the pure-Python store does.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import connmeta
from connmeta import _ingest, store, validation
from connmeta.report_service import DecodedReport, decode_report
from connmeta.store import Store
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs
from tests import hostile as h
from tests.snapshots import FakeClock, client, next_id, server


def _source_module() -> ModuleType:
    """connmeta/_ingest.py run as Python, whichever module the package imported."""
    path = Path(connmeta.__file__).parent / "_ingest.py"
    spec = importlib.util.spec_from_file_location("connmeta_ingest_source", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


source = _source_module()
modules = [pytest.param(_ingest, id=_ingest.implementation())]
if _ingest.compiled():
    modules.append(pytest.param(source, id="source"))


@st.composite
def _one_off(draw: st.DrawFn) -> rs.ConnectionSnapshot:
    """A valid snapshot with exactly one hostile field: each rule met on its own."""
    if draw(st.booleans()):
        snap = h.base_client(draw(st.uuids().map(str)))
        fields = h._CLIENT_FIELDS
    else:
        snap = h.base_server(draw(st.uuids().map(str)))
        fields = h._SERVER_FIELDS
    path = draw(st.sampled_from(fields))
    value: Any
    if path.rsplit(".", 1)[-1] in ("peername", "sockname", "address"):
        # A plain (host, port) most of the time: h.addresses() adds flowinfo and
        # scope_id three times out of four, which hides the port and host rules.
        value = draw(st.builds(pb.Address, host=h.hosts, port=h.ports) | h.addresses())
    elif "timestamp" in path:
        # Edges of each part with the other in range: h.timestamps() rarely has both.
        seconds = st.sampled_from([-62_135_596_801, -62_135_596_800, 0, 253_402_300_799])
        nanos = st.sampled_from([-1, 0, 999_999_999, 1_000_000_000])
        value = draw(st.builds(Timestamp, seconds=seconds | st.just(253_402_300_800), nanos=nanos))
    else:
        value = draw(h._mutation(path))[1]
    h._apply(snap, path, value)
    return snap


_snapshots = st.one_of(h.snapshots(), _one_off())
# Every example also reaches byte-level damage the public parser still accepts.
_damaged = st.tuples(_snapshots, st.integers(0, 10_000), st.integers(0, 255))


def _damage(snap: rs.ConnectionSnapshot, at: int, byte: int) -> bytes:
    data = snap.SerializeToString()
    if not data:
        return data
    at %= len(data)
    return data[:at] + bytes((byte,)) + data[at + 1 :]


def _parses(data: bytes) -> rs.ConnectionSnapshot | None:
    try:
        return rs.ConnectionSnapshot.FromString(data)
    except Exception:
        return None


def _check_oracle(module: Any, data: bytes) -> None:
    snap = _parses(data)
    if snap is None:
        return  # the servicer refuses it before the store sees it
    scanned = module.scan(data, validation.plain_mode)
    if scanned is None:
        return  # the parsed path decides
    kind, id, state, hook, client_id, body = scanned
    assert validation.snapshot_violations(snap, "s") == []
    assert snap.WhichOneof("connection") == ("client" if kind == 1 else "server")
    side = snap.client if kind == 1 else snap.server
    assert type(side).FromString(body) == side
    assert (id, state, hook, client_id) == (
        side.connection.id,
        side.connection.state,
        snap.hook,
        snap.client_id,
    )
    assert not side.connection.certificate_list
    assert module.payload(data) == body


def test_the_bounds_mirror_the_validation_module() -> None:
    assert _ingest.MAX_ID_BYTES == validation.MAX_ID_BYTES
    assert _ingest.MAX_HOST_BYTES == validation.MAX_HOST_BYTES
    assert _ingest.MAX_CONNECTION_BYTES == validation.MAX_CONNECTION_BYTES
    assert max(pb.Hook.values()) == _ingest.HOOK_MAX
    assert max(pb.ConnectionState.values()) == _ingest.STATE_MAX
    assert max(pb.TlsVersion.values()) == _ingest.TLS_VERSION_MAX


def test_the_installed_package_runs_the_compiled_module_unless_told_otherwise() -> None:
    # CI installs with a compiler; CONNMETA_PURE_PYTHON=1 runs the sources.
    if os.environ.get("CONNMETA_PURE_PYTHON"):
        assert not _ingest.compiled()
        assert store._APPLY_PLAIN is None
    elif os.environ.get("CONNMETA_EXPECT_COMPILED"):
        assert _ingest.compiled(), _ingest.__file__
    assert not source.compiled()


@pytest.mark.parametrize("module", modules)
def test_plain_snapshots_are_read_from_their_bytes(module: Any) -> None:
    c = next_id()
    for snap in (client(c, sni="c.example"), server(next_id(), client_id=c), server(next_id())):
        data = snap.SerializeToString()
        assert module.scan(data, validation.plain_mode) is not None, snap
        _check_oracle(module, data)


@pytest.mark.parametrize("module", modules)
def test_unusual_snapshots_are_left_to_the_full_checks(module: Any) -> None:
    with_via = server(next_id(), via=("http", ("p.example", 3128)))
    twice = server(next_id()).SerializeToString()
    unusual = [
        with_via.SerializeToString(),
        twice + twice,  # the server field twice: protobuf merges the two
        h.base_server(next_id()).SerializeToString() + b"\x2a\x00",  # a route outcome
        h.base_server(next_id(), client_id="").SerializeToString(),
        h.base_server(next_id()).SerializeToString() + b"\x30\x01",  # an unknown field
        b"",
    ]
    for data in unusual:
        assert module.scan(data, validation.plain_mode) is None, data


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(snap=_snapshots, damaged=_damaged)
def test_the_scan_agrees_with_the_full_checks_and_with_its_source(
    snap: rs.ConnectionSnapshot, damaged: tuple[rs.ConnectionSnapshot, int, int]
) -> None:
    for data in (snap.SerializeToString(), _damage(*damaged)):
        for module in (_ingest, source):
            _check_oracle(module, data)
        if _parses(data) is not None:
            mode_ok = validation.plain_mode
            assert _ingest.scan(data, mode_ok) == source.scan(data, mode_ok)
            assert _ingest.payload(data) == source.payload(data)


def _apply_all(batches: list[bytes], loop: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every batch through a fresh store as the servicer applies it; what it kept and refused."""
    monkeypatch.setattr(store, "_APPLY_PLAIN", loop)
    s = Store(clock=FakeClock())
    s.apply(h.seed_snapshots(), proxy=h.SEED_PROXY)
    s.attach_proxy(h.SEED_PROXY)
    out: list[Any] = []
    for data in batches:
        decoded = decode_report(data)
        if not isinstance(decoded, DecodedReport):
            continue
        rejected = s.apply(decoded.request.batch.snapshots, decoded.encoded, proxy="p")
        out.append([(r.index, r.id, r.reason, r.message, r.violations) for r in rejected])
    records, revision = s.snapshot()
    out.append(revision)
    out.append(sorted((r.id, r.data, r._bits, r.client_id, r.proxy) for r in records))
    return out


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(
        st.lists(st.one_of(_snapshots, _damaged), min_size=1, max_size=4),
        min_size=1,
        max_size=3,
    )
)
def test_a_store_fed_through_the_scan_keeps_and_refuses_what_the_pure_store_does(
    batches: list[list[Any]],
) -> None:
    encoded = []
    for batch in batches:
        parts = []
        for item in batch:
            data = (
                item.SerializeToString()
                if isinstance(item, rs.ConnectionSnapshot)
                else (_damage(*item))
            )
            parts.append(b"\x0a" + _varint(len(data)) + data)
        body = b"".join(parts)
        encoded.append(b"\x12" + _varint(len(body)) + body)
    with pytest.MonkeyPatch.context() as monkeypatch:
        fast = _apply_all(encoded, _ingest.apply_plain, monkeypatch)
        from_source = _apply_all(encoded, source.apply_plain, monkeypatch)
        pure = _apply_all(encoded, None, monkeypatch)
    assert fast == pure
    assert from_source == pure


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _lifecycle(loop: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """A connection's life and its corner cases through one store: new, changed,
    unchanged, resynced, a pending change settled, closed, expired and reported
    again, a kind conflict, an id another live proxy holds."""
    monkeypatch.setattr(store, "_APPLY_PLAIN", loop)
    clock = FakeClock()
    s = Store(clock=clock, closed_retention_seconds=10, closed_retention_count=2)
    out: list[Any] = []

    def report(*snaps: rs.ConnectionSnapshot, proxy: str = "p") -> None:
        data = rs.ReportRequest(batch=rs.ReportBatch(snapshots=snaps)).SerializeToString()
        decoded = decode_report(data)
        assert isinstance(decoded, DecodedReport)
        rejected = s.apply(decoded.request.batch.snapshots, decoded.encoded, proxy=proxy)
        out.append([(r.index, r.id, r.reason) for r in rejected])
        clock.now += 1

    s.attach_proxy("p")
    s.attach_proxy("q")
    c, a, b = "client-1", "server-a", "server-b"
    report(client(c), server(a, client_id=c, hook=pb.HOOK_SERVER_CONNECT))
    report(server(a, client_id=c), server(a, client_id=c))  # changed, then unchanged
    report(server(a, client_id="client-2"), server(a, client_id=c))  # another client
    resync = s.begin_resync("p")
    report(server(a, client_id=c, hook=pb.HOOK_RESYNC), client(c, hook=pb.HOOK_RESYNC))
    out.append(sorted(resync.seen))
    s.end_resync(resync)
    report(server(b, client_id=c, state=pb.CONNECTION_STATE_CLOSED))
    s.update_server(b, address=pb.Address(host="x.example", port=1), via=None, mask=["address"])
    report(server(b, client_id=c, hook=pb.HOOK_SERVER_CONNECTED))  # settles the change
    report(server(b, client_id=c, hook=pb.HOOK_SERVER_DISCONNECTED, state=0))
    report(client(a), server(c), server(a, client_id=c), proxy="q")  # conflicts
    report(client(c, hook=pb.HOOK_CLIENT_DISCONNECTED, state=0))
    clock.now += 100
    out.append(s.expire())
    report(client(c), server(b, client_id=c))  # deleted ids come back
    records, revision = s.snapshot()
    out.append(revision - s.oldest_revision)
    out.append(sorted((r.id, r.data, r._bits, r.client_id, r.proxy) for r in records))
    out.append([(e.type, e.record.data) for e in s.events_after(s.oldest_revision)])
    index = s._index
    out.append(
        (
            list(index.after("")),
            [list(ids) for ids in index.by_slot],
            sorted((str(k), list(index.by_client.after(k, ""))) for k in index.by_client),
            dict(s._terminal),
            s._terminal_bytes,
        )
    )
    out.append((list(s._census), sorted(s._pending)))
    return out


def test_a_connection_s_whole_life_is_stored_alike_through_the_scan() -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        pure = _lifecycle(None, monkeypatch)
        assert _lifecycle(_ingest.apply_plain, monkeypatch) == pure
        assert _lifecycle(source.apply_plain, monkeypatch) == pure
