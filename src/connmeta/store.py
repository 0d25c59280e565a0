"""The authoritative connection store: revisions, etags, history, retention, proxies.

One global revision counts every change; each change (a reported snapshot,
an update, a resync closing a connection, a retention deletion) gets the
next revision and one Event in a bounded history. Lists can be pinned to a
past revision and watches resumed after one, as long as it is still in the
history (``oldest_revision``); older revisions raise Compacted.

Several proxies may report into one store: each record remembers the proxy
that reported it, a resync closes only its own proxy's records, and an id a
live proxy holds is refused to another. What a valid input is lives in
``connmeta.validation``, mitmproxy's guard in ``connmeta.guard``, and how a
requested change becomes pending and settles in ``connmeta.changes``.

Single-threaded and synchronous: call it from one thread (the event loop's).
Listeners are called synchronously after each change with the new events.
"""

from __future__ import annotations

import builtins
import heapq
import itertools
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final, Protocol, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from connmeta import _ingest, certs, changes, validation
from connmeta.filters import Filter
from connmeta.guard import address_value, guard_refuses, value_text, via_value
from connmeta.index import Index
from connmeta.records import (
    _HAS_LAST_CHANGE,
    _HAS_PENDING,
    _HOOK_SHIFT,
    _LOW14,
    _TERMINAL,
    _VARINT14,
    TERMINAL_HOOKS,
    Compacted,
    ConnectionOpen,
    EtagMismatch,
    Event,
    EventType,
    InvalidArgument,
    Kind,
    NotFound,
    Record,
    Rejection,
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
    "EtagMismatch",
    "Event",
    "EventType",
    "Filter",
    "InvalidArgument",
    "Journal",
    "Kind",
    "NotFound",
    "Record",
    "Rejection",
    "Resync",
    "Store",
    "StoreError",
    "encode_field",
    "encode_repeated",
]

Listener = Callable[[Sequence[Event]], None]

_OPEN: Final = pb.CONNECTION_STATE_OPEN
_CLOSED: Final = pb.CONNECTION_STATE_CLOSED
_TERMINAL_HOOKS: Final = TERMINAL_HOOKS
_CONNECT_HOOKS: Final = frozenset((pb.HOOK_SERVER_CONNECTED, pb.HOOK_SERVER_CONNECT_ERROR))
_HOOKS: Final = frozenset(pb.Hook.values())
_OVERLAY_CACHE: Final = 4
# What an event holds besides its record's bytes: the Event and Record objects
# (about 200 B with their slots), counted towards --history-bytes.
_EVENT_OVERHEAD: Final = 200
_PROXY_GONE: Final = "the proxy that held this server stopped reporting"
_INTERN_MAX: Final = 1 << 16
# pack_bits for every combination, indexed without a call (a call costs more
# than the lookup on the ingest path): kind, state, hook (< 16), terminal,
# has_certs, has_last_change, has_pending.
_BITS: Final = tuple(
    pack_bits(
        i & 3,
        i >> 2 & 3,
        bool(i >> 8 & 1),
        bool(i >> 9 & 1),
        bool(i >> 10 & 1),
        i >> 4 & 15,
        bool(i >> 11 & 1),
    )
    for i in range(1 << 12)
)
assert max(_HOOKS) < 16, "_BITS holds hooks in 4 bits"
_HOOK_FIELDS: Final[dict[int, bytes]] = {
    hook: b"\x28" + bytes((hook,)) if hook else b"" for hook in _HOOKS
}
_MISSING: Final = object()
# Records whose host and SNI one step of an index build reads (~5 µs each,
# bench/scale_bench.py): about 10 ms of the event loop per step.
_INDEX_STEP: Final = 2048
# Compiled, connmeta._ingest applies the plainly valid snapshots of a batch
# from their bytes in a fraction of the parsed path's time; interpreted it
# costs more than upb attribute reads (bench/README.md), so the pure-Python
# store takes the parsed path (with validation._plainly_valid) for all.
_APPLY_PLAIN: Final = _ingest.apply_plain if _ingest.compiled() else None
_T = TypeVar("_T")


class Journal(Protocol):
    """Where a durable store writes each change before anyone sees it (``connmeta.state_file``)."""

    def append(self, events: Sequence[Event], oldest_revision: int) -> None:
        """Make ``events`` (one change) durable; keep history after ``oldest_revision``."""


class Store:
    """All connection records, their revisions and the recent history of changes."""

    def __init__(
        self,
        *,
        history_size: int = 100_000,
        history_bytes: int = 64 << 20,
        closed_retention_seconds: float = 300.0,
        closed_retention_count: int = 10_000,
        closed_retention_bytes: int = 32 << 20,
        clock: Callable[[], float] = time.time,
        incarnation: str = "",
        revision: int = 0,
        journal: Journal | None = None,
    ) -> None:
        if history_size < 1:
            raise ValueError(f"history_size must be at least 1, got {history_size}")
        self.incarnation = incarnation or uuid.uuid4().hex
        """Names this store's history; a new store gets a new one."""
        # A new store starts from the clock (microseconds since the epoch), above
        # every revision an earlier incarnation issued unless that one averaged
        # a million changes a second: a client resuming from an old revision
        # then meets REVISION_COMPACTED and lists again, instead of reading a
        # different history under familiar numbers. Never 0, so every listing
        # names a revision a watch can resume after (0 means "from now").
        self._revision = revision or max(1, int(clock() * 1_000_000))
        self._records: dict[str, Record] = {}
        # Bounded by count and by bytes (trimmed in _commit): TLS records with
        # certificate chains are ten times the size of plain ones.
        self._history: deque[Event] = deque()
        self._history_size = history_size
        self._history_max_bytes = history_bytes
        self._history_bytes = 0
        self._retention_seconds = closed_retention_seconds
        self._retention_count = closed_retention_count
        self._clock = clock
        # id -> when it last changed while terminal; oldest first. Their
        # records' bytes are counted for the retention byte bound.
        self._terminal: OrderedDict[str, float] = OrderedDict()
        self._terminal_bytes = 0
        self._retention_bytes = closed_retention_bytes
        self._listeners: list[Listener] = []
        # proxy -> the seen-sets of its resyncs in progress (one per stream).
        self._resyncs: dict[str, list[set[str]]] = {}
        # proxy -> how many of its report streams are open.
        self._live: dict[str, int] = {}
        # proxy -> since when it has had no stream open (see close_gone_proxies).
        self._gone: dict[str, float] = {}
        # Ids whose record has a pending change: what a proxy is sent on attach.
        self._pending: set[str] = set()
        self._proxy_fields: dict[str, bytes] = {}
        # Ids in order and by what a List filters on, kept from the events in
        # _commit (connmeta.index).
        self._index = Index()
        self._schedule: Callable[[Callable[[], None]], object] | None = None
        self._overlays: dict[int, tuple[int, dict[str, Record | None]]] = {}
        # Hosts, SNIs and ports repeat across connections; share one object each.
        self._interned: dict[Any, Any] = {}
        self._journal = journal
        # Current records by ``kind | state << 2`` (the low bits of
        # Record._bits), kept as records change: a metrics scrape reads it
        # instead of walking every record (135 ms at a million, stalling the
        # event loop and every held connect with it).
        self._census = [0] * 16

    @classmethod
    def restored(
        cls,
        records: Iterable[Record],
        history: Iterable[Event],
        *,
        incarnation: str,
        revision: int,
        journal: Journal | None = None,
        **options: Any,
    ) -> Store:
        """A store holding saved ``records`` and ``history`` (oldest first) at ``revision``.

        Rebuilds what the store derives from its records: the pending set,
        the id index, the retention order of terminal records (by revision,
        each kept from its metadata.update_time), the byte counts, and the
        proxies that have not reconnected yet. The history keeps what the
        bounds allow, newest first.
        """
        store = cls(incarnation=incarnation, revision=revision, journal=journal, **options)
        kept: builtins.list[Event] = []
        size = 0
        for event in reversed(builtins.list(history)):
            cost = len(event.record.data) + _EVENT_OVERHEAD
            if len(kept) == store._history_size or size + cost > store._history_max_bytes:
                break
            kept.append(event)
            size += cost
        kept.reverse()
        store._history.extend(kept)
        store._history_bytes = size
        current = store._records
        terminal: builtins.list[Record] = []
        census = store._census
        for record in records:
            current[record.id] = record
            census[record._bits & 15] += 1
            if record.has_pending:
                store._pending.add(record.id)
            if record.terminal:
                terminal.append(record)
        terminal.sort(key=lambda r: r.revision)
        for record in terminal:
            store._terminal[record.id] = record.message().metadata.update_time.ToNanoseconds() / 1e9
            store._terminal_bytes += len(record.data)
        store._index = Index(current.values())
        store.note_absent_proxies()
        return store

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

    @property
    def history_length(self) -> int:
        """Events the history holds now."""
        return len(self._history)

    def census(self) -> dict[tuple[Kind, int], int]:
        """How many current records there are of each (kind, state); every pair present."""
        census = self._census
        return {(kind, state): census[kind | state << 2] for kind in Kind for state in range(4)}

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
        revision has left the history or is ahead of the store (another
        incarnation's).
        """
        if limit < 1:
            raise InvalidArgument([("page_size", f"must be positive, got {limit}")])
        revision = self._revision
        overlay: dict[str, Record | None] | None = None
        if at_revision is not None and at_revision != revision:
            if at_revision > revision:
                raise Compacted(at_revision, self.oldest_revision, ahead=True)
            if at_revision < self.oldest_revision:
                raise Compacted(at_revision, self.oldest_revision)
            overlay = self._overlay(at_revision)
            revision = at_revision
        out: builtins.list[Record] = []
        for record in self._walk(flt, after_id, overlay):
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

    def build_indexes_in_steps(self, schedule: Callable[[Callable[[], None]], object]) -> None:
        """Build an index a read asks for in steps, each run by ``schedule``
        (the server passes ``loop.call_soon``), instead of at once inside the read.

        At a million records the host and SNI index takes seconds to build:
        in one go it would stall the event loop, and every held connect with
        it. A step indexes ``_INDEX_STEP`` records (~10 ms); reads that need
        the index meanwhile check every record, as they would without it.
        """
        self._schedule = schedule

    def _build_names_step(self) -> None:
        if self._index.build_names(self._records, _INDEX_STEP) and self._schedule is not None:
            self._schedule(self._build_names_step)

    # -- proxies ----------------------------------------------------------------

    def attach_proxy(self, proxy: str) -> None:
        """A report stream of ``proxy`` opened; while one is open the proxy is live."""
        self._live[proxy] = self._live.get(proxy, 0) + 1
        self._gone.pop(proxy, None)

    def detach_proxy(self, proxy: str) -> None:
        """A report stream of ``proxy`` ended; with its last one, it counts as gone."""
        count = self._live.get(proxy, 0) - 1
        if count > 0:
            self._live[proxy] = count
        else:
            self._live.pop(proxy, None)
            self._gone[proxy] = self._clock()

    def is_live(self, proxy: str) -> bool:
        """Whether ``proxy`` has a report stream open."""
        return proxy in self._live

    @property
    def has_pending(self) -> bool:
        """Whether any record has a pending change."""
        return bool(self._pending)

    def pending_records(self, proxy: str) -> builtins.list[Record]:
        """The records ``proxy`` holds that have a pending change, in no order."""
        records = self._records
        return [r for i in self._pending if (r := records[i]).proxy == proxy]

    # -- writes ---------------------------------------------------------------

    def apply(
        self,
        snapshots: Sequence[rs.ConnectionSnapshot],
        encoded: Sequence[bytes] | None = None,
        *,
        proxy: str = "",
        path: str = "snapshots",
    ) -> builtins.list[Rejection]:
        """Store each snapshot of ``proxy`` at its own revision; returns the refused ones.

        A new id is ADDED, a known one MODIFIED. A snapshot whose connection,
        client_id, hook and proxy equal the stored version's is skipped (no
        revision, no event); so is one identical except for being a resync
        report, so a reconnecting proxy's resync does not flood watchers.
        Certificates are described from their DER. A snapshot is refused on
        its own (a Rejection naming ``{path}[i]``) when it breaks the
        contract (``connmeta.validation``), changes the kind of a known id,
        or names a record another live proxy holds; the others are applied.
        A server snapshot settles the record's pending change when it shows
        the outcome of a connect (``connmeta.changes.settled``).

        ``encoded``, when given, holds the same snapshots as the bytes they
        arrived in (``connmeta._rawview``). A plainly valid one is then read
        from its bytes (``connmeta._ingest``) and its client or server stored
        as it arrived, without serializing the parsed message again; the
        others take the parsed snapshot and the full checks.
        """
        if encoded is not None and len(encoded) != len(snapshots):
            raise ValueError(f"{len(encoded)} encoded snapshots for {len(snapshots)} snapshots")
        events: builtins.list[Event] = []
        rejected: builtins.list[Rejection] = []
        now = self._clock()
        update_time = encode_field(7, _timestamp(now).SerializeToString())
        proxy = self._intern(proxy)
        proxy_field = self._proxy_fields.get(proxy)
        if proxy_field is None:
            proxy_field = self._proxy_fields[proxy] = (
                encode_field(9, proxy.encode()) if proxy else b""
            )
        records = self._records
        terminal = self._terminal
        seen_sets = self._resyncs.get(proxy, ())
        live = self._live
        pending_ids = self._pending
        interned = self._interned
        if len(interned) >= _INTERN_MAX:
            interned.clear()
        intern = interned.setdefault
        census = self._census

        def one(i: int) -> None:
            """Apply snapshot ``i`` from its parsed message (and its bytes, if given)."""
            snap = snapshots[i]
            data = encoded[i] if encoded is not None else None
            # What connmeta._ingest leaves (certificates, a via, a route
            # outcome, a change to carry over, a field sent twice...), and
            # everything when it is not compiled: the parsed snapshot.
            which = snap.WhichOneof("connection")
            side: pb.Server | pb.Client
            if which == "server":
                side = snap.server
                kind = Kind.SERVER
                tag = b"\x1a"
            elif which == "client":
                side = snap.client
                kind = Kind.CLIENT
                tag = b"\x12"
            else:
                violations = validation.snapshot_violations(snap, f"{path}[{i}]")
                rejected.append(
                    Rejection(i, "", "INVALID_SNAPSHOT", f"snapshot {i} is empty", violations)
                )
                return
            body = _ingest.payload(data) if data is not None else None
            conn = side.connection
            id = conn.id
            hook = snap.hook
            client_id = snap.client_id
            prev = records.get(id)
            # An unchanged re-report (a resync, a repeated hook) matches the
            # stored bytes, which were valid when stored: skipped before the
            # checks, which cost more than the comparison (bench/README.md).
            compared = False
            if body and prev is not None and prev.kind is kind:
                compared = True
                if _unchanged(
                    prev,
                    hook,
                    client_id,
                    _settles(snap),
                    proxy,
                    tag + encode_varint(len(body)) + body,
                ):
                    for seen in seen_sets:
                        seen.add(id)
                    return
            violations = validation.snapshot_violations(snap, f"{path}[{i}]", body)
            if violations:
                conn_id = _snapshot_id(snap)
                rejected.append(
                    Rejection(
                        i,
                        conn_id,
                        "INVALID_SNAPSHOT",
                        f"snapshot {i} ({validation.shown(conn_id)}) breaks the contract",
                        violations,
                    )
                )
                return
            state = conn.state
            if prev is not None:
                refusal = _conflict(i, prev, kind, proxy, live)
                if refusal is not None:
                    rejected.append(refusal)
                    return
            for seen in seen_sets:
                seen.add(id)
            if kind is Kind.SERVER:
                # A certificate_list entry is tagged 0x42 ("B"); bytes
                # without one hold no certificate, and searching them in C
                # is far cheaper than the repeated field's container.
                has_certs = (body is None or b"B" in body) and bool(conn.certificate_list)
            else:
                has_certs = bool(conn.certificate_list) or snap.client.HasField("mitmcert")
            if has_certs:
                side = _described(side)
                body = None
            if body is None:
                body = side.SerializeToString()
            assert body is not None
            if (
                prev is not None
                and (has_certs or not compared)
                and _unchanged(  # compared as stored: with its certificates described
                    prev,
                    hook,
                    client_id,
                    _settles(snap),
                    proxy,
                    tag + encode_varint(len(body)) + body,
                )
            ):
                return
            last_change = pending = b""
            if prev is not None:
                if prev.has_pending or prev.has_last_change:
                    last_change, pending = self._changes_after(prev, snap)
                id = prev.id
                create_revision = prev.create_revision
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
            is_terminal = hook in _TERMINAL_HOOKS or state == _CLOSED
            low = kind | state << 2  # the record's census slot, and its bits' low four
            record = Record(
                id,
                client_id,
                None,  # host, port and sni: read from data when a filter asks
                None,
                None,
                _BITS[
                    low
                    | hook << 4
                    | is_terminal << 8
                    | has_certs << 9
                    | bool(last_change) << 10
                    | bool(pending) << 11
                ],
                encode_record(
                    revision,
                    create_revision,
                    client_id_field,
                    _HOOK_FIELDS[hook],
                    b"".join((last_change, update_time, pending, proxy_field)),
                    tag,
                    body,
                ),
                proxy,
            )
            self._revision = revision
            records[id] = record
            census[low] += 1
            if prev is not None:
                census[prev._bits & 15] -= 1
            if pending:
                pending_ids.add(id)
            elif prev is not None and prev.has_pending:
                pending_ids.discard(id)
            if prev is None:
                events.append(Event(revision, EventType.ADDED, record, None))
            else:
                events.append(Event(revision, EventType.MODIFIED, record, prev))
            if is_terminal:
                terminal.pop(id, None)
                terminal[id] = now
                self._terminal_bytes += len(record.data)
                if prev is not None and prev.terminal:
                    self._terminal_bytes -= len(prev.data)
            elif prev is not None and prev.terminal:
                terminal.pop(id, None)
                self._terminal_bytes -= len(prev.data)

        try:
            if encoded is not None and _APPLY_PLAIN is not None:
                _APPLY_PLAIN(
                    self,
                    encoded,
                    proxy,
                    update_time + proxy_field,
                    now,
                    seen_sets,
                    events,
                    rejected,
                    one,
                    _PLAIN_ENV,
                )
            else:
                for i in range(len(snapshots)):
                    one(i)
        finally:
            self._commit(events)
        return rejected

    def _changes_after(self, prev: Record, snap: rs.ConnectionSnapshot) -> tuple[bytes, bytes]:
        """metadata.last_change and .pending_change (encoded fields) after ``snap``.

        Settles the pending change when the snapshot shows a connect's outcome.
        """
        meta = prev.message().metadata
        pending = meta.pending_change if meta.HasField("pending_change") else None
        last = meta.last_change if meta.HasField("last_change") else None
        if pending is not None and snap.HasField("server"):
            outcome = snap.route_outcome if snap.HasField("route_outcome") else None
            settled = changes.settled(pending, snap.server, snap.hook, outcome)
            if settled is not None:
                last, pending = settled, None
        return (
            encode_field(6, last.SerializeToString()) if last is not None else b"",
            encode_field(8, pending.SerializeToString()) if pending is not None else b"",
        )

    def begin_resync(self, proxy: str = "") -> Resync:
        """Start a resync of ``proxy``: remember every id it reports from now on."""
        resync = Resync(self._intern(proxy))
        self._resyncs.setdefault(resync.proxy, []).append(resync.seen)
        return resync

    def abandon_resync(self, resync: Resync) -> None:
        """Forget a resync that will not end (its stream broke); idempotent."""
        sets = self._resyncs.get(resync.proxy)
        if sets is not None:
            for n, seen in enumerate(sets):
                if seen is resync.seen:
                    del sets[n]
                    break
            if not sets:
                del self._resyncs[resync.proxy]

    def end_resync(self, resync: Resync) -> int:
        """Finish a resync: close what its proxy no longer has; returns how many.

        Every record of this proxy, not CLOSED and not reported by it since
        ``begin_resync``, gets a new version with state CLOSED and last_hook
        RESYNC; a pending change of a record it did not report becomes
        NOT_APPLIED. Records of other proxies are never touched.
        """
        self.abandon_resync(resync)
        proxy, seen = resync.proxy, resync.seen
        stale = [
            r
            for r in self._records.values()
            if r.proxy == proxy and (r.state != _CLOSED or r.has_pending) and r.id not in seen
        ]
        return self._close(stale, pb.HOOK_RESYNC, changes.NOT_HELD)

    def close_gone_proxies(self, after: float) -> int:
        """Close what proxies without a report stream for ``after`` seconds still hold.

        A proxy that crashed or was removed without a resync would leave its
        connections OPEN for ever. Once it has had no stream open for
        ``after`` seconds, each of its records that is not CLOSED gets a new
        version, CLOSED with last_hook PROXY_GONE, and a pending change
        becomes NOT_APPLIED. Returns how many were closed.
        """
        deadline = self._clock() - after
        gone = [proxy for proxy, since in self._gone.items() if since <= deadline]
        closed = 0
        for proxy in gone:
            del self._gone[proxy]
            stale = [
                r
                for r in self._records.values()
                if r.proxy == proxy and (r.state != _CLOSED or r.has_pending)
            ]
            closed += self._close(stale, pb.HOOK_PROXY_GONE, _PROXY_GONE)
        return closed

    def note_absent_proxies(self) -> None:
        """Count every proxy that holds an open record but has no stream as gone
        from now on: after a restart from saved state none has reconnected yet."""
        now = self._clock()
        for record in self._records.values():
            proxy = record.proxy
            if record.state != _CLOSED and proxy not in self._live:
                self._gone.setdefault(proxy, now)

    def _close(self, stale: builtins.list[Record], hook: int, not_applied: str) -> int:
        """New versions of ``stale``: CLOSED with last_hook ``hook``, a pending
        change NOT_APPLIED for ``not_applied``; returns how many were not CLOSED."""
        now = self._clock()
        events: builtins.list[Event] = []
        closed = 0
        try:
            for prev in stale:
                msg = prev.message()
                meta = msg.metadata
                if meta.HasField("pending_change"):
                    meta.last_change.CopyFrom(changes.not_applied(meta.pending_change, not_applied))
                    meta.ClearField("pending_change")
                state, last_hook = prev.state, prev.last_hook
                if state != _CLOSED:
                    side = msg.server if msg.HasField("server") else msg.client
                    side.connection.state = state = _CLOSED
                    meta.last_hook = hook  # type: ignore[assignment]  # a Hook value
                    last_hook = hook
                    closed += 1
                record = self._new_version(prev, msg, now, state=state, hook=last_hook)
                events.append(Event(record.revision, EventType.MODIFIED, record, prev))
                self._retain(prev, record, now)
        finally:
            self._commit(events)
        return closed

    def update_server(
        self,
        id: str,
        *,
        address: pb.Address | None,
        via: pb.ServerSpec | None,
        mask: Iterable[str],
        etag: str = "",
        actor: str = "",
        query_id: str = "",
        principal: str = "",
    ) -> Record:
        """Ask for a change of a server's address and/or via, under mitmproxy's guard.

        Checks in order: the request (InvalidArgument), the id (NotFound, or
        InvalidArgument for a client), ``etag`` if given (EtagMismatch), the
        guard (ConnectionOpen: state is exactly OPEN and a value would change
        from what the proxy holds). An accepted change becomes the record's
        ``metadata.pending_change`` (``connmeta.changes.requested``); the
        server's fields keep what the proxy reported until it settles the
        change. A request that leaves the pending change as it was makes no
        revision.
        """
        paths = builtins.list(mask)
        violations = validation.update_violations(id, address, via, paths, actor)
        if violations:
            raise InvalidArgument(violations)
        current = self._records.get(id)
        if current is None:
            raise NotFound(id)
        if current.kind is not Kind.SERVER:
            raise InvalidArgument(
                [
                    (
                        "id",
                        f"{validation.shown(id)} is a client connection; "
                        "only servers can be updated",
                    )
                ]
            )
        if etag and etag != current.etag:
            raise EtagMismatch(id, etag, current.etag)
        msg = current.message()
        server = msg.server
        for field in ("address", "via"):
            if field in paths:
                new = address_value(address) if field == "address" else via_value(via)
                old = changes.observed_value(server, field)
                if guard_refuses(current.state, old, new):
                    raise ConnectionOpen(id, field, value_text(old))
        meta = msg.metadata
        now = self._clock()
        pending, changed = changes.requested(
            server,
            meta.pending_change if meta.HasField("pending_change") else None,
            paths,
            address,
            via,
            actor=actor,
            time=_timestamp(now),
            revision=self._revision + 1,
            query_id=query_id,
            principal=principal,
        )
        if not changed:
            return current
        if pending is None:
            meta.ClearField("pending_change")
        else:
            meta.pending_change.CopyFrom(pending)
        record = self._new_version(current, msg, now)
        self._retain(current, record, now)
        self._commit([Event(record.revision, EventType.MODIFIED, record, current)])
        return record

    def expire(self) -> int:
        """Delete terminal records past their retention; returns how many (DELETED events).

        A terminal record is kept ``closed_retention_seconds`` after its last
        change, and at most ``closed_retention_count`` of them holding at most
        ``closed_retention_bytes``, oldest first.
        """
        terminal = self._terminal
        deadline = self._clock() - self._retention_seconds
        events: builtins.list[Event] = []
        try:
            while terminal:
                id, since = next(iter(terminal.items()))
                if (
                    since > deadline
                    and len(terminal) <= self._retention_count
                    and self._terminal_bytes <= self._retention_bytes
                ):
                    break
                terminal.popitem(last=False)
                record = self._records.pop(id)
                self._census[record._bits & 15] -= 1
                self._terminal_bytes -= len(record.data)
                self._pending.discard(id)
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

    def _retain(self, prev: Record, record: Record, now: float) -> None:
        """Retention bookkeeping for a new version of a record: a terminal one
        is kept (and counted) from its last change."""
        terminal = self._terminal
        if terminal.pop(prev.id, None) is not None:
            self._terminal_bytes -= len(prev.data)
        if record.terminal:
            terminal[record.id] = now
            self._terminal_bytes += len(record.data)

    def _commit(self, events: builtins.list[Event]) -> None:
        if not events:
            return
        history = self._history
        history.extend(events)
        size = self._history_bytes + sum(len(e.record.data) for e in events)
        size += _EVENT_OVERHEAD * len(events)
        while len(history) > self._history_size or size > self._history_max_bytes:
            size -= len(history.popleft().record.data) + _EVENT_OVERHEAD
            if not history:
                break
        self._history_bytes = size
        self._index.update(events)
        if self._journal is not None:
            # Durable before any watcher sees it or the report is acked; the
            # saved history is trimmed to what the bounds above left.
            self._journal.append(events, self.oldest_revision)
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
        has_pending = meta.HasField("pending_change")
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
                has_pending,
            ),
            msg.SerializeToString(),
            prev.proxy,
        )
        self._revision = revision
        self._records[prev.id] = record
        census = self._census
        census[prev._bits & 15] -= 1
        census[record._bits & 15] += 1
        if has_pending:
            self._pending.add(prev.id)
        else:
            self._pending.discard(prev.id)
        return record

    def _walk(
        self, flt: Filter, after_id: str, overlay: dict[str, Record | None] | None
    ) -> Iterator[Record]:
        """The records ``flt`` matches in id order after ``after_id``: current ones,
        or as of an overlay's revision.

        Candidates come from the smallest index covering a condition of
        ``flt`` (``Index.candidates``, a superset); ``Filter.matches`` decides.
        """
        index = self._index
        records = self._records
        if not index.names_active and index.needs_names(flt):
            # The first List filtering on host or SNI: from now on they are
            # indexed (and read from each new version's bytes, unless ingest
            # supplied them). Until the index is complete, such a List checks
            # every record, as it did before there was one.
            if self._schedule is None:
                index.activate_names(records.values())
            elif not index.names_building:
                index.begin_names(builtins.list(records))
                self._schedule(self._build_names_step)
        candidates = index.candidates(flt, after_id)
        match_all = flt.is_empty
        if overlay is None:
            for id in candidates:
                record = records[id]
                if match_all or flt.matches(record):
                    yield record
            return
        # As of the overlay's revision: an id changed since then is shown as it
        # was (None: absent then), and a version then that matches may belong
        # to an id the index no longer lists under this filter, or at all.
        then = sorted(
            i
            for i, r in overlay.items()
            if r is not None and i > after_id and (match_all or flt.matches(r))
        )
        last: str | None = None
        for id in heapq.merge(candidates, then):
            if id == last:  # in both: side by side in the merge
                continue
            last = id
            past = overlay.get(id, _MISSING)
            record = records.get(id) if past is _MISSING else past  # type: ignore[assignment]
            if record is not None and (match_all or flt.matches(record)):
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


# -- helpers ------------------------------------------------------------------------


class Resync:
    """One proxy's resync in progress: the ids it reported since it began."""

    __slots__ = ("proxy", "seen")

    def __init__(self, proxy: str) -> None:
        self.proxy = proxy
        self.seen: set[str] = set()


def _unchanged(
    prev: Record, hook: int, client_id: str, settles: bool, proxy: str, kind_field: bytes
) -> bool:
    """Whether a snapshot would store ``prev`` again: same connection bytes, client,
    proxy and hook (or a resync's), and nothing pending for it to settle
    (``settles``: it may, see ``_settles``)."""
    return (
        (hook == prev.last_hook or hook == pb.HOOK_RESYNC)
        and prev.proxy == proxy
        and prev.client_id == (client_id or prev.id)
        and not (prev.has_pending and settles)
        and len(prev.data) - prev.meta_end() == len(kind_field)
        and prev.data.endswith(kind_field)
    )


def _settles(snap: rs.ConnectionSnapshot) -> bool:
    """Whether ``snap`` may settle a pending change (see ``changes.settled``)."""
    return snap.hook in _CONNECT_HOOKS or snap.HasField("route_outcome")


def _snapshot_id(snap: rs.ConnectionSnapshot) -> str:
    which = snap.WhichOneof("connection")
    if which is None:
        return ""
    side = snap.client if which == "client" else snap.server
    return side.connection.id[: validation.MAX_ID_BYTES]


def _conflict(
    i: int, prev: Record, kind: Kind, proxy: str, live: dict[str, int]
) -> Rejection | None:
    """Why a snapshot of ``proxy`` may not replace ``prev``, or None."""
    if prev.kind is not kind:
        return Rejection(
            i,
            prev.id,
            "CONNECTION_KIND_CONFLICT",
            f"connection {validation.shown(prev.id)} is a {prev.kind.name.lower()} "
            f"connection; an id keeps its kind",
        )
    if prev.proxy != proxy and prev.proxy in live:
        return Rejection(
            i,
            prev.id,
            "CONNECTION_OWNED_BY_OTHER_PROXY",
            f"connection {validation.shown(prev.id)} is held by proxy "
            f"{validation.shown(prev.proxy)}, which is still reporting; ids must be unique "
            "across proxies",
        )
    return None


def _described(side: pb.Server | pb.Client) -> pb.Server | pb.Client:
    """A copy of ``side`` whose certificates carry every derived field.

    Validation parsed each DER already (and ``certs.described`` cached it).
    """
    copy = type(side).FromString(side.SerializeToString())
    chain = copy.connection.certificate_list
    ders = [c.der for c in chain]
    del chain[:]
    for der in ders:
        chain.append(certs.described(der))
    if isinstance(copy, pb.Client) and copy.HasField("mitmcert"):
        copy.mitmcert.CopyFrom(certs.described(copy.mitmcert.der))
    return copy


def _timestamp(when: float) -> Timestamp:
    seconds = int(when)
    return Timestamp(seconds=seconds, nanos=int((when - seconds) * 1e9))


# What connmeta._ingest.apply_plain needs of this module (it imports nothing
# of connmeta, so that it compiles on its own).
_PLAIN_ENV: Final = (
    Record,
    Event,
    EventType.ADDED,
    EventType.MODIFIED,
    (None, Kind.CLIENT, Kind.SERVER),
    _BITS,
    sum(1 << hook for hook in _TERMINAL_HOOKS),
    _conflict,
    validation.plain_mode,
    (_VARINT14, _LOW14),
    (_HAS_PENDING, _HAS_LAST_CHANGE, _TERMINAL, _HOOK_SHIFT),
)
