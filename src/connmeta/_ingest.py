"""The ingest fast path: a reported snapshot read from its wire bytes, no protobuf objects.

``scan(data)`` reads one encoded ``ConnectionSnapshot`` and returns what the
store needs of it (kind, id, state, hook, client id and the client or server
payload as it arrived) when the snapshot is *plainly valid*: it satisfies
every rule of ``connmeta.validation`` in the common, certificate-free shape a
proxy reports. Anything else (a certificate, a via, a route outcome, a field
sent twice, an unknown field, a value out of range) returns None, and the
store then takes the parsed path, whose full checks explain the problem with
field paths. So this module may only ever be stricter than the checks, never
laxer (``tests/test_ingest.py`` holds the two together, the checks as oracle).

The caller has parsed the same bytes with the public types first, which is
where malformed protobuf and invalid UTF-8 in any string are refused; the
scanner relies on that and checks only the contract's rules.

It is plain Python, and compiled with mypyc by the normal install
(``hatch_build.py``): reading a snapshot through upb costs a Python
attribute read per field (0.1-0.4 µs each, about 13 µs a record), the
compiled scan a small fraction of that (figures in bench/README.md). Setting
``CONNMETA_PURE_PYTHON=1`` imports the module's source instead
(``connmeta._impl``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

__all__ = ["Scanned", "compiled", "implementation", "payload", "scan"]

# Mirrors of connmeta.validation's bounds (tests/test_ingest.py checks they agree).
MAX_ID_BYTES: Final = 256
MAX_HOST_BYTES: Final = 255
MAX_CONNECTION_BYTES: Final = 1 << 20
PORT_MAX: Final = 65535
HOOK_MAX: Final = 12  # HOOK_PROXY_GONE
STATE_MAX: Final = 3  # CONNECTION_STATE_OPEN
TLS_VERSION_MAX: Final = 9  # TLS_VERSION_QUIC_V1
MIN_SECONDS: Final = -62_135_596_800
MAX_SECONDS: Final = 253_402_300_799
NANOS: Final = 1_000_000_000
_TWO64: Final = 1 << 64
_TWO63: Final = 1 << 63


Scanned = tuple[int, str, int, int, str, bytes]
"""kind (1 client, 2 server), connection id, state, hook, the snapshot's client_id
(as sent, "" when absent), and the client or server payload as it arrived."""


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; position -1 when malformed."""
    value = 0
    shift = 0
    while pos < end and shift < 70:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    return 0, -1


def _printable(data: bytes, start: int, end: int, low: int) -> bool:
    """Whether every byte in ``data[start:end]`` is in ``low``-0x7E: 0x21 for a plain id
    (printable ASCII, no space), 0x20 for a host. A loop, not a slice: compiled it
    costs a few ns a byte, and each object allocated costs 0.1-0.3 µs here."""
    for i in range(start, end):
        b = data[i]
        if b < low or b > 0x7E:
            return False
    return True


def _tag(data: bytes, pos: int, end: int) -> tuple[int, int]:
    # Tags of the fields read here fit one byte (field numbers below 16).
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    return _varint(data, pos, end)


def _length(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A length-delimited field's payload start and end; start -1 when it overruns."""
    if pos < end:
        b = data[pos]
        if b < 0x80:
            start = pos + 1
            stop = start + b
            return (start, stop) if stop <= end else (-1, 0)
    n, start = _varint(data, pos, end)
    if start < 0 or n > end - start:
        return -1, 0
    return start, start + n


def _plain_time(data: bytes, pos: int, end: int) -> bool:
    """A Timestamp in range: seconds in 0001-9999, nanos in 0-999999999."""
    seen = 0
    while pos < end:
        tag, pos = _tag(data, pos, end)
        if pos < 0 or tag & 7 != 0:
            return False
        field = tag >> 3
        if (field != 1 and field != 2) or seen & 1 << field:
            return False
        seen |= 1 << field
        value, pos = _varint(data, pos, end)
        if pos < 0:
            return False
        if field == 1:
            if value >= _TWO63:
                value -= _TWO64
            if not MIN_SECONDS <= value <= MAX_SECONDS:
                return False
        elif value >= NANOS:  # a negative int32 arrives as a ten-byte varint
            return False
    return True


def _plain_address(data: bytes, pos: int, end: int, pair: bool) -> bool:
    """An Address with a plain host and a port; a (host, port) ``pair`` holds nothing else,
    a socket address may carry flowinfo, and scope_id only with it."""
    seen = 0
    while pos < end:
        tag, pos = _tag(data, pos, end)
        if pos < 0:
            return False
        field = tag >> 3
        if field < 1 or field > 4 or seen & 1 << field:
            return False
        seen |= 1 << field
        if field == 1:
            if tag & 7 != 2:
                return False
            start, pos = _length(data, pos, end)
            if start < 0 or pos - start > MAX_HOST_BYTES or not _printable(data, start, pos, 0x20):
                return False
            continue
        if tag & 7 != 0 or (pair and field > 2):
            return False
        value, pos = _varint(data, pos, end)
        if pos < 0 or (field == 2 and value > PORT_MAX) or value >= _TWO64:
            return False
    return seen & 0x18 != 0x10  # scope_id (bit 4) only with flowinfo (bit 3)


def _connection(data: bytes, pos: int, end: int, client: bool) -> tuple[str, int]:
    """A plainly valid Connection's id and state; ("", -1) otherwise.

    A client's also needs a peername, a sockname and timestamp_start.
    """
    seen = 0
    id = ""
    state = 0
    transport = 0
    while pos < end:
        tag, pos = _tag(data, pos, end)
        if pos < 0:
            return "", -1
        field = tag >> 3
        wire = tag & 7
        if field < 1 or field > 17 or field == 8:  # 8: certificate_list, described elsewhere
            return "", -1
        if field == 10 or field == 12:  # alpn_offers, cipher_list: repeated strings
            if wire != 2:
                return "", -1
            start, pos = _length(data, pos, end)
            if start < 0:
                return "", -1
            continue
        if seen & 1 << field:
            return "", -1
        seen |= 1 << field
        if field == 2 or field == 5 or field == 7 or field == 13:
            if wire != 0:
                return "", -1
            value, pos = _varint(data, pos, end)
            if pos < 0:
                return "", -1
            if field == 2:
                if value > STATE_MAX:
                    return "", -1
                state = value
            elif field == 5:
                transport = value
            elif field == 13 and value > TLS_VERSION_MAX:
                return "", -1
            continue
        if wire != 2:
            return "", -1
        start, pos = _length(data, pos, end)
        if start < 0:
            return "", -1
        if field == 1:
            if not 0 < pos - start <= MAX_ID_BYTES or not _printable(data, start, pos, 0x21):
                return "", -1
            id = data[start:pos].decode("ascii")
        elif field == 3 or field == 4:
            if not _plain_address(data, start, pos, False):
                return "", -1
        elif field >= 15 and not _plain_time(data, start, pos):
            return "", -1
        # 6 error, 9 alpn, 11 cipher, 14 sni: any value (UTF-8 checked by the parse)
    if not id or (transport != 1 and transport != 2):
        return "", -1
    if client and seen & (1 << 3 | 1 << 4 | 1 << 15) != (1 << 3 | 1 << 4 | 1 << 15):
        return "", -1
    return id, state


def _plain_mode(data: bytes, pos: int, end: int, mode_ok: Callable[[bytes], bool]) -> bool:
    """A ProxyMode whose full_spec ``mode_ok`` accepts."""
    seen = 0
    spec = b""
    while pos < end:
        tag, pos = _tag(data, pos, end)
        if pos < 0:
            return False
        field = tag >> 3
        if field < 1 or field > 5 or seen & 1 << field:
            return False
        seen |= 1 << field
        if field == 5:
            if tag & 7 != 0:
                return False
            _, pos = _varint(data, pos, end)
            if pos < 0:
                return False
            continue
        if tag & 7 != 2:
            return False
        start, pos = _length(data, pos, end)
        if start < 0:
            return False
        if field == 1:
            spec = data[start:pos]
    return mode_ok(spec)


def _side(
    data: bytes, pos: int, end: int, server: bool, mode_ok: Callable[[bytes], bool]
) -> tuple[str, int]:
    """A plainly valid Server's (or Client's) connection id and state; ("", -1) otherwise."""
    seen = 0
    id = ""
    state = -1
    while pos < end:
        tag, pos = _tag(data, pos, end)
        if pos < 0 or tag & 7 != 2:
            return "", -1
        field = tag >> 3
        # A server's via (4) and a client's mitmcert (2) take the full checks.
        if field < 1 or field > 3 or seen & 1 << field or (field == 2 and not server):
            return "", -1
        seen |= 1 << field
        start, pos = _length(data, pos, end)
        if start < 0:
            return "", -1
        if field == 1:
            id, state = _connection(data, start, pos, not server)
            if state < 0:
                return "", -1
        elif field == 2:
            if not _plain_address(data, start, pos, True):
                return "", -1
        elif server:
            if not _plain_time(data, start, pos):
                return "", -1
        elif not _plain_mode(data, start, pos, mode_ok):
            return "", -1
    if not seen & 2:  # no connection: an empty id
        return "", -1
    if not server and not seen & 8:  # a client needs its proxy_mode
        return "", -1
    return id, state


def scan(data: bytes, mode_ok: Callable[[bytes], bool]) -> Scanned | None:
    """What the store needs of a plainly valid encoded ConnectionSnapshot, or None.

    ``mode_ok`` tells whether a client's proxy_mode.full_spec (UTF-8) is one
    mitmproxy parses (``connmeta.validation.plain_mode``): the grammar stays
    in the validation module, and this module imports nothing, so that it
    compiles on its own.
    """
    end = len(data)
    pos = 0
    hook = 0
    id_start = id_end = 0
    kind = 0
    body_start = body_end = 0
    seen = 0
    while pos < end:
        tag, pos = _tag(data, pos, end)
        if pos < 0:
            return None
        field = tag >> 3
        # 5: a route outcome takes the full checks (and may settle a change).
        if field < 1 or field > 4 or seen & 1 << field:
            return None
        seen |= 1 << field
        if field == 1:
            if tag & 7 != 0:
                return None
            hook, pos = _varint(data, pos, end)
            if pos < 0 or hook > HOOK_MAX:
                return None
            continue
        if tag & 7 != 2:
            return None
        start, pos = _length(data, pos, end)
        if start < 0:
            return None
        if field == 2:
            id_start = start
            id_end = pos
        else:
            if kind:  # both a client and a server: the full checks' case
                return None
            kind = field - 2
            body_start = start
            body_end = pos
    if not kind or body_end - body_start > MAX_CONNECTION_BYTES:
        return None
    if kind == 2 and (
        not 0 < id_end - id_start <= MAX_ID_BYTES or not _printable(data, id_start, id_end, 0x21)
    ):
        return None
    id, state = _side(data, body_start, body_end, kind == 2, mode_ok)
    if state < 0:
        return None
    client_id = data[id_start:id_end].decode("utf-8") if id_end else ""
    return kind, id, state, hook, client_id, data[body_start:body_end]


def payload(data: bytes) -> bytes | None:
    """The client or server payload of an encoded snapshot as it arrived, when it is
    there exactly once (a field sent twice is merged by protobuf: re-encode that)."""
    end = len(data)
    pos = 0
    found: bytes | None = None
    while pos < end:
        tag, pos = _tag(data, pos, end)
        if pos < 0:
            return None
        wire = tag & 7
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 2:
            start, pos = _length(data, pos, end)
            if start < 0:
                return None
            field = tag >> 3
            if field == 3 or field == 4:
                if found is not None:
                    return None
                found = data[start:pos]
        else:
            return None
        if pos < 0:
            return None
    return found


def compiled() -> bool:
    """Whether this is the module compiled by mypyc (else its Python source runs)."""
    return not __file__.endswith(".py")


def implementation() -> str:
    """Which ingest path this process runs, for start-up logs and benchmark output."""
    return "compiled (mypyc)" if compiled() else "pure Python"
