"""A ConnectionSnapshot straight to wire bytes, inside the proxy's hooks.

``snapshot_bytes(conn, hook, client_id)`` returns exactly the bytes of
``ConnectionSnapshot(hook=..., client_id=..., client|server=to_proto(conn,
describe_certificates=False)).SerializeToString()`` (tests/mitm/test_wire.py
proves it for every object the converters' strategies generate), for a
fraction of the cost: a hook's conversion was ~25-35 µs through upb (a
message, a setter per field, a copy into the snapshot, and the batch's copy
and serialization later), which made most of the addon's +300 µs per plain
HTTP request (bench/proxy_bench.py, 2026-11-26).

What recurs is encoded once and kept: a certificate's DER per certificate
object (the client's mitmcert is shared by every connection to one host, the
server's chain by every hook of its connection: ``public_bytes`` is ~5 µs a
certificate), a proxy mode per mode object, an address per tuple, a timestamp
per value (every hook of a connection repeats its timestamp_start). The
sidecar keeps a snapshot's Client or Server bytes as they arrive
(``connmeta._rawview``), so byte-for-byte equality with upb is what keeps the
sidecar's records unchanged.

The byte assembly itself (varints, framing, the caches of strings,
addresses and timestamps, a Connection's fields in order) is
``connmeta._wirecore``, which mypyc compiles (hatch_build.py); this module
keeps what needs mitmproxy, cryptography or upb: certificates, proxy modes,
``via``, IPv6 addresses, and the reference way.

Anything unusual (a value of an unexpected type, a tuple of an odd length, a
string with lone surrogates, a value out of range) goes the reference way,
through ``to_proto``: it either produces the bytes or raises the ValueError
naming the field. The fast path never decides on an error of its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

from cryptography.hazmat.primitives.serialization import Encoding
from mitmproxy import certs
from mitmproxy.connection import Client, Server
from mitmproxy.proxy.mode_specs import ProxyMode

from connmeta import _wirecore
from connmeta.addresses import fill_address, fill_via
from connmeta.mitm._convert import _STATE_VALUES, _TLS_VALUES, _TRANSPORT_VALUES, _x509_of, to_proto
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs

__all__ = ["field", "snapshot_bytes", "varint"]

# The primitives, compiled (hatch_build.py) unless CONNMETA_PURE_PYTHON is set.
varint = _wirecore.varint
field = _wirecore.field
_CACHE_MAX: Final = _wirecore.CACHE_MAX
_CLOSED: Final = pb.CONNECTION_STATE_CLOSED
_DER: Final = Encoding.DER
_HOOK_FIELDS: Final = {v: b"\x08" + bytes((v,)) for v in pb.Hook.values()}
_Unusual = _wirecore.Unusual

# By object identity; the object is kept beside its encoding (a mode) or
# watched (a certificate: the entry leaves with it), so an id is never reused
# for another object while its entry lives.
_modes: dict[int, tuple[ProxyMode, bytes]] = {}
_certs: dict[int, tuple[weakref.ref[certs.Cert], bytes]] = {}
_vias: dict[tuple[object, ...], bytes] = {}


def _delimited(body: bytes) -> bytes:
    return varint(len(body)) + body


def _address_reference(t: tuple[object, ...]) -> bytes:
    """An IPv6 socket address (3 or 4 parts), through upb; rare enough."""
    for part in t[1:]:
        if type(part) is not int:
            raise _Unusual
    msg = pb.Address()
    try:
        fill_address(msg, t)
    except ValueError:
        raise _Unusual from None
    value: bytes = _core.cache_address(t, _delimited(msg.SerializeToString()))
    return value


def _certificate(cert: certs.Cert) -> bytes:
    key = id(cert)
    entry = _certs.get(key)
    if entry is not None and entry[0]() is cert:
        return entry[1]
    if type(cert) is not certs.Cert:
        raise _Unusual
    der = _x509_of(cert).public_bytes(_DER)  # ~5-6 µs, the most of a miss
    body = b"\x0a" + varint(len(der)) + der if der else b""  # Certificate.der (1)
    value = varint(len(body)) + body
    if len(_certs) >= _CACHE_MAX:
        _certs.clear()
    _certs[key] = (weakref.ref(cert, _forgetter(key)), value)
    return value


def _forgetter(key: int) -> Callable[[weakref.ref[certs.Cert]], None]:
    """The entry leaves with its certificate (before its id can be reused)."""

    def forget(_: weakref.ref[certs.Cert]) -> None:
        _certs.pop(key, None)

    return forget


def _mode(mode: ProxyMode) -> bytes:
    entry = _modes.get(id(mode))
    if entry is not None and entry[0] is mode:
        return entry[1]
    msg = pb.ProxyMode(full_spec=mode.full_spec, type_name=mode.type_name, data=mode.data)
    if mode.custom_listen_host is not None:
        msg.custom_listen_host = mode.custom_listen_host
    if mode.custom_listen_port is not None:
        msg.custom_listen_port = mode.custom_listen_port
    value = _delimited(msg.SerializeToString())
    if len(_modes) >= _CACHE_MAX:
        _modes.clear()
    _modes[id(mode)] = (mode, value)
    return value


def _via(via: object) -> bytes:
    if type(via) is not tuple:
        raise _Unusual
    value = _vias.get(via)
    if value is None:
        msg = pb.ServerSpec()
        try:
            fill_via(msg, via, "")
        except (ValueError, TypeError):
            raise _Unusual from None
        if len(_vias) >= _CACHE_MAX:
            _vias.clear()
        value = _vias[via] = _delimited(msg.SerializeToString())
    return value


def _bind(core: ModuleType) -> None:
    """Encode through ``core`` (connmeta._wirecore, compiled or its source:
    tests/mitm/test_wire.py runs both)."""
    global _core, _Unusual
    core.configure(
        {state: int(value) for state, value in _STATE_VALUES.items()},
        {name: int(value) for name, value in _TRANSPORT_VALUES.items()},
        {name: int(value) for name, value in _TLS_VALUES.items()},
        int(_CLOSED),
        _certificate,
        _mode,
        _via,
        _address_reference,
    )
    _core = core
    _Unusual = core.Unusual


_core: Any = _wirecore
_bind(_wirecore)


def snapshot_bytes(
    conn: Client | Server, hook: pb.Hook.ValueType, client_id: str = "", *, closed: bool = False
) -> bytes:
    """The encoded ConnectionSnapshot of ``conn`` (certificates as DER only);
    ``closed``: with state CLOSED whatever the object says. Raises what
    ``to_proto`` raises for an object a message cannot hold."""
    try:
        kind = type(conn)
        if kind is not Client and kind is not Server:
            raise _Unusual
        return _core.snapshot(  # type: ignore[no-any-return]
            conn, kind is Client, _HOOK_FIELDS[hook] if hook else b"", client_id, closed
        )
    except (_Unusual, UnicodeEncodeError, KeyError, AttributeError, TypeError):
        return _reference(conn, hook, client_id, closed)


def _reference(
    conn: Client | Server, hook: pb.Hook.ValueType, client_id: str, closed: bool
) -> bytes:
    """The same bytes through upb, or the error to_proto raises."""
    snap = rs.ConnectionSnapshot(hook=hook, client_id=client_id)
    if isinstance(conn, Client):
        snap.client.CopyFrom(to_proto(conn, describe_certificates=False))
        if closed:
            snap.client.connection.state = _CLOSED
    else:
        snap.server.CopyFrom(to_proto(conn, describe_certificates=False))
        if closed:
            snap.server.connection.state = _CLOSED
    return snap.SerializeToString()
