"""The authoritative connection store: revisions, etags, history, retention, the guard.

One global revision counts every change; each change (a reported snapshot,
an update, a resync closing a connection, a retention deletion) gets the
next revision and one Event in a bounded history. Lists can be pinned to a
past revision and watches resumed after one, as long as it is still in the
history (``oldest_revision``); older revisions raise Compacted.

Single-threaded and synchronous: call it from one thread (the event loop's).
Listeners are called synchronously after each change with the new events.
"""

from __future__ import annotations

import bisect
import builtins
import heapq
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final, Protocol, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from connmeta import addresses, certs
from connmeta.filters import Filter
from connmeta.records import (
    Compacted,
    ConnectionOpen,
    EtagMismatch,
    Event,
    EventType,
    InvalidArgument,
    Kind,
    NotFound,
    Record,
    StoreError,
    encode_field,
    encode_record,
    encode_repeated,
    encode_varint,
    pack_bits,
)
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs

__all__ = [
    "Compacted",
    "ConnectionOpen",
    "EncodedSnapshot",
    "EtagMismatch",
    "Event",
    "EventType",
    "Filter",
    "InvalidArgument",
    "Kind",
    "NotFound",
    "Record",
    "Store",
    "StoreError",
    "encode_field",
    "encode_repeated",
]

Listener = Callable[[Sequence[Event]], None]

_OPEN: Final = pb.CONNECTION_STATE_OPEN
_CLOSED: Final = pb.CONNECTION_STATE_CLOSED
_TERMINAL_HOOKS: Final = frozenset(
    (pb.HOOK_CLIENT_DISCONNECTED, pb.HOOK_SERVER_DISCONNECTED, pb.HOOK_SERVER_CONNECT_ERROR)
)
_HOOKS: Final = frozenset(pb.Hook.values())
_STATES: Final = frozenset(pb.ConnectionState.values())
_UPDATABLE: Final = frozenset(("address", "via"))
_VIA_SCHEMES: Final = frozenset((pb.SCHEME_HTTP, pb.SCHEME_HTTPS))
_OVERLAY_CACHE: Final = 4
_INTERN_MAX: Final = 1 << 16
# pack_bits for every combination, indexed without a call (a call costs more
# than the lookup on the ingest path): kind, state, hook (< 16), terminal,
# has_certs, has_last_change.
_BITS: Final = tuple(
    pack_bits(i & 3, i >> 2 & 3, bool(i >> 8 & 1), bool(i >> 9 & 1), bool(i >> 10 & 1), i >> 4 & 15)
    for i in range(1 << 11)
)
assert max(_HOOKS) < 16, "_BITS holds hooks in 4 bits"
_HOOK_FIELDS: Final = {hook: b"\x28" + bytes((hook,)) if hook else b"" for hook in _HOOKS}
_MISSING: Final = object()
_T = TypeVar("_T")


class EncodedSnapshot(Protocol):
    """A snapshot's client and server as encoded bytes (b"" when not set)."""

    @property
    def client(self) -> bytes: ...

    @property
    def server(self) -> bytes: ...


class Store:
    """All connection records, their revisions and the recent history of changes."""

    def __init__(
        self,
        *,
        history_size: int = 100_000,
        closed_retention_seconds: float = 300.0,
        closed_retention_count: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if history_size < 1:
            raise ValueError(f"history_size must be at least 1, got {history_size}")
        # Revision 1 is the empty store, so that every listing names a revision a
        # watch can resume after: 0 means "from now" to WatchConnections.
        self._revision = 1
        self._records: dict[str, Record] = {}
        self._history: deque[Event] = deque(maxlen=history_size)
        self._retention_seconds = closed_retention_seconds
        self._retention_count = closed_retention_count
        self._clock = clock
        # id -> when it last changed while terminal; oldest first.
        self._terminal: OrderedDict[str, float] = OrderedDict()
        self._listeners: list[Listener] = []
        self._resync_seen: set[str] | None = None
        # Ids in id order, built lazily: new ids wait in _unsorted, deleted
        # ones stay in _sorted (skipped) until enough pile up in _deleted.
        self._sorted: list[str] = []
        self._unsorted: list[str] = []
        self._deleted: set[str] = set()
        self._overlays: dict[int, tuple[int, dict[str, Record | None]]] = {}
        # Hosts, SNIs and ports repeat across connections; share one object each.
        self._interned: dict[Any, Any] = {}

    # -- reads ----------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The revision of the last change; 1 before the first. Only goes up."""
        return self._revision

    @property
    def oldest_revision(self) -> int:
        """A watch or list page after revision R is possible iff R >= oldest_revision."""
        history = self._history
        return history[0].revision - 1 if history else self._revision

    def __len__(self) -> int:
        return len(self._records)

    def get(self, id: str) -> Record | None:
        """The current version of connection ``id``, or None."""
        return self._records.get(id)

    def snapshot(self) -> tuple[builtins.list[Record], int]:
        """Every current record (no order) and the revision they reflect."""
        return list(self._records.values()), self._revision

    def list(
        self,
        flt: Filter,
        *,
        after_id: str = "",
        limit: int,
        at_revision: int | None = None,
    ) -> tuple[builtins.list[Record], int, bool]:
        """One page: up to ``limit`` matching records with id > ``after_id``, in id order.

        ``at_revision`` (from the first page) pins the snapshot: records are
        shown as they were then, rebuilt from the history. Returns (records,
        snapshot revision, whether more may follow). Compacted when the
        revision has left the history; InvalidArgument when it is ahead of
        the store.
        """
        if limit < 1:
            raise InvalidArgument([("page_size", f"must be positive, got {limit}")])
        revision = self._revision
        overlay: dict[str, Record | None] | None = None
        if at_revision is not None and at_revision != revision:
            if at_revision > revision:
                raise InvalidArgument(
                    [("page_token", f"revision {at_revision} is ahead of the store ({revision})")]
                )
            if at_revision < self.oldest_revision:
                raise Compacted(at_revision, self.oldest_revision)
            overlay = self._overlay(at_revision)
            revision = at_revision
        out: builtins.list[Record] = []
        match_all = flt.is_empty
        for record in self._walk(after_id, overlay):
            if match_all or flt.matches(record):
                if len(out) == limit:
                    return out, revision, True
                out.append(record)
        return out, revision, False

    def events_after(self, revision: int) -> Sequence[Event]:
        """The events with revision > ``revision``, in order; Compacted if too old."""
        if revision < self.oldest_revision:
            raise Compacted(revision, self.oldest_revision)
        count = self._revision - revision
        if count <= 0:
            return []
        # One event per revision: the last ``count`` events are exactly those.
        out = list(itertools.islice(reversed(self._history), count))
        out.reverse()
        return out

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with the new events after every change; returns unsubscribe.

        Listeners run synchronously inside the write and must neither raise
        nor block: queue and return.
        """
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    # -- writes ---------------------------------------------------------------

    def apply(
        self,
        snapshots: Sequence[rs.ConnectionSnapshot],
        encoded: Sequence[EncodedSnapshot] | None = None,
    ) -> int:
        """Store each snapshot at its own revision; returns the revision reached.

        A new id is ADDED, a known one MODIFIED. A snapshot whose connection,
        client_id and hook equal the stored version's is skipped (no revision,
        no event); so is one identical except for being a resync report, so a
        reconnecting proxy's resync does not flood watchers. Certificates are
        described from their DER. A malformed snapshot raises InvalidArgument
        naming ``snapshots[i]``; the ones before it stay applied.

        ``encoded``, when given, holds the same snapshots with their client or
        server as the bytes they arrived in (``connmeta._rawview``); the store
        then keeps those bytes instead of serializing the parsed message again.
        """
        if encoded is not None and len(encoded) != len(snapshots):
            raise ValueError(f"{len(encoded)} encoded snapshots for {len(snapshots)} snapshots")
        events: builtins.list[Event] = []
        now = self._clock()
        update_time = encode_field(7, _timestamp(now).SerializeToString())
        records = self._records
        terminal = self._terminal
        seen = self._resync_seen
        unsorted = self._unsorted
        deleted = self._deleted
        interned = self._interned
        if len(interned) >= _INTERN_MAX:
            interned.clear()
        intern = interned.setdefault
        pairs: Iterable[tuple[rs.ConnectionSnapshot, EncodedSnapshot | None]] = (
            zip(snapshots, encoded, strict=True)
            if encoded is not None
            else zip(snapshots, itertools.repeat(None))
        )
        try:
            for i, (snap, raw) in enumerate(pairs):
                # The raw bytes tell the kind for free; WhichOneof costs a
                # microsecond and is only needed when neither side has a byte.
                body: bytes | None = None
                if raw is not None:
                    body = raw.server
                    which = "server" if body else "client" if (body := raw.client) else None
                else:
                    which = None
                if which is None:
                    body = None
                    which = snap.WhichOneof("connection")
                if which == "server":
                    side: pb.Server | pb.Client = snap.server
                    kind = Kind.SERVER
                    tag = b"\x1a"
                elif which == "client":
                    side = snap.client
                    kind = Kind.CLIENT
                    tag = b"\x12"
                else:
                    raise InvalidArgument(
                        [(f"snapshots[{i}].connection", "one of client or server is required")]
                    )
                conn = side.connection
                id = conn.id
                hook = snap.hook
                state = conn.state
                client_id = snap.client_id
                if (
                    not id
                    or hook not in _HOOKS
                    or state not in _STATES
                    or (kind is Kind.SERVER and not client_id)
                ):
                    raise InvalidArgument(_snapshot_violations(i, which, snap))
                if kind is Kind.SERVER:
                    # A certificate_list entry is tagged 0x42 ("B"); bytes
                    # without one hold no certificate, and searching them in C
                    # is far cheaper than the repeated field's container.
                    has_certs = (body is None or b"B" in body) and bool(conn.certificate_list)
                else:
                    has_certs = bool(conn.certificate_list) or snap.client.HasField("mitmcert")
                if has_certs:
                    side = _described(side, f"snapshots[{i}].{which}")
                    body = None
                if body is None:
                    body = side.SerializeToString()
                prev = records.get(id)
                if seen is not None:
                    seen.add(id)
                if prev is not None:
                    kind_field = tag + encode_varint(len(body)) + body
                    if (
                        (hook == prev.last_hook or hook == pb.HOOK_RESYNC)
                        and prev.client_id == (client_id or prev.id)
                        and len(prev.data) - prev.meta_end() == len(kind_field)
                        and prev.data.endswith(kind_field)
                    ):
                        continue
                    id = prev.id
                    create_revision = prev.create_revision
                    last_change = _last_change_field(prev) if prev.has_last_change else b""
                if kind is Kind.SERVER:
                    owner = records.get(client_id)
                    client_id = owner.id if owner is not None else intern(client_id, client_id)
                    cid = client_id.encode()
                    client_id_field = b"\x22" + encode_varint(len(cid)) + cid
                else:
                    client_id = id
                    client_id_field = b""
                revision = self._revision + 1
                if prev is None:
                    create_revision = revision
                    last_change = b""
                is_terminal = hook in _TERMINAL_HOOKS or state == _CLOSED
                record = Record(
                    id,
                    client_id,
                    None,  # host, port and sni: read from data when a filter asks
                    None,
                    None,
                    _BITS[
                        kind
                        | state << 2
                        | hook << 4
                        | is_terminal << 8
                        | has_certs << 9
                        | bool(last_change) << 10
                    ],
                    encode_record(
                        revision,
                        create_revision,
                        client_id_field,
                        _HOOK_FIELDS[hook],
                        last_change + update_time if last_change else update_time,
                        tag,
                        body,
                    ),
                )
                self._revision = revision
                records[id] = record
                if prev is None:
                    if id in deleted:
                        deleted.discard(id)  # still in _sorted from its previous life
                    else:
                        unsorted.append(id)
                    events.append(Event(revision, EventType.ADDED, record, None))
                else:
                    events.append(Event(revision, EventType.MODIFIED, record, prev))
                if is_terminal:
                    terminal.pop(id, None)
                    terminal[id] = now
                elif prev is not None and prev.terminal:
                    terminal.pop(id, None)
        finally:
            self._commit(events)
        return self._revision

    def begin_resync(self) -> None:
        """Start a resync: remember every id reported from now on."""
        self._resync_seen = set()

    def end_resync(self) -> int:
        """Finish a resync: close what the proxy no longer has; returns how many.

        Every record not CLOSED and not reported since ``begin_resync`` gets a
        new version with state CLOSED and last_hook RESYNC.
        """
        seen = self._resync_seen
        if seen is None:
            raise InvalidArgument([("resync_end", "no resync was started (send resync_start)")])
        self._resync_seen = None
        stale = [r for r in self._records.values() if r.state != _CLOSED and r.id not in seen]
        now = self._clock()
        events: builtins.list[Event] = []
        try:
            for prev in stale:
                msg = prev.message()
                side = msg.server if msg.HasField("server") else msg.client
                side.connection.state = _CLOSED
                msg.metadata.last_hook = pb.HOOK_RESYNC
                record = self._new_version(prev, msg, now, state=_CLOSED, hook=pb.HOOK_RESYNC)
                events.append(Event(record.revision, EventType.MODIFIED, record, prev))
                self._terminal.pop(prev.id, None)
                self._terminal[prev.id] = now
        finally:
            self._commit(events)
        return len(events)

    def update_server(
        self,
        id: str,
        *,
        address: pb.Address | None,
        via: pb.ServerSpec | None,
        mask: frozenset[str],
        etag: str = "",
        actor: str = "",
    ) -> Record:
        """Change a server's address and/or via under mitmproxy's guard.

        Checks in order: the request (InvalidArgument), the id (NotFound, or
        InvalidArgument for a client), ``etag`` if given (EtagMismatch), the
        guard (ConnectionOpen: state is exactly OPEN and a value would change).
        Values equal to the current ones (compared as the tuples mitmproxy
        holds) change nothing and make no revision; otherwise the new version
        records ``metadata.last_change``.
        """
        violations = _update_violations(id, address, via, mask)
        if violations:
            raise InvalidArgument(violations)
        current = self._records.get(id)
        if current is None:
            raise NotFound(id)
        if current.kind is not Kind.SERVER:
            raise InvalidArgument(
                [("id", f"{id!r} is a client connection; only servers can be updated")]
            )
        if etag and etag != current.etag:
            raise EtagMismatch(id, etag, current.etag)
        msg = current.message()
        server = msg.server
        changed: builtins.list[str] = []
        current_values = {
            "address": addresses.address_to_tuple(server.address)
            if server.HasField("address")
            else None,
            "via": _via_tuple(server.via) if server.HasField("via") else None,
        }
        new_values = {
            "address": addresses.address_to_tuple(address) if address is not None else None,
            "via": _via_tuple(via) if via is not None else None,
        }
        for field in ("address", "via"):
            if field not in mask:
                continue
            old, new = current_values[field], new_values[field]
            if guard_refuses(current.state, old, new):
                raise ConnectionOpen(id, field, repr(old))
            if old != new:
                changed.append(field)
        if not changed:
            return current
        if "address" in changed:
            assert address is not None
            server.address.CopyFrom(address)
        if "via" in changed:
            if via is None:
                server.ClearField("via")
            else:
                server.via.CopyFrom(via)
        now = self._clock()
        revision = self._revision + 1
        change = msg.metadata.last_change
        change.Clear()
        change.actor = actor
        change.time.CopyFrom(_timestamp(now))
        change.fields.extend(changed)
        change.revision = revision
        record = self._new_version(current, msg, now)
        self._commit([Event(record.revision, EventType.MODIFIED, record, current)])
        return record

    def expire(self) -> int:
        """Delete terminal records past their retention; returns how many (DELETED events).

        A terminal record is kept ``closed_retention_seconds`` after its last
        change, and at most ``closed_retention_count`` of them, oldest first.
        """
        terminal = self._terminal
        deadline = self._clock() - self._retention_seconds
        events: builtins.list[Event] = []
        try:
            while terminal:
                id, since = next(iter(terminal.items()))
                if since > deadline and len(terminal) <= self._retention_count:
                    break
                terminal.popitem(last=False)
                record = self._records.pop(id)
                self._deleted.add(id)
                self._revision += 1
                events.append(Event(self._revision, EventType.DELETED, record, record))
        finally:
            self._commit(events)
        return len(events)

    # -- internals --------------------------------------------------------------

    def _intern(self, value: _T) -> _T:
        interned = self._interned
        shared = interned.get(value)
        if shared is None:
            if len(interned) >= _INTERN_MAX:
                interned.clear()
            shared = interned[value] = value
        return shared

    def _commit(self, events: builtins.list[Event]) -> None:
        if not events:
            return
        self._history.extend(events)
        for listener in builtins.list(self._listeners):
            listener(events)

    def _new_version(
        self,
        prev: Record,
        msg: pb.ConnectionRecord,
        now: float,
        *,
        state: int | None = None,
        hook: int | None = None,
    ) -> Record:
        """A new version of ``prev`` from its edited message, at the next revision."""
        revision = self._revision + 1
        meta = msg.metadata
        meta.revision = revision
        meta.etag = f'"{revision}"'
        meta.update_time.CopyFrom(_timestamp(now))
        server = msg.server if msg.HasField("server") else None
        if server is not None and server.HasField("address"):
            host, port = server.address.host, server.address.port
        else:
            host, port = prev.host, prev.port
        new_state = prev.state if state is None else state
        new_hook = prev.last_hook if hook is None else hook
        record = Record(
            prev.id,
            prev.client_id,
            self._intern(host),
            self._intern(port),
            prev.sni,
            pack_bits(
                prev.kind,
                new_state,
                prev.terminal or new_state == _CLOSED,
                prev.has_certificates,
                meta.HasField("last_change"),
                new_hook,
            ),
            msg.SerializeToString(),
        )
        self._revision = revision
        self._records[prev.id] = record
        return record

    def _sorted_ids(self) -> builtins.list[str]:
        ids = self._sorted
        if self._unsorted:
            ids.extend(self._unsorted)
            self._unsorted.clear()
            ids.sort()  # timsort: merges the two runs in linear time
        if len(self._deleted) * 8 > len(ids):
            records = self._records
            ids = self._sorted = [i for i in ids if i in records]
            self._deleted.clear()
        return ids

    def _walk(self, after_id: str, overlay: dict[str, Record | None] | None) -> Iterator[Record]:
        """Records in id order after ``after_id``: current ones, or as of an overlay's revision."""
        ids = self._sorted_ids()
        start = bisect.bisect_right(ids, after_id) if after_id else 0
        records = self._records
        candidates: Iterator[str] = itertools.islice(ids, start, None)
        if overlay is not None:
            gone = sorted(i for i, r in overlay.items() if r is not None and i not in records)
            gone_start = bisect.bisect_right(gone, after_id) if after_id else 0
            candidates = heapq.merge(candidates, gone[gone_start:])
        last: str | None = None
        for id in candidates:
            # A deleted id may still be in ``ids`` (it leaves only when enough
            # deletions pile up) as well as in ``gone``: the merge then yields
            # it twice, side by side.
            if id == last:
                continue
            last = id
            record = records.get(id)
            if overlay is not None:
                past = overlay.get(id, _MISSING)
                if past is not _MISSING:
                    record = past  # type: ignore[assignment]
            if record is not None:
                yield record

    def _overlay(self, revision: int) -> dict[str, Record | None]:
        """For every id changed after ``revision``: its version then (None: absent then)."""
        cached = self._overlays.pop(revision, None)
        if cached is not None:
            upto, overlay = cached
        else:
            upto, overlay = revision, {}
        for event in self.events_after(upto):
            overlay.setdefault(event.record.id, event.prev)
        self._overlays[revision] = (self._revision, overlay)
        while len(self._overlays) > _OVERLAY_CACHE:
            del self._overlays[next(iter(self._overlays))]
        return overlay


# -- the guard ----------------------------------------------------------------------


def guard_refuses(state: int, current: object, new: object) -> bool:
    """mitmproxy's ``Server.__setattr__`` for address and via, as a predicate.

    It raises exactly when the state is OPEN (``is ConnectionState.OPEN``: the
    half-closed states and CLOSED allow changes) and the new value differs
    from the current one by ``!=``, so re-assigning the same tuple is fine
    while ``('h', 1)`` and ``('h', 1, 0, 0)`` differ.
    """
    return state == _OPEN and current != new


def _via_tuple(via: pb.ServerSpec) -> tuple[object, ...]:
    scheme = addresses.SCHEME_NAMES.get(via.scheme, via.scheme)
    return (scheme, addresses.address_to_tuple(via.address) if via.HasField("address") else None)


def _host_problem(host: str) -> str | None:
    if not host:
        return "required, a host name or IP address"
    if len(host) > 253:
        return f"{len(host)} characters is longer than a host name can be (253)"
    bad = [c for c in host if c.isspace() or not c.isprintable() or c in "/[]@?#"]
    if bad:
        return f"{host!r} is not a host name or IP address (unbracketed for IPv6)"
    return None


def _check_address(address: pb.Address, path: str, out: builtins.list[tuple[str, str]]) -> None:
    problem = _host_problem(address.host)
    if problem:
        out.append((f"{path}.host", problem))
    if not 1 <= address.port <= 65535:
        out.append((f"{path}.port", f"{address.port} is outside 1-65535"))
    if address.HasField("scope_id") and not address.HasField("flowinfo"):
        out.append((f"{path}.scope_id", "set without flowinfo; set flowinfo too (0 if unknown)"))


def _update_violations(
    id: str, address: pb.Address | None, via: pb.ServerSpec | None, mask: frozenset[str]
) -> builtins.list[tuple[str, str]]:
    out: builtins.list[tuple[str, str]] = []
    if not id:
        out.append(("id", "required"))
    if not mask:
        out.append(("update_mask", "required: name 'address', 'via' or both"))
    for path in sorted(mask - _UPDATABLE):
        out.append(
            ("update_mask.paths", f"{path!r} cannot be updated; only 'address' and 'via' can")
        )
    if "address" in mask:
        if address is None:
            out.append(("address", "required when update_mask names 'address'"))
        else:
            _check_address(address, "address", out)
    if "via" in mask and via is not None:
        if via.scheme not in _VIA_SCHEMES:
            name = addresses.enum_label(pb.Scheme.Name, via.scheme)
            out.append(("via.scheme", f"{name}: an upstream proxy is spoken to over http or https"))
        if not via.HasField("address"):
            out.append(("via.address", "required: where the upstream proxy listens"))
        else:
            _check_address(via.address, "via.address", out)
            if via.address.HasField("flowinfo"):
                out.append(("via.address.flowinfo", "a via address is a (host, port) pair"))
    return out


def _snapshot_violations(
    i: int, which: str, snap: rs.ConnectionSnapshot
) -> builtins.list[tuple[str, str]]:
    out: builtins.list[tuple[str, str]] = []
    side = snap.server if which == "server" else snap.client
    path = f"snapshots[{i}]"
    if not side.connection.id:
        out.append((f"{path}.{which}.connection.id", "required"))
    if snap.hook not in _HOOKS:
        out.append((f"{path}.hook", f"unknown Hook value {snap.hook}"))
    if side.connection.state not in _STATES:
        out.append(
            (f"{path}.{which}.connection.state", f"unknown state {side.connection.state}; use 0-3")
        )
    if which == "server" and not snap.client_id:
        out.append((f"{path}.client_id", "required for a server: the id of the client it serves"))
    return out


def _described(side: pb.Server | pb.Client, path: str) -> pb.Server | pb.Client:
    """A copy of ``side`` whose certificates carry every derived field."""
    copy = type(side).FromString(side.SerializeToString())
    chain = copy.connection.certificate_list
    try:
        ders = [c.der for c in chain]
        del chain[:]
        for der in ders:
            chain.append(certs.described(der))
        if isinstance(copy, pb.Client) and copy.HasField("mitmcert"):
            copy.mitmcert.CopyFrom(certs.described(copy.mitmcert.der))
    except ValueError as e:
        raise InvalidArgument([(f"{path}.connection.certificate_list", str(e))]) from None
    return copy


def _timestamp(when: float) -> Timestamp:
    seconds = int(when)
    return Timestamp(seconds=seconds, nanos=int((when - seconds) * 1e9))


def _last_change_field(record: Record) -> bytes:
    """metadata.last_change of ``record`` as an encoded field (tag included)."""
    meta = record.message().metadata
    return encode_field(6, meta.last_change.SerializeToString())
