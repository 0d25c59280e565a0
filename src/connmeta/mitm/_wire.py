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

Anything unusual (a value of an unexpected type, a tuple of an odd length, a
string with lone surrogates, a value out of range) goes the reference way,
through ``to_proto``: it either produces the bytes or raises the ValueError
naming the field. The fast path never decides on an error of its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Final

from cryptography.hazmat.primitives.serialization import Encoding
from mitmproxy import certs
from mitmproxy.connection import Client, Connection, Server
from mitmproxy.proxy.mode_specs import ProxyMode

from connmeta.addresses import fill_address, fill_via
from connmeta.mitm._convert import _STATE_VALUES, _TLS_VALUES, _TRANSPORT_VALUES, _x509_of, to_proto
from connmeta.mitm._timestamps import split_timestamp
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs

__all__ = ["field", "snapshot_bytes", "varint"]

_CACHE_MAX: Final = 4096
"""Entries per cache; a full cache is emptied (cheaper than an LRU's
bookkeeping on every hit, and refilled by the next hooks)."""
_SMALL: Final = [bytes((i,)) for i in range(128)]
_CLOSED: Final = pb.CONNECTION_STATE_CLOSED
_DER: Final = Encoding.DER
# Whole fields (key and value) for the small enums.
_STATE_FIELDS: Final = {v: b"\x10" + bytes((v,)) for v in _STATE_VALUES.values()}
_TRANSPORT_FIELDS: Final = {k: b"\x28" + bytes((v,)) for k, v in _TRANSPORT_VALUES.items()}
_HOOK_FIELDS: Final = {v: b"\x08" + bytes((v,)) for v in pb.Hook.values()}


class _Unusual(Exception):
    """The fast path does not handle this value: take the reference way."""


def varint(n: int) -> bytes:
    """A non-negative integer as a protobuf varint (negative int64: 10 bytes)."""
    if 0 <= n < 0x80:
        return _SMALL[n]
    if 0 < n < 0x8_0000_0000:  # up to 5 bytes: lengths, epoch seconds, nanos
        if n < 0x4000:
            return bytes((n & 0x7F | 0x80, n >> 7))
        if n < 0x20_0000:
            return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
        if n < 0x1000_0000:
            return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21))
        return bytes(
            (n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80,
             n >> 21 & 0x7F | 0x80, n >> 28)
        )  # fmt: skip
    n &= 0xFFFF_FFFF_FFFF_FFFF
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field: ``tag`` (the encoded key), the length, ``body``."""
    return tag + varint(len(body)) + body


def _delimited(body: bytes) -> bytes:
    return varint(len(body)) + body


# Length-prefixed encodings (what follows a field's key), by value.
_addresses: dict[tuple[object, ...], bytes] = {}
_timestamps: dict[float, bytes] = {}
_vias: dict[tuple[object, ...], bytes] = {}
# Connection and client ids (each in every snapshot of its connection and of
# its client's servers), SNI, cipher names.
_strings: dict[str, bytes] = {}
_seconds: dict[int, bytes] = {}
_cipher_lists: dict[tuple[object, ...], bytes] = {}
# By object identity; the object is kept beside its encoding (a mode) or
# watched (a certificate: the entry leaves with it), so an id is never reused
# for another object while its entry lives.
_modes: dict[int, tuple[ProxyMode, bytes]] = {}
_certs: dict[int, tuple[weakref.ref[certs.Cert], bytes]] = {}


def _address(t: object) -> bytes:
    if type(t) is not tuple:
        raise _Unusual
    value = _addresses.get(t)
    if value is None:
        if len(t) != 2:
            return _address_reference(t)
        host, port = t
        if type(host) is not str or type(port) is not int or not 0 <= port <= 0xFFFF:
            raise _Unusual
        encoded = host.encode()
        body = (
            (b"\x0a" + varint(len(encoded)) + encoded if encoded else b"")
            + (b"\x10" + varint(port) if port else b"")
        )  # fmt: skip
        if len(_addresses) >= _CACHE_MAX:
            _addresses.clear()
        value = _addresses[t] = varint(len(body)) + body
    elif type(t[1]) is not int:
        raise _Unusual  # bool is an int to a dict's keys, not to fill_address
    return value


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
    if len(_addresses) >= _CACHE_MAX:
        _addresses.clear()
    value = _addresses[t] = _delimited(msg.SerializeToString())
    return value


def _timestamp(v: object) -> bytes:
    value = _timestamps.get(v)  # type: ignore[call-overload]
    if value is None:
        try:
            seconds, nanos = split_timestamp(v, "")  # type: ignore[arg-type]
        except ValueError:
            raise _Unusual from None
        head = _seconds.get(seconds)
        if head is None:
            if len(_seconds) >= _CACHE_MAX:
                _seconds.clear()
            head = _seconds[seconds] = b"\x08" + varint(seconds) if seconds else b""
        body = head + b"\x10" + varint(nanos) if nanos else head
        if len(_timestamps) >= _CACHE_MAX:
            _timestamps.clear()
        value = _timestamps[v] = varint(len(body)) + body  # type: ignore[index]
    return value  # type: ignore[no-any-return]


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


def _string(s: object) -> bytes:
    value = _strings.get(s)  # type: ignore[call-overload]
    if value is None or type(s) is not str:
        if type(s) is not str:
            raise _Unusual
        b = s.encode()  # lone surrogates: UnicodeEncodeError, the reference way
        if len(_strings) >= _CACHE_MAX:
            _strings.clear()
        value = _strings[s] = varint(len(b)) + b
    return value  # type: ignore[no-any-return]


def _cipher_list(ciphers: object) -> bytes:
    """Connection.cipher_list (12), every entry: a client offers dozens, the
    same list on every connection of one client program."""
    if type(ciphers) is not list:
        raise _Unusual
    key = tuple(ciphers)
    value = _cipher_lists.get(key)
    if value is None:
        value = b"".join([b"\x62" + _string(cipher) for cipher in ciphers])
        if len(_cipher_lists) >= _CACHE_MAX:
            _cipher_lists.clear()
        _cipher_lists[key] = value
    return value


def _bytes(b: object) -> bytes:
    if type(b) is not bytes:
        raise _Unusual
    return varint(len(b)) + b


def _connection(c: Connection, closed: bool) -> bytes:
    """Connection's fields, in field-number order as upb writes them."""
    parts: list[bytes] = []
    add = parts.append
    if c.id:
        add(b"\x0a")
        add(_string(c.id))
    elif type(c.id) is not str:
        raise _Unusual
    state = _CLOSED if closed else _STATE_VALUES[c.state]
    if state:
        add(_STATE_FIELDS[state])
    if c.peername is not None:
        add(b"\x1a")
        add(_address(c.peername))
    if c.sockname is not None:
        add(b"\x22")
        add(_address(c.sockname))
    transport = _TRANSPORT_FIELDS.get(c.transport_protocol)
    if transport is None:
        raise _Unusual
    add(transport)
    if c.error is not None:
        add(b"\x32")
        add(_string(c.error))
    tls = c.tls
    if tls is True:
        add(b"\x38\x01")
    elif tls is not False:
        raise _Unusual
    for cert in c.certificate_list:
        add(b"\x42")
        add(_certificate(cert))
    if c.alpn is not None:
        add(b"\x4a")
        add(_bytes(c.alpn))
    for offer in c.alpn_offers:
        add(b"\x52")
        add(_bytes(offer))
    if c.cipher is not None:
        add(b"\x5a")
        add(_string(c.cipher))
    if c.cipher_list:
        add(_cipher_list(c.cipher_list))
    if c.tls_version is not None:
        version = _TLS_VALUES.get(c.tls_version)
        if version is None:
            raise _Unusual
        add(b"\x68")
        add(_SMALL[version])
    if c.sni is not None:
        add(b"\x72")
        add(_string(c.sni))
    if c.timestamp_start is not None:
        add(b"\x7a")
        add(_timestamp(c.timestamp_start))
    if c.timestamp_end is not None:
        add(b"\x82\x01")
        add(_timestamp(c.timestamp_end))
    if c.timestamp_tls_setup is not None:
        add(b"\x8a\x01")
        add(_timestamp(c.timestamp_tls_setup))
    return b"".join(parts)


def _client(c: Client, closed: bool) -> bytes:
    if c.peername is None or c.sockname is None or c.timestamp_start is None:
        raise _Unusual  # required: the reference way names the field
    connection = _connection(c, closed)
    parts = [b"\x0a", varint(len(connection)), connection]
    if c.mitmcert is not None:
        parts += (b"\x12", _certificate(c.mitmcert))
    parts += (b"\x1a", _mode(c.proxy_mode))
    return b"".join(parts)


def _server(s: Server, closed: bool) -> bytes:
    connection = _connection(s, closed)
    parts = [b"\x0a", varint(len(connection)), connection]
    address = s.address
    if address is not None:
        if type(address) is not tuple or len(address) != 2:
            raise _Unusual
        parts += (b"\x12", _address(address))
    if s.timestamp_tcp_setup is not None:
        parts += (b"\x1a", _timestamp(s.timestamp_tcp_setup))
    if s.via is not None:
        parts += (b"\x22", _via(s.via))
    return b"".join(parts)


def snapshot_bytes(
    conn: Client | Server, hook: pb.Hook.ValueType, client_id: str = "", *, closed: bool = False
) -> bytes:
    """The encoded ConnectionSnapshot of ``conn`` (certificates as DER only);
    ``closed``: with state CLOSED whatever the object says. Raises what
    ``to_proto`` raises for an object a message cannot hold."""
    try:
        if type(conn) is Client:
            tag, body = b"\x1a", _client(conn, closed)
        elif type(conn) is Server:
            tag, body = b"\x22", _server(conn, closed)
        else:
            raise _Unusual
        return b"".join(
            (
                _HOOK_FIELDS[hook] if hook else b"",
                b"\x12" + _string(client_id) if client_id else b"",
                tag,
                varint(len(body)),
                body,
            )
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
