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

from collections.abc import Callable, Sequence
from typing import Any, Final

__all__ = [
    "Scanned",
    "apply_plain",
    "compiled",
    "encode_record",
    "implementation",
    "payload",
    "scan",
]

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


# -- the store's loop over a batch ----------------------------------------------

HOOK_RESYNC: Final = 11


def _put_varint(parts: list[bytes], value: int, tables: tuple[tuple[bytes, ...], ...]) -> None:
    """Append ``value``'s varint to ``parts`` from ``records``' tables: every varint
    below 2**14, and the low 14 bits of larger ones (no per-byte work, no object)."""
    low14 = tables[1]
    while value >= 0x4000:
        parts.append(low14[value & 0x3FFF])
        value >>= 14
    parts.append(tables[0][value])


def _varint_len(value: int) -> int:
    n = 1
    while value >= 0x80:
        value >>= 7
        n += 1
    return n


def encode_record(
    revision: int,
    create_revision: int,
    client_id: bytes,
    hook: int,
    rest: bytes,
    tag: bytes,
    payload: bytes,
    tables: tuple[tuple[bytes, ...], ...],
) -> bytes:
    """``records.encode_record`` for a record without a change: the serialized
    ConnectionRecord, metadata first (revision, create_revision, etag, client_id
    when not empty, last_hook when not 0, then ``rest``: update_time and
    proxy_id already encoded), then the client or server field (``tag``).
    ``tables`` are ``records``' varint tables (_VARINT14, _LOW14)."""
    etag = str(revision).encode("ascii")
    cid_len = len(client_id)
    meta_len = (
        6
        + _varint_len(revision)
        + _varint_len(create_revision)
        + len(etag)
        + (1 + _varint_len(cid_len) + cid_len if cid_len else 0)
        + (2 if hook else 0)
        + len(rest)
    )
    small = tables[0]
    parts = [b"\n"]
    _put_varint(parts, meta_len, tables)
    parts.append(b"\x08")
    _put_varint(parts, revision, tables)
    parts.append(b"\x10")
    _put_varint(parts, create_revision, tables)
    parts.append(b"\x1a")
    parts.append(small[len(etag) + 2])
    parts.append(b'"')
    parts.append(etag)
    parts.append(b'"')
    if cid_len:
        parts.append(b"\x22")  # metadata.client_id, field 4
        _put_varint(parts, cid_len, tables)
        parts.append(client_id)
    if hook:
        parts.append(b"\x28")  # metadata.last_hook, field 5
        parts.append(small[hook])
    parts.append(rest)
    parts.append(tag)
    _put_varint(parts, len(payload), tables)
    parts.append(payload)
    return b"".join(parts)


def _meta_end(data: bytes) -> int:
    """Where a stored record's metadata (its first field) ends: ``Record.meta_end``."""
    end = len(data)
    length, pos = _varint(data, 1, end)
    return pos + length if pos >= 0 else end


def _create_revision(data: bytes) -> int:
    """A stored record's metadata.create_revision, its second field (``records._revisions``);
    -1 when the record does not start that way (then the store's own property decides)."""
    end = len(data)
    _, pos = _varint(data, 1, end)
    if pos < 0 or pos >= end or data[pos] != 0x08:
        return -1
    _, pos = _varint(data, pos + 1, end)
    if pos < 0 or pos >= end or data[pos] != 0x10:
        return -1
    value, pos = _varint(data, pos + 1, end)
    return value if pos >= 0 else -1


def _same_payload(data: bytes, start: int, tag: bytes, payload: bytes) -> bool:
    """Whether ``data`` from ``start`` on is exactly ``tag``, len(payload), payload."""
    n = len(payload)
    end = len(data)
    if start >= end or data[start] != tag[0]:
        return False
    length, pos = _varint(data, start + 1, end)
    return pos >= 0 and length == n and end - pos == n and data.endswith(payload)


def apply_plain(
    store: Any,
    encoded: Sequence[bytes],
    proxy: str,
    rest: bytes,
    now: float,
    seen_sets: Any,
    events: list[Any],
    rejected: list[Any],
    slow: Callable[[int], None],
    env: tuple[
        Any,
        Any,
        Any,
        Any,
        Any,
        tuple[int, ...],
        int,
        Any,
        Callable[[bytes], bool],
        tuple[tuple[bytes, ...], ...],
        tuple[int, int, int, int],
    ],
) -> None:
    """``Store.apply``'s loop for a batch of encoded snapshots: the plainly valid
    ones are applied here, every other one by ``slow(i)`` (the parsed path) in
    its turn, so revisions follow the batch's order.

    This mirrors the store's own loop for the common case and must keep
    exactly what it keeps (tests/test_ingest.py compares the two stores):
    a new or changed connection without certificates, whose previous version
    has no change pending or recorded. ``env`` holds the store's types and
    tables: Record, Event, ADDED, MODIFIED, the Kinds by number, the bits
    table, the terminal hooks as a bit mask, the conflict check,
    validation.plain_mode, records' varint tables, and where Record._bits
    keeps has_pending, has_last_change, terminal and last_hook (read from
    the slot: a property costs a Python call each).
    """
    (
        record_type,
        event_type,
        added,
        modified,
        kinds,
        bits_table,
        terminal_hooks,
        conflict,
        mode_ok,
        tables,
        layout,
    ) = env
    pending_bit, last_change_bit, terminal_bit, hook_shift = layout
    records: dict[str, Any] = store._records
    census: list[int] = store._census
    live: Any = store._live
    terminal: Any = store._terminal
    interned: dict[Any, Any] = store._interned
    for i in range(len(encoded)):
        scanned = scan(encoded[i], mode_ok)
        if scanned is None:
            slow(i)
            continue
        kind, id, state, hook, client_id, body = scanned
        tag = b"\x1a" if kind == 2 else b"\x12"
        prev = records.get(id)
        create_revision = 0
        was_terminal = False
        bits = 0
        if prev is not None:
            bits = prev._bits
            if bits & (pending_bit | last_change_bit):
                slow(i)  # the change may settle, and is carried over: the parsed path
                continue
            same_kind = bits & 3 == kind
            prev_proxy: str = prev.proxy
            if (
                same_kind
                and (hook == bits >> hook_shift & 15 or hook == HOOK_RESYNC)
                and prev_proxy == proxy
                and prev.client_id == (client_id or prev.id)
                and _same_payload(prev.data, _meta_end(prev.data), tag, body)
            ):
                for seen in seen_sets:
                    seen.add(id)
                continue  # an unchanged re-report
            if not same_kind or (prev_proxy != proxy and prev_proxy in live):
                refusal = conflict(i, prev, kinds[kind], proxy, live)
                if refusal is not None:
                    rejected.append(refusal)
                    continue
            id = prev.id
            create_revision = _create_revision(prev.data)
            if create_revision < 0:
                create_revision = prev.create_revision
            was_terminal = bool(bits & terminal_bit)
        for seen in seen_sets:
            seen.add(id)
        if kind == 2:
            owner = records.get(client_id)
            client_id = owner.id if owner is not None else interned.setdefault(client_id, client_id)
            cid = client_id.encode("ascii")
        else:
            client_id = id
            cid = b""
        revision: int = store._revision + 1
        if prev is None:
            create_revision = revision
        is_terminal = bool(terminal_hooks >> hook & 1) or state == 0
        low = kind | state << 2
        data = encode_record(revision, create_revision, cid, hook, rest, tag, body, tables)
        record = record_type(
            id,
            client_id,
            None,
            None,
            None,
            bits_table[low | hook << 4 | (256 if is_terminal else 0)],
            data,
            proxy,
        )
        store._revision = revision
        records[id] = record
        census[low] += 1
        if prev is None:
            events.append(event_type(revision, added, record, None))
        else:
            census[bits & 15] -= 1
            events.append(event_type(revision, modified, record, prev))
        if is_terminal:
            terminal.pop(id, None)
            terminal[id] = now
            size: int = store._terminal_bytes + len(data)
            if prev is not None and was_terminal:
                size -= len(prev.data)
            store._terminal_bytes = size
        elif prev is not None and was_terminal:
            terminal.pop(id, None)
            store._terminal_bytes = store._terminal_bytes - len(prev.data)
