"""The addon's snapshot encoding from primitive values, compiled with mypyc.

``connmeta.mitm._wire`` reads mitmproxy's objects and keeps what needs
mitmproxy, cryptography or upb (certificates, proxy modes, ``via``, IPv6
addresses); this module assembles the bytes: varints, field framing, the
caches of strings, addresses and timestamps, and a Connection, Client, Server
and ConnectionSnapshot in field-number order as upb writes them. It imports
nothing of connmeta or of any third-party package, so hatch_build.py can
compile it (``COMPILED``); ``_wire`` hands it the rest once, through
``configure``. The objects it reads are typed ``Any``: mypyc reads their
attributes with one C call each instead of the interpreter's bytecode.

What it pays (bench/wire_hooks.py, 2026-11-26, 20,000 plain HTTP requests'
hooks called in-process on fresh objects, medians): 41.9 µs a request
compiled, 61.9 µs as Python (main's _wire.py: 62.9), of which 14.0 µs are
the hooks' own work: encoding 28 µs instead of 48. The proxy's CPU ratio
(bench/proxy_bench.py) did not move beyond its noise (0.949 compiled, 0.953
pure; see bench/README.md).

Whatever this module does not handle raises ``Unusual`` (or the TypeError,
KeyError, AttributeError or UnicodeEncodeError of a value of the wrong type):
``_wire`` then takes the reference way, through ``to_proto``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

__all__ = ["Unusual", "compiled", "configure", "field", "snapshot", "varint"]

CACHE_MAX: Final = 4096
"""Entries per cache; a full cache is emptied (cheaper than an LRU's
bookkeeping on every hit, and refilled by the next hooks)."""
_SMALL: Final = [bytes((i,)) for i in range(128)]
_NS: Final = 1_000_000_000
_MIN_SECONDS: Final = -62_135_596_800  # 0001-01-01T00:00:00Z (connmeta.mitm._timestamps)
_MAX_SECONDS: Final = 253_402_300_799  # 9999-12-31T23:59:59Z


class Unusual(Exception):
    """The fast path does not handle this value: take the reference way."""


def compiled() -> bool:
    """Whether this is the module compiled by mypyc (else its Python source runs)."""
    return not __file__.endswith(".py")


def _unset(value: Any) -> bytes:
    raise Unusual


# What _wire supplies (configure): enum values by mitmproxy's value, and the
# encoders that need mitmproxy, cryptography or upb.
_states: dict[Any, int] = {}
# The same by the key's id: an Enum's __hash__ is Python code (~0.25 µs a
# lookup, the most of any field); its members live as long as ``_states``.
_state_ids: dict[int, int] = {}
_transports: dict[str, bytes] = {}
_tls_versions: dict[str, int] = {}
_certificate: Callable[[Any], bytes] = _unset
_mode: Callable[[Any], bytes] = _unset
_via: Callable[[Any], bytes] = _unset
_odd_address: Callable[[Any], bytes] = _unset
_closed: int = 0


def configure(
    states: dict[Any, int],
    transports: dict[str, int],
    tls_versions: dict[str, int],
    closed: int,
    certificate: Callable[[Any], bytes],
    mode: Callable[[Any], bytes],
    via: Callable[[Any], bytes],
    odd_address: Callable[[Any], bytes],
) -> None:
    """Set the tables and encoders ``snapshot`` needs from outside this module."""
    global _certificate, _mode, _via, _odd_address, _closed
    _states.clear()
    _states.update(states)
    _state_ids.clear()
    _state_ids.update({id(key): value for key, value in _states.items()})
    _transports.clear()
    # Whole fields (key and value): Connection.transport_protocol (5).
    _transports.update({k: b"\x28" + bytes((v,)) for k, v in transports.items()})
    _tls_versions.clear()
    _tls_versions.update(tls_versions)
    _closed = closed
    _certificate = certificate
    _mode = mode
    _via = via
    _odd_address = odd_address


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


# Length-prefixed encodings (what follows a field's key), by value.
_addresses: dict[Any, bytes] = {}
_timestamps: dict[Any, bytes] = {}
# Connection and client ids (each in every snapshot of its connection and of
# its client's servers), SNI, cipher names.
_strings: dict[Any, bytes] = {}
_seconds: dict[int, bytes] = {}
_cipher_lists: dict[tuple[Any, ...], bytes] = {}


def cache_address(t: tuple[Any, ...], value: bytes) -> bytes:
    """Keep ``value``, the encoding of ``t`` that _wire made (an IPv6 address)."""
    if len(_addresses) >= CACHE_MAX:
        _addresses.clear()
    _addresses[t] = value
    return value


def _address(t: Any) -> bytes:
    if type(t) is not tuple:
        raise Unusual
    value = _addresses.get(t)
    if value is None:
        if len(t) != 2:
            return _odd_address(t)
        host: Any = t[0]
        port: Any = t[1]
        if type(host) is not str or type(port) is not int or not 0 <= port <= 0xFFFF:
            raise Unusual
        encoded = host.encode()
        body = (
            (b"\x0a" + varint(len(encoded)) + encoded if encoded else b"")
            + (b"\x10" + varint(port) if port else b"")
        )  # fmt: skip
        return cache_address(t, varint(len(body)) + body)
    if type(t[1]) is not int:
        raise Unusual  # bool is an int to a dict's keys, not to fill_address
    return value


_FAST_MIN: Final = float(1 << 20)
_FAST_MAX: Final = float(1 << 34)


def _split(value: Any) -> tuple[int, int]:
    """connmeta.mitm._timestamps.split_timestamp, its errors as Unusual."""
    if type(value) is float and _FAST_MIN <= value < _FAST_MAX:
        return _split_float(value)
    try:
        num, den = value.as_integer_ratio()
    except (OverflowError, ValueError, AttributeError):
        raise Unusual from None
    ns, rem = divmod(num * _NS, den)
    twice = 2 * rem
    if twice > den or (twice == den and ns & 1):
        ns += 1
    seconds, nanos = divmod(ns, _NS)
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise Unusual
    return seconds, nanos


def _split_float(value: float) -> tuple[int, int]:
    """``_split`` for 2**20 <= value < 2**34 (1970-01-13 to 2514), in machine
    integers: a timestamp's spacing there is at least 2**-32 s, so its fraction
    is an exact ``num / 2**32`` and ``num * 10**9`` < 2**62. Rounded to the
    nearest nanosecond, ties to even, as _split's exact ratio (a cache miss
    costs ~1.4 µs through the ratio's big integers, 2026-11-26)."""
    seconds = int(value)  # the floor: value > 0
    num = int((value - seconds) * 4294967296.0)  # both exact
    product = num * _NS
    nanos = product >> 32
    rem = product & 0xFFFF_FFFF
    if rem > 0x8000_0000 or (rem == 0x8000_0000 and nanos & 1):
        nanos += 1
    if nanos == _NS:
        return seconds + 1, 0
    return seconds, nanos


def _timestamp(v: Any) -> bytes:
    value = _timestamps.get(v)
    if value is None:
        seconds, nanos = _split(v)
        head = _seconds.get(seconds)
        if head is None:
            if len(_seconds) >= CACHE_MAX:
                _seconds.clear()
            head = _seconds[seconds] = b"\x08" + varint(seconds) if seconds else b""
        body = head + b"\x10" + varint(nanos) if nanos else head
        if len(_timestamps) >= CACHE_MAX:
            _timestamps.clear()
        value = _timestamps[v] = varint(len(body)) + body
    return value


def _string(s: Any) -> bytes:
    value = _strings.get(s)
    if value is None or type(s) is not str:
        if type(s) is not str:
            raise Unusual
        b = s.encode()  # lone surrogates: UnicodeEncodeError, the reference way
        if len(_strings) >= CACHE_MAX:
            _strings.clear()
        value = _strings[s] = varint(len(b)) + b
    return value


def _cipher_list(ciphers: Any) -> bytes:
    """Connection.cipher_list (12), every entry: a client offers dozens, the
    same list on every connection of one client program."""
    if type(ciphers) is not list:
        raise Unusual
    key = tuple(ciphers)
    value = _cipher_lists.get(key)
    if value is None:
        value = b"".join([b"\x62" + _string(cipher) for cipher in ciphers])
        if len(_cipher_lists) >= CACHE_MAX:
            _cipher_lists.clear()
        _cipher_lists[key] = value
    return value


def _bytes(b: Any) -> bytes:
    if type(b) is not bytes:
        raise Unusual
    return varint(len(b)) + b


def _connection(c: Any, closed: bool) -> bytes:
    """Connection's fields, in field-number order as upb writes them."""
    parts: list[bytes] = []
    add = parts.append
    cid: Any = c.id
    if cid:
        add(b"\x0a")
        add(_string(cid))
    elif type(cid) is not str:
        raise Unusual
    if closed:
        state = _closed
    else:
        current: Any = c.state
        state = _state_ids.get(id(current), -1)
        if state < 0:
            state = _states[current]
    if state:
        add(b"\x10")
        add(_SMALL[state])
    peername: Any = c.peername
    if peername is not None:
        add(b"\x1a")
        add(_address(peername))
    sockname: Any = c.sockname
    if sockname is not None:
        add(b"\x22")
        add(_address(sockname))
    transport = _transports.get(c.transport_protocol)
    if transport is None:
        raise Unusual
    add(transport)
    error: Any = c.error
    if error is not None:
        add(b"\x32")
        add(_string(error))
    tls: Any = c.tls
    if tls is True:
        add(b"\x38\x01")
    elif tls is not False:
        raise Unusual
    for cert in c.certificate_list:
        add(b"\x42")
        add(_certificate(cert))
    alpn: Any = c.alpn
    if alpn is not None:
        add(b"\x4a")
        add(_bytes(alpn))
    for offer in c.alpn_offers:
        add(b"\x52")
        add(_bytes(offer))
    cipher: Any = c.cipher
    if cipher is not None:
        add(b"\x5a")
        add(_string(cipher))
    cipher_list: Any = c.cipher_list
    if cipher_list:
        add(_cipher_list(cipher_list))
    tls_version: Any = c.tls_version
    if tls_version is not None:
        version = _tls_versions.get(tls_version)
        if version is None:
            raise Unusual
        add(b"\x68")
        add(_SMALL[version])
    sni: Any = c.sni
    if sni is not None:
        add(b"\x72")
        add(_string(sni))
    start: Any = c.timestamp_start
    if start is not None:
        add(b"\x7a")
        add(_timestamp(start))
    end: Any = c.timestamp_end
    if end is not None:
        add(b"\x82\x01")
        add(_timestamp(end))
    tls_setup: Any = c.timestamp_tls_setup
    if tls_setup is not None:
        add(b"\x8a\x01")
        add(_timestamp(tls_setup))
    return b"".join(parts)


def _client(c: Any, closed: bool) -> bytes:
    if c.peername is None or c.sockname is None or c.timestamp_start is None:
        raise Unusual  # required: the reference way names the field
    connection = _connection(c, closed)
    parts = [b"\x0a", varint(len(connection)), connection]
    mitmcert: Any = c.mitmcert
    if mitmcert is not None:
        parts.append(b"\x12")
        parts.append(_certificate(mitmcert))
    parts.append(b"\x1a")
    parts.append(_mode(c.proxy_mode))
    return b"".join(parts)


def _server(s: Any, closed: bool) -> bytes:
    connection = _connection(s, closed)
    parts = [b"\x0a", varint(len(connection)), connection]
    address: Any = s.address
    if address is not None:
        if type(address) is not tuple or len(address) != 2:
            raise Unusual
        parts.append(b"\x12")
        parts.append(_address(address))
    tcp_setup: Any = s.timestamp_tcp_setup
    if tcp_setup is not None:
        parts.append(b"\x1a")
        parts.append(_timestamp(tcp_setup))
    via: Any = s.via
    if via is not None:
        parts.append(b"\x22")
        parts.append(_via(via))
    return b"".join(parts)


def snapshot(conn: Any, is_client: bool, hook: bytes, client_id: Any, closed: bool) -> bytes:
    """A ConnectionSnapshot: ``hook`` its whole hook field (empty for 0),
    ``conn`` a mitmproxy Client (``is_client``) or Server."""
    body = _client(conn, closed) if is_client else _server(conn, closed)
    return b"".join(
        (
            hook,
            b"\x12" + _string(client_id) if client_id else b"",
            b"\x1a" if is_client else b"\x22",
            varint(len(body)),
            body,
        )
    )
