"""Stored record versions, change events, domain errors and wire helpers.

A record version is immutable serialized bytes of ``connmeta.v1.ConnectionRecord``
(metadata included) plus the few fields the store indexes, filters and guards
on. Readers hand the bytes on untouched: a repeated or nested message field is
``tag + varint(length) + bytes``, so a response is assembled by concatenation
(``encode_field``, ``encode_repeated``) instead of re-encoding.

Nothing here imports gRPC; the transport maps the errors to statuses.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from connmeta.v1 import connection_pb2 as pb

__all__ = [
    "Compacted",
    "ConnectionOpen",
    "EtagMismatch",
    "Event",
    "EventType",
    "InvalidArgument",
    "Kind",
    "NotFound",
    "Record",
    "Rejection",
    "StoreError",
    "encode_field",
    "encode_record",
    "encode_repeated",
    "encode_varint",
    "encode_watch_event",
]


class Kind(enum.IntEnum):
    """Client or server; the values are ``ConnectionKind``'s."""

    CLIENT = 1
    SERVER = 2


class EventType(enum.IntEnum):
    """What happened to a record; the values are ``WatchEventType``'s."""

    ADDED = 1
    MODIFIED = 2
    DELETED = 3
    BOOKMARK = 4
    INITIAL_EVENTS_END = 5


# -- errors -----------------------------------------------------------------


class StoreError(Exception):
    """Base of every error the domain core raises for a caller's mistake or a race."""


class NotFound(StoreError):
    """No connection with this id (never reported, or its retention ended)."""

    def __init__(self, id: str) -> None:
        super().__init__(f"connection {id!r} not found")
        self.id = id


class InvalidArgument(StoreError):
    """The request is malformed; ``violations`` are (field path, description) pairs."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {d}" for f, d in violations))
        self.violations = violations


class EtagMismatch(StoreError):
    """The etag given with an update is not the record's current etag."""

    def __init__(self, id: str, expected: str, actual: str) -> None:
        super().__init__(f"connection {id!r}: etag {expected} given, current is {actual}")
        self.id = id
        self.expected = expected
        self.actual = actual


class ConnectionOpen(StoreError):
    """mitmproxy's guard: ``field`` cannot change while the server is OPEN.

    ``current`` is the value mitmproxy holds, as text (``example.com:443``;
    ``""`` when unset).
    """

    def __init__(self, id: str, field: str, current: str) -> None:
        super().__init__(f"Cannot change server.{field} on open connection {id!r}")
        self.id = id
        self.field = field
        self.current = current


@dataclass(frozen=True, slots=True)
class Rejection:
    """One snapshot of a batch the store refused; the others were applied.

    ``reason`` is INVALID_SNAPSHOT (``violations`` name the fields),
    CONNECTION_KIND_CONFLICT or CONNECTION_OWNED_BY_OTHER_PROXY.
    """

    index: int
    id: str
    reason: str
    message: str
    violations: list[tuple[str, str]] = field(default_factory=list)


class Compacted(StoreError):
    """A revision outside the retained history was asked for: list again.

    Older than the oldest retained revision (compacted), or newer than the
    store (``ahead``): a revision this store never issued, from another
    incarnation's history.
    """

    def __init__(self, requested_revision: int, oldest_revision: int, ahead: bool = False) -> None:
        super().__init__(
            f"revision {requested_revision} is not in this store's history"
            if ahead
            else f"revision {requested_revision} is compacted; oldest available {oldest_revision}"
        )
        self.requested_revision = requested_revision
        self.oldest_revision = oldest_revision
        self.ahead = ahead


# -- wire helpers -----------------------------------------------------------

_V = TypeVar("_V")

_SMALL_VARINTS: Final = tuple(bytes((i,)) for i in range(128))
# Every varint below 2**14, and the low 14 bits of larger ones (continuation
# bits set): revisions, lengths and ports are encoded once or twice per
# stored record, and on this path a table lookup costs a fraction of the
# arithmetic (about 0.1 µs against 0.5-0.7 µs). About 1 MB, once.
_VARINT14: Final = _SMALL_VARINTS + tuple(
    bytes((i & 0x7F | 0x80, i >> 7)) for i in range(0x80, 0x4000)
)
_LOW14: Final = tuple(bytes((i & 0x7F | 0x80, i >> 7 | 0x80)) for i in range(0x4000))


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    if value < 0x4000:
        return _VARINT14[value]
    if value < 0x10000000:
        return _LOW14[value & 0x3FFF] + _VARINT14[value >> 14]
    if value < 1 << 42:
        return _LOW14[value & 0x3FFF] + _LOW14[value >> 14 & 0x3FFF] + _VARINT14[value >> 28]
    if value < 1 << 56:
        # Revisions start from the clock in microseconds (about 2**51): four
        # lookups instead of the loop's eight rounds, for every stored record.
        return b"".join(
            (
                _LOW14[value & 0x3FFF],
                _LOW14[value >> 14 & 0x3FFF],
                _LOW14[value >> 28 & 0x3FFF],
                _VARINT14[value >> 42],
            )
        )
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_field(field_number: int, payload: bytes) -> bytes:
    """One length-delimited field: ``tag + varint(len) + payload``."""
    return encode_varint(field_number << 3 | 2) + encode_varint(len(payload)) + payload


def encode_repeated(field_number: int, chunks: Iterable[bytes]) -> bytes:
    """A repeated message field from already serialized messages."""
    tag = encode_varint(field_number << 3 | 2)
    parts: list[bytes] = []
    append = parts.append
    for chunk in chunks:
        append(tag)
        append(encode_varint(len(chunk)))
        append(chunk)
    return b"".join(parts)


def encode_watch_event(type: int, revision: int, record: bytes | None = None) -> bytes:
    """A serialized ``WatchEvent``; ``record`` is a serialized ConnectionRecord."""
    head = b"\x08" + _SMALL_VARINTS[type] + b"\x10" + encode_varint(revision)
    if record is None:
        return head
    return head + b"\x1a" + encode_varint(len(record)) + record


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _revisions(data: bytes) -> tuple[int, int]:
    """metadata.revision and create_revision of a serialized ConnectionRecord.

    The store writes them as the first two fields of the metadata, which is the
    first field of the record (protobuf's own encoder does the same).
    """
    _, pos = _varint_at(data, 1)
    if data[pos] != 0x08:
        raise ValueError("record data does not start with metadata.revision")
    revision, pos = _varint_at(data, pos + 1)
    if data[pos] != 0x10:
        raise ValueError("record data lacks metadata.create_revision after revision")
    return revision, _varint_at(data, pos + 1)[0]


def encode_record(
    revision: int,
    create_revision: int,
    client_id_field: bytes,
    hook_field: bytes,
    rest: bytes,
    kind_tag: bytes,
    payload: bytes,
) -> bytes:
    """A serialized ConnectionRecord, as protobuf would encode it.

    The metadata holds revision, create_revision and the etag, then
    ``client_id_field`` and ``hook_field`` (fields 4 and 5, tag included, b""
    when default) and ``rest`` (fields 6 and 7 already encoded: last_change,
    update_time); ``kind_tag`` and ``payload`` are the client or server field.
    Hand-written, one join, because building a RecordMetadata message costs
    several times more on the ingest path.
    """
    rev = encode_varint(revision)
    etag = b'"%d"' % revision
    create = rev if create_revision == revision else encode_varint(create_revision)
    meta_len = (
        4 + len(rev) + len(create) + len(etag) + len(client_id_field) + len(hook_field) + len(rest)
    )
    size = len(payload)
    return b"".join(
        (
            b"\n",
            _SMALL_VARINTS[meta_len] if meta_len < 0x80 else encode_varint(meta_len),
            b"\x08",
            rev,
            b"\x10",
            create,
            b"\x1a",
            _SMALL_VARINTS[len(etag)],
            etag,
            client_id_field,
            hook_field,
            rest,
            kind_tag,
            _SMALL_VARINTS[size] if size < 0x80 else encode_varint(size),
            payload,
        )
    )


def _field_end(data: bytes, pos: int) -> int:
    """The end of the length-delimited field whose tag byte is at ``pos``."""
    pos += 1
    length = shift = 0
    while True:
        b = data[pos]
        pos += 1
        length |= (b & 0x7F) << shift
        if b < 0x80:
            return pos + length
        shift += 7


# -- records and events -------------------------------------------------------

# Record._bits packs the small fields so that a stored version costs one
# object with few slots: kind (2 bits), state (2), terminal, has_certs,
# has_last_change, last_hook (4 bits from bit 7), has_pending (bit 11).
_TERMINAL: Final = 1 << 4
_HAS_CERTS: Final = 1 << 5
_HAS_LAST_CHANGE: Final = 1 << 6
_HOOK_SHIFT: Final = 7
_HAS_PENDING: Final = 1 << 11
_KINDS: Final = (None, Kind.CLIENT, Kind.SERVER, None)
TERMINAL_HOOKS: Final = frozenset(
    (pb.HOOK_CLIENT_DISCONNECTED, pb.HOOK_SERVER_DISCONNECTED, pb.HOOK_SERVER_CONNECT_ERROR)
)
"""Hooks after which a connection is done (the store's ``_TERMINAL_HOOKS``)."""
_SHARED_INTS: Final = tuple(range(1 << 12))  # one object per _bits value


def pack_bits(
    kind: int,
    state: int,
    terminal: bool,
    has_certs: bool,
    has_last_change: bool,
    hook: int,
    has_pending: bool = False,
) -> int:
    """The shared int object for these small fields (see Record._bits)."""
    return _SHARED_INTS[
        kind
        | state << 2
        | (_TERMINAL if terminal else 0)
        | (_HAS_CERTS if has_certs else 0)
        | (_HAS_LAST_CHANGE if has_last_change else 0)
        | hook << _HOOK_SHIFT
        | (_HAS_PENDING if has_pending else 0)
    ]


_INTERN_MAX: Final = 1 << 16
_interned: dict[object, object] = {}


_FIELD: Final = descriptor_pb2.FieldDescriptorProto
_MESSAGE, _BYTES, _STRING, _UINT32, _ENUM_AS_INT = (
    _FIELD.TYPE_MESSAGE,
    _FIELD.TYPE_BYTES,
    _FIELD.TYPE_STRING,
    _FIELD.TYPE_UINT32,
    _FIELD.TYPE_INT32,
)


def _view(
    package: str, messages: tuple[tuple[str, tuple[tuple[str, int, int, str, bool], ...]], ...]
) -> Any:
    """A wire-compatible view of ConnectionRecord declaring only some of its fields
    (numbers as in connection.proto); the parser skips every other one. The last
    message named is the view's record."""
    file = descriptor_pb2.FileDescriptorProto(
        name=f"{package.replace('.', '/')}.proto", package=package, syntax="proto3"
    )
    for name, fields in messages:
        msg = file.message_type.add(name=name)
        for field_name, number, type_, type_name, repeated in fields:
            spec = msg.field.add(
                name=field_name,
                number=number,
                type=type_,
                label=_FIELD.LABEL_REPEATED if repeated else _FIELD.LABEL_OPTIONAL,
            )
            if type_name:
                spec.type_name = f".{package}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))


# What Record.host, .port and .sni read. Strings as bytes: stored records
# were validated as UTF-8 on ingest.
_Where: Final[Any] = _view(
    "connmeta.internal.where",
    (
        ("Address", (("host", 1, _BYTES, "", False), ("port", 2, _UINT32, "", False))),
        (
            "Connection",
            (("peername", 3, _MESSAGE, "Address", False), ("sni", 14, _BYTES, "", False)),
        ),
        ("Client", (("connection", 1, _MESSAGE, "Connection", False),)),
        (
            "Server",
            (
                ("connection", 1, _MESSAGE, "Connection", False),
                ("address", 2, _MESSAGE, "Address", False),
            ),
        ),
        (
            "Record",
            (("client", 2, _MESSAGE, "Client", False), ("server", 3, _MESSAGE, "Server", False)),
        ),
    ),
)
# What Record.from_data reads (RecordMetadata's and Connection's numbers).
# Enums as int32: the same varint, without the enum lookup.
_Saved: Final[Any] = _view(
    "connmeta.internal.saved",
    (
        ("Present", ()),
        (
            "Metadata",
            (
                ("client_id", 4, _STRING, "", False),
                ("last_hook", 5, _ENUM_AS_INT, "", False),
                ("last_change", 6, _MESSAGE, "Present", False),
                ("pending_change", 8, _MESSAGE, "Present", False),
                ("proxy_id", 9, _STRING, "", False),
            ),
        ),
        (
            "Connection",
            (
                ("id", 1, _STRING, "", False),
                ("state", 2, _ENUM_AS_INT, "", False),
                ("certificate_list", 8, _MESSAGE, "Present", True),
            ),
        ),
        (
            "Client",
            (
                ("connection", 1, _MESSAGE, "Connection", False),
                ("mitmcert", 2, _MESSAGE, "Present", False),
            ),
        ),
        ("Server", (("connection", 1, _MESSAGE, "Connection", False),)),
        (
            "Record",
            (
                ("metadata", 1, _MESSAGE, "Metadata", False),
                ("client", 2, _MESSAGE, "Client", False),
                ("server", 3, _MESSAGE, "Server", False),
            ),
        ),
    ),
)


def _shared(value: _V) -> _V:
    """One object per distinct host, SNI or port: they repeat across connections."""
    if len(_interned) >= _INTERN_MAX:
        _interned.clear()
    return _interned.setdefault(value, value)  # type: ignore[return-value]


class Record:
    """One immutable version of a connection record.

    ``data`` is the serialized ConnectionRecord in the FULL view with
    ``metadata.revision == revision``; the other attributes are copies of the
    fields the store indexes, filters and guards on, so that no hot path has
    to decode ``data``. Never mutate a Record: history and watchers share it.

    ``host``, ``port`` and ``sni`` are only needed by filters and updates, so
    ingest may leave them to be read from ``data`` on first use (pass None):
    reading them from the report cost about a quarter of ingest, while a
    filter that needs them pays a few microseconds once per record version.
    """

    # Six slots: 80 bytes with the object's headers. Host, port and SNI
    # share one slot (``_where``), an interned (host, port, sni) tuple: the
    # servers of one host share it, and three slots cost 16 bytes more per
    # stored record (bench/scale_bench.py).
    __slots__ = (
        "_bits",
        "_where",
        "client_id",
        "data",
        "id",
        "proxy",
    )

    id: str
    """mitmproxy's connection id."""
    client_id: str
    """For a server, the id of the client it serves; for a client, its own id."""
    data: bytes
    """Serialized ConnectionRecord, FULL view."""
    proxy: str
    """The proxy that last reported it (metadata.proxy_id); one shared str per proxy."""
    _bits: int
    _where: tuple[str, int, str] | None

    def __init__(
        self,
        id: str,
        client_id: str,
        host: str | None,
        port: int | None,
        sni: str | None,
        bits: int,
        data: bytes,
        proxy: str = "",
    ) -> None:
        self.id = id
        self.client_id = client_id
        self._where = (
            None
            if host is None or port is None or sni is None
            else _shared((_shared(host), _shared(port), _shared(sni)))
        )
        self._bits = bits
        self.data = data
        self.proxy = proxy

    @classmethod
    def from_data(cls, data: bytes) -> Record:
        """The version a store wrote as ``data`` (a saved state's), its indexed fields derived.

        The inverse of how the store packs them: terminal is a terminal hook
        or CLOSED (the store never keeps one without the other), the proxy is
        metadata.proxy_id, a client's client_id its own id. Decodes once, so
        it is for loading, not for the ingest path.
        """
        # A view declaring only these fields (_Saved): a restart reads every
        # saved record, and skipping the rest halves the parse.
        msg = _Saved.FromString(data)
        meta = msg.metadata
        if msg.HasField("server"):
            kind, conn = Kind.SERVER, msg.server.connection
            client_id = meta.client_id
            has_certs = bool(conn.certificate_list)
        elif msg.HasField("client"):
            kind, conn = Kind.CLIENT, msg.client.connection
            client_id = conn.id
            has_certs = bool(conn.certificate_list) or msg.client.HasField("mitmcert")
        else:
            raise ValueError("record data holds neither a client nor a server")
        state, hook = conn.state, meta.last_hook
        return cls(
            conn.id,
            client_id,
            None,
            None,
            None,
            _SHARED_INTS[
                kind
                | state << 2
                | (
                    _TERMINAL
                    if hook in TERMINAL_HOOKS or state == pb.CONNECTION_STATE_CLOSED
                    else 0
                )
                | (_HAS_CERTS if has_certs else 0)
                | (_HAS_LAST_CHANGE if meta.HasField("last_change") else 0)
                | hook << _HOOK_SHIFT
                | (_HAS_PENDING if meta.HasField("pending_change") else 0)
            ],
            data,
            _shared(meta.proxy_id),
        )

    @property
    def host(self) -> str:
        """A server's address host, a client's peername host; "" when absent."""
        where = self._where
        if where is None:
            where = self._index()
        return where[0]

    @property
    def port(self) -> int:
        """The port of the same address as ``host``; 0 when absent."""
        where = self._where
        if where is None:
            where = self._index()
        return where[1]

    @property
    def sni(self) -> str:
        """The connection's SNI; "" when absent."""
        where = self._where
        if where is None:
            where = self._index()
        return where[2]

    def _index(self) -> tuple[str, int, str]:
        """Read host, port and sni from ``data`` and keep them (a cache, not a change).

        Parsed with a view declaring only those fields (``_Where``): about
        3 µs, against 4-9 µs for decoding the whole record and reading them.
        """
        msg = _Where.FromString(self.data)
        if msg.HasField("server"):
            side = msg.server
            address = side.address
        else:
            side = msg.client
            address = side.connection.peername
        # Each part shared too: a client's tuple is its own (its port), its
        # host is not (about 90 bytes per client record).
        where = self._where = _shared(
            (
                _shared(address.host.decode()),
                _shared(address.port),
                _shared(side.connection.sni.decode()),
            )
        )
        return where

    @property
    def revision(self) -> int:
        """Store revision of this version (metadata.revision).

        Read from ``data`` rather than kept in a slot: a slot and its int cost
        40 bytes per stored record, reading it costs well under a microsecond.
        """
        return _revisions(self.data)[0]

    @property
    def create_revision(self) -> int:
        """Revision at which the store first saw the connection (metadata.create_revision)."""
        return _revisions(self.data)[1]

    @property
    def kind(self) -> Kind:
        """Client or server."""
        kind = _KINDS[self._bits & 3]
        assert kind is not None
        return kind

    @property
    def state(self) -> int:
        """mitmproxy's ConnectionState flag value: CLOSED 0, CAN_READ 1, CAN_WRITE 2, OPEN 3."""
        return (self._bits >> 2) & 3

    @property
    def terminal(self) -> bool:
        """True once the connection is done: a disconnect or connect-error hook, or CLOSED.

        Only terminal records are subject to retention (``Store.expire``).
        """
        return bool(self._bits & _TERMINAL)

    @property
    def last_hook(self) -> int:
        """The ``Hook`` value of the report this version came from."""
        return (self._bits >> _HOOK_SHIFT) & 15

    @property
    def has_certificates(self) -> bool:
        """True when the FULL view holds certificate_list entries or a mitmcert."""
        return bool(self._bits & _HAS_CERTS)

    @property
    def has_last_change(self) -> bool:
        """True when metadata.last_change is set."""
        return bool(self._bits & _HAS_LAST_CHANGE)

    @property
    def has_pending(self) -> bool:
        """True when metadata.pending_change is set."""
        return bool(self._bits & _HAS_PENDING)

    @property
    def etag(self) -> str:
        """The strong etag of this version: the revision in quotes."""
        return f'"{self.revision}"'

    def message(self) -> pb.ConnectionRecord:
        """The record decoded (a fresh message the caller may change)."""
        return pb.ConnectionRecord.FromString(self.data)

    def basic(self) -> bytes:
        """The BASIC view: ``data`` without certificate_list and mitmcert.

        Records without certificates (the common case) return ``data`` itself.
        The others are re-encoded on each call rather than cached: a cache
        slot costs every stored record 8 bytes, and a watch event caches its
        own encoding per view anyway.
        """
        if not self._bits & _HAS_CERTS:
            return self.data
        msg = pb.ConnectionRecord.FromString(self.data)
        side = msg.server if msg.HasField("server") else msg.client
        side.connection.ClearField("certificate_list")
        if isinstance(side, pb.Client):
            side.ClearField("mitmcert")
        return msg.SerializeToString()

    def meta_end(self) -> int:
        """Offset in ``data`` where the metadata field ends and the client/server field starts."""
        return _field_end(self.data, 0)

    def __repr__(self) -> str:
        return f"<Record {self.kind.name} {self.id} rev={self.revision} state={self.state}>"


class Event:
    """One change at one revision: ``record`` is the new version (for DELETED
    the last version), ``prev`` the version before (None for ADDED; for
    DELETED the same as ``record``)."""

    __slots__ = ("_encoded", "prev", "record", "revision", "type")

    def __init__(self, revision: int, type: EventType, record: Record, prev: Record | None) -> None:
        self.revision = revision
        self.type = type
        self.record = record
        self.prev = prev
        self._encoded: dict[int, bytes] | None = None

    def encoded(self, basic: bool = False, as_type: EventType | None = None) -> bytes:
        """The serialized WatchEvent, encoded once per (view, type) and then shared.

        ``as_type`` overrides the type for filtered watchers (a record entering
        the filter is ADDED, one leaving it DELETED).
        """
        type = self.type if as_type is None else as_type
        key = type << 1 | basic
        cache = self._encoded
        if cache is None:
            cache = self._encoded = {}
        else:
            hit = cache.get(key)
            if hit is not None:
                return hit
        payload = self.record.basic() if basic else self.record.data
        out = cache[key] = encode_watch_event(type, self.revision, payload)
        return out

    def __repr__(self) -> str:
        return f"<Event {self.type.name} rev={self.revision} {self.record.id}>"
