"""The watch hub: every store change fanned out to every watcher, none waiting on another.

The store calls the hub synchronously after each change; the hub appends the
same list of events to each unfiltered watcher's pending queue (O(watchers)
appends, no encoding) and wakes it. Filtered watchers are grouped by equal
Filter: the hub evaluates each distinct filter once per event, consulting
only the filters a ``FilterIndex`` names as candidates for the event's
record (and its previous version), and appends to each group's watchers
the events their filter lets through, already typed (ADDED when a record
enters the filter, DELETED when it leaves). A change that no filter could
match costs a few dict lookups, whatever the number of filtered watchers;
a group it does not touch costs nothing. Each watcher encodes on its own
coroutine, in ``Watcher.next``, taking each event's encoding from the event
(encoded once per view and type, shared by all watchers). A watcher's lag
is what waits behind the change it is working through: one change of any
size (a retention sweep, a resync end, a big batch) is never lag by itself,
so it evicts nobody who keeps up. A watcher whose lag passes ``max_lag``
events is evicted: its queue is dropped and its next ``next()`` raises
Evicted with the last revision it delivered, from which a new watch resumes
without loss, as long as the history still holds it. A watcher holds at most
one change plus ``max_lag`` events, all shared with the store's history.

A watcher whose reader stopped reading is ended too, on every transport:
``send`` writes each response under a watchdog that interrupts the write
when it has been blocked for ``write_timeout`` seconds, or at once when the
watcher is evicted meanwhile. Without it, a write blocked on a client that
no longer reads (HTTP/2 flow control, or a full Unix socket, where nothing
like TCP_USER_TIMEOUT ends the connection) would keep the call, and the
eviction waiting behind it, for ever.

Lessons applied (Kubernetes cacher, etcd): register for live events before
replaying history, deduplicate by revision, never block the writer, bound
every buffer, make eviction resumable.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Final

from connmeta.filters import Filter, FilterIndex
from connmeta.records import (
    Compacted,
    Event,
    EventType,
    InvalidArgument,
    Record,
    encode_repeated,
    encode_watch_event,
)
from connmeta.store import Store

__all__ = ["Evicted", "WatchHub", "Watcher"]

MAX_BATCH_EVENTS: Final = 1024
"""At most this many events per batch (one stream message)."""
MAX_BATCH_BYTES: Final = 1 << 20
"""A batch stops growing past this many bytes (clients default to 4 MiB messages)."""

_ADDED: Final = EventType.ADDED
_DELETED: Final = EventType.DELETED


class Evicted(Exception):
    """The watcher fell more than ``max_lag`` events behind and was ended.

    (Events behind the change it is working through; see the module doc.)

    ``last_revision`` is the last revision it delivered: watch again with
    ``start_after_revision=last_revision`` to lose nothing. It is 0 when the
    watcher was evicted before its initial snapshot was complete; then
    watch again with ``send_initial_events``.
    """

    def __init__(self, last_revision: int) -> None:
        super().__init__(f"watcher too slow, evicted after revision {last_revision}")
        self.last_revision = last_revision


class _Seen:
    """An event as a filtered watcher sees it under another type (a record
    entering its filter is ADDED, one leaving it DELETED)."""

    __slots__ = ("event", "revision", "type")

    def __init__(self, event: Event, type: EventType) -> None:
        self.event = event
        self.revision = event.revision
        self.type = type

    def encoded(self, basic: bool) -> bytes:
        return self.event.encoded(basic, self.type)


class _Batch(list[Event | _Seen]):
    """The events of one store change that a group of watchers sees, as the
    hub hands them out: all of them to unfiltered watchers, to a filter's
    group those the filter lets through (see ``_route``).

    Watchers that are keeping up take a whole batch at once; its encodings
    (and the whole response, with the servicer's tail) are computed by the
    first of them and shared, so the per-watcher cost of a batch is a few
    operations instead of a few per event.
    """

    __slots__ = ("_bodies", "_views")

    def __init__(self, events: Sequence[Event | _Seen]) -> None:
        super().__init__(events)
        self._bodies: dict[bool, tuple[list[bytes], bytes]] = {}
        self._views: dict[tuple[bool, bytes], bytes] = {}

    def body(self, basic: bool) -> tuple[list[bytes], bytes]:
        """Every event encoded, and all of them as WatchConnectionsResponse.events:
        bodies of consecutive batches concatenated are one response's events."""
        cached = self._bodies.get(basic)
        if cached is None:
            chunks = [event.encoded(basic) for event in self]
            cached = self._bodies[basic] = (chunks, encode_repeated(1, chunks))
        return cached

    def view(self, basic: bool, tail: bytes = b"") -> bytes:
        """The whole batch as a WatchConnectionsResponse followed by ``tail``."""
        key = (basic, tail)
        cached = self._views.get(key)
        if cached is None:
            cached = self._views[key] = self.body(basic)[1] + tail
        return cached


class Watcher:
    """One watch: a bounded queue of events and the coroutine side that drains it."""

    def __init__(
        self,
        hub: WatchHub,
        *,
        position: int,
        initial: list[Record] | None,
        allow_bookmarks: bool,
        flt: Filter,
        basic: bool,
    ) -> None:
        self._hub = hub
        self._position = position  # every event <= this was delivered or filtered out
        self._initial: Iterator[Record] | None = iter(initial) if initial is not None else None
        self._initial_revision = position
        self._allow_bookmarks = allow_bookmarks
        self._filter = None if flt.is_empty else flt
        self._basic = basic
        # History replays (raw events, filtered here) and hub batches (_Batch:
        # already what this watcher sees).
        self._pending: deque[Sequence[Event | _Seen]] = deque()
        self._offset = 0  # events of _pending[0] already taken
        # Events of _pending[1:]: the lag. The head (a live change or the
        # history replay) is what the watcher is working through, not lag.
        self._behind = 0
        self._evicted = False
        self._ending = False  # graceful shutdown: drain, final bookmark, end
        self._ending_revision = 0  # the hub's revision when the ending began
        self._ended = False
        self._wake: asyncio.Event | None = None
        self._last_sent = time.monotonic()
        self._response: bytes | None = None  # the last take, already a response
        self._tail = b""  # what next_response appends to a response
        # The write watchdog (see ``send``): one timer per watcher at most,
        # armed while writes happen; a write itself only stores its start.
        self._write_started: float | None = None
        self._writer: asyncio.Task[object] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._interrupted = False
        self._cancelling = 0
        self._closed = False
        self._taken = 0  # change events in the last take (bookmarks are not counted)

    @property
    def last_revision(self) -> int:
        """The revision this watcher has delivered up to (its resume point)."""
        return 0 if self._initial is not None else self._position

    @property
    def pending(self) -> int:
        """Events queued and not yet taken by ``next()``."""
        return sum(map(len, self._pending)) - self._offset

    @property
    def lag(self) -> int:
        """Events queued behind the change being worked through (evicted past ``max_lag``)."""
        return self._behind

    @property
    def closed(self) -> bool:
        """``close()`` ran: whoever served this watch has let go of it."""
        return self._closed

    def close(self) -> None:
        """Stop watching (the client went away); idempotent."""
        self._closed = True
        self._ended = True
        self._pending.clear()
        self._offset = self._behind = 0
        self._hub._remove(self)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._notify()

    async def next(self) -> list[bytes]:
        """The next batch of serialized WatchEvents, waiting until there is one.

        Returns [] only when the watch has ended cleanly (closed, or after
        the final bookmark of a graceful shutdown). Raises Evicted.
        """
        while True:
            if self._evicted:
                raise Evicted(self.last_revision)
            if self._ended:
                return []
            batch = self._take()
            if batch:
                self._last_sent = time.monotonic()
                return batch
            if self._ending:
                self._ended = True
                self._hub._remove(self)
                if self._allow_bookmarks:
                    return [encode_watch_event(EventType.BOOKMARK, self._position)]
                return []
            timeout: float | None = None
            if self._allow_bookmarks and self._initial is None:
                due = self._last_sent + self._hub.bookmark_interval - time.monotonic()
                if due <= 0:
                    self._last_sent = time.monotonic()
                    return [encode_watch_event(EventType.BOOKMARK, self._position)]
                timeout = due
            wake = self._wake
            if wake is None:
                wake = self._wake = asyncio.Event()
            wake.clear()
            if timeout is None:  # no bookmarks: no timer to arm (a few µs per wait)
                await wake.wait()
                continue
            try:
                async with asyncio.timeout(timeout):
                    await wake.wait()
            except TimeoutError:
                pass

    def __aiter__(self) -> Watcher:
        return self

    async def __anext__(self) -> list[bytes]:
        batch = await self.next()
        if not batch:
            raise StopAsyncIteration
        return batch

    async def next_response(self, tail: bytes = b"") -> bytes:
        """Like ``next`` but as a serialized WatchConnectionsResponse followed by
        ``tail`` (the servicer's constant fields); b"" at the end.

        A whole shared batch comes back as the bytes encoded (and ``tail``
        appended) once for every watcher, instead of being framed, and
        copied, again for each.
        """
        self._response = None
        self._tail = tail
        batch = await self.next()
        response = self._response
        if response is not None:
            return response
        return encode_repeated(1, batch) + tail if batch else b""

    async def send(self, write: Callable[[bytes], Awaitable[object]], response: bytes) -> None:
        """``await write(response)``, ended early if the reader does not keep up.

        Raises Evicted (with the revision of what was written so far: the
        call's status goes out after it) when the write stays blocked for the
        hub's ``write_timeout``, or when the watcher is evicted while its
        write is blocked. The write is interrupted by cancelling the calling
        task, so call this from the task that owns the watch.
        """
        writer = self._writer
        if writer is None:
            writer = self._writer = asyncio.current_task()
            assert writer is not None, "send() runs in a task"
        loop = asyncio.get_running_loop()
        self._cancelling = writer.cancelling()  # cancels from others stay theirs
        self._write_started = started = loop.time()
        if self._watchdog is None:
            self._watchdog = loop.call_at(started + self._hub.write_timeout, self._check_write)
        try:
            await write(response)
            self._hub.events_sent += self._taken
        except asyncio.CancelledError:
            if self._interrupted and writer.uncancel() <= self._cancelling:
                raise Evicted(self.last_revision) from None
            raise  # the call was cancelled (client gone, shutdown): not ours
        finally:
            self._write_started = None

    def _check_write(self) -> None:
        """The watchdog: end a write blocked for write_timeout; re-armed while writes go on."""
        self._watchdog = None
        started = self._write_started
        if started is None or self._ended or self._evicted:
            return  # idle: the next write arms it again
        loop = asyncio.get_running_loop()
        due = started + self._hub.write_timeout
        if due - loop.time() > 0.001:  # a later write than the one that armed it
            self._watchdog = loop.call_at(due, self._check_write)
            return
        self._evicted = True
        self._pending.clear()
        self._offset = self._behind = 0
        self._hub._remove(self)
        self._hub.evictions["write_timeout"] += 1
        self._interrupt()

    def _interrupt(self) -> None:
        """Cancel the blocked write (``send`` turns it into Evicted)."""
        writer = self._writer
        if writer is None or self._write_started is None or self._interrupted:
            return
        self._interrupted = True
        writer.cancel()

    # -- hub side ------------------------------------------------------------------

    def _replay(self, events: Sequence[Event]) -> None:
        """Queue history events first; as the head of the queue they are not
        lag, so a watcher resuming far back is not evicted for the replay alone."""
        pending = self._pending
        if pending:  # the hub replays before anything is taken: nothing is half-taken
            self._behind += len(pending[0])
        pending.appendleft(events)
        self._notify()

    def _push(self, events: _Batch) -> bool:
        """Queue ``events``; False when this push evicted the watcher."""
        if self._ending or self._ended:
            return True
        pending = self._pending
        if pending:
            self._behind += len(events)
            if self._behind > self._hub.max_lag:
                self._hub.evictions["slow_consumer"] += 1
                self._evicted = True
                pending.clear()
                self._offset = self._behind = 0
                self._interrupt()  # a write blocked on a frozen reader ends now
                self._notify()
                return False
        pending.append(events)
        self._notify()
        return True

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _caught_up(self, position: int) -> int:
        """The position of a watcher whose queue is empty: every change the hub
        has handed out since was filtered out for it (none was queued), so its
        position (the resume point, the bookmarks') moves past them. (Ending:
        changes after the final bookmark are not this watch's.)"""
        return max(position, self._ending_revision if self._ending else self._hub.revision)

    def _take(self) -> list[bytes]:
        out: list[bytes] = []
        size = 0
        basic = self._basic
        flt = self._filter
        initial = self._initial
        if initial is not None:
            for record in initial:
                if flt is None or flt.matches(record):
                    chunk = encode_watch_event(
                        _ADDED, record.revision, record.basic() if basic else record.data
                    )
                    out.append(chunk)
                    size += len(chunk)
                    if len(out) >= MAX_BATCH_EVENTS or size >= MAX_BATCH_BYTES:
                        self._taken = len(out)
                        return out
            self._initial = None
            self._taken = len(out)
            out.append(encode_watch_event(EventType.INITIAL_EVENTS_END, self._initial_revision))
            return out
        pending = self._pending
        position = self._position
        offset = self._offset
        if not offset and pending:
            # Whole shared batches, as many as fit in one response: each is
            # encoded once for all watchers; one alone goes out as its
            # shared response bytes, several (a watcher that fell behind) as
            # one response joining their bodies: fewer, larger writes.
            bodies: list[bytes] = []
            taken: _Batch | None = None
            while pending:
                events = pending[0]
                if not isinstance(events, _Batch) or events[0].revision <= position:
                    break
                chunks, body = events.body(basic)
                if len(out) + len(chunks) > MAX_BATCH_EVENTS or size + len(body) > MAX_BATCH_BYTES:
                    break
                pending.popleft()
                if pending:
                    self._behind -= len(pending[0])
                out.extend(chunks)
                size += len(body)
                bodies.append(body)
                taken = events
                position = events[-1].revision
            if taken is not None:
                if len(bodies) == 1:
                    self._response = taken.view(basic, self._tail)
                else:
                    self._response = b"".join(bodies) + self._tail
                self._position = position if pending else self._caught_up(position)
                self._taken = len(out)
                return out
        while pending and len(out) < MAX_BATCH_EVENTS and size < MAX_BATCH_BYTES:
            events = pending[0]
            n = len(events)
            raw = None if isinstance(events, _Batch) else flt  # a replay, filtered here
            while offset < n:
                event = events[offset]
                offset += 1
                revision = event.revision
                if revision <= position:
                    continue  # already delivered (history replay met live events)
                position = revision
                if raw is None:
                    seen: bytes | None = event.encoded(basic)
                else:
                    assert isinstance(event, Event)
                    seen = _filtered(event, raw, basic)
                if seen is None:
                    continue
                out.append(seen)
                size += len(seen)
                if len(out) >= MAX_BATCH_EVENTS or size >= MAX_BATCH_BYTES:
                    break
            if offset >= n:
                pending.popleft()
                offset = 0
                if pending:
                    self._behind -= len(pending[0])
        self._offset = offset
        self._position = position if pending else self._caught_up(position)
        self._taken = len(out)
        return out


def _filtered(event: Event, flt: Filter, basic: bool) -> bytes | None:
    """The event as a filtered watcher sees it: records entering the filter are
    ADDED, records leaving it DELETED (with their new version); None if unseen.

    For history replays, one watcher at a time; live changes go through
    ``_route``, which must give the same answer (tests/test_watch_groups.py)."""
    now = flt.matches(event.record)
    if event.type is _DELETED:
        return event.encoded(basic) if now else None
    before = event.prev is not None and flt.matches(event.prev)
    if now:
        return (
            event.encoded(basic) if before or event.prev is None else event.encoded(basic, _ADDED)
        )
    if before:
        return event.encoded(basic, _DELETED)
    return None


class _Group:
    """The watchers sharing one (non-empty) Filter."""

    __slots__ = ("filter", "watchers")

    def __init__(self, flt: Filter) -> None:
        self.filter = flt
        self.watchers: dict[Watcher, None] = {}


def _route(
    index: FilterIndex[_Group], events: Sequence[Event]
) -> dict[_Group, list[Event | _Seen]]:
    """What each group sees of ``events`` (the groups that see nothing are absent).

    Per event, each distinct filter that the index names as a candidate for
    the record, or for its previous version, is evaluated once; the rules
    are ``_filtered``'s: a record that matches now is seen as it is (ADDED
    if it did not match before), one that matched before and no longer does
    is seen DELETED, a DELETED event only by the filters its record matches.
    """
    out: dict[_Group, list[Event | _Seen]] = {}
    for event in events:
        now = index.matching(event.record)
        prev = event.prev
        if prev is None or event.type is _DELETED:
            for group in now:
                seen = out.get(group)
                if seen is None:
                    out[group] = [event]
                else:
                    seen.append(event)
            continue
        before = dict.fromkeys(index.matching(prev)) if prev is not event.record else None
        added: _Seen | None = None
        for group in now:
            if before is None or before.pop(group, 0) is None:
                item: Event | _Seen = event
            else:
                item = added = added or _Seen(event, _ADDED)
            seen = out.get(group)
            if seen is None:
                out[group] = [item]
            else:
                seen.append(item)
        if before:
            deleted = _Seen(event, _DELETED)
            for group in before:
                seen = out.get(group)
                if seen is None:
                    out[group] = [deleted]
                else:
                    seen.append(deleted)
    return out


class WatchHub:
    """Every watcher of one store."""

    def __init__(
        self,
        store: Store,
        *,
        max_lag: int = 10_000,
        bookmark_interval: float = 5.0,
        write_timeout: float = 30.0,
    ) -> None:
        if write_timeout <= 0:
            raise ValueError(f"write_timeout must be positive, got {write_timeout}")
        self.store = store
        self.max_lag = max_lag
        self.bookmark_interval = bookmark_interval
        self.write_timeout = write_timeout
        self._watchers: dict[Watcher, None] = {}
        self._everyone: dict[Watcher, None] = {}  # the unfiltered watchers
        self._groups: dict[Filter, _Group] = {}  # the filtered ones, by filter
        self._index: FilterIndex[_Group] = FilterIndex()
        self._revision = store.revision
        self._shutting_down = False
        self.events_sent = 0
        """Change events (ADDED, MODIFIED, DELETED, initial ADDED) written to
        watchers through ``Watcher.send``; bookmarks are not counted."""
        self.evictions = {"slow_consumer": 0, "write_timeout": 0}
        """Watchers ended for falling more than max_lag behind, or for a write
        blocked write_timeout seconds."""
        self._unsubscribe = store.subscribe(self._broadcast)

    @property
    def revision(self) -> int:
        """The revision of the last change handed to the watchers."""
        return self._revision

    @property
    def group_count(self) -> int:
        """Distinct filters among the filtered watchers (each evaluated once per event)."""
        return len(self._groups)

    @property
    def watcher_count(self) -> int:
        """Watchers currently registered."""
        return len(self._watchers)

    @property
    def watchers(self) -> tuple[Watcher, ...]:
        """Watchers currently registered, oldest first."""
        return tuple(self._watchers)

    def watch(
        self,
        *,
        start_after_revision: int = 0,
        send_initial_events: bool = False,
        allow_bookmarks: bool = False,
        flt: Filter | None = None,
        basic: bool = False,
    ) -> Watcher:
        """Start a watch.

        ``start_after_revision`` 0 starts at the current revision; R > 0
        replays every event after R from the history, then continues live.
        ``send_initial_events`` (only with 0) first sends every matching
        record as ADDED (carrying its own revision), then INITIAL_EVENTS_END
        at the snapshot revision. Raises InvalidArgument (negative revision,
        initial events with a revision) or Compacted (a revision outside the
        history: too old, or ahead of the store).
        """
        store = self.store
        if start_after_revision < 0:
            raise InvalidArgument(
                [("start_after_revision", f"must not be negative, got {start_after_revision}")]
            )
        if send_initial_events and start_after_revision:
            raise InvalidArgument(
                [
                    (
                        "send_initial_events",
                        "requires start_after_revision = 0 (a snapshot is taken now); "
                        "to resume, watch without initial events",
                    )
                ]
            )
        if start_after_revision > store.revision:
            # Never issued by this store: another incarnation's history.
            raise Compacted(start_after_revision, store.oldest_revision, ahead=True)
        if start_after_revision and start_after_revision < store.oldest_revision:
            raise Compacted(start_after_revision, store.oldest_revision)
        initial: list[Record] | None = None
        position = start_after_revision or store.revision
        if send_initial_events:
            initial, position = store.snapshot()
        watcher = Watcher(
            self,
            position=position,
            initial=initial,
            allow_bookmarks=allow_bookmarks,
            flt=flt or Filter(),
            basic=basic,
        )
        # Registered before the replay is taken: the store is synchronous, so
        # no change can fall between the two, and _take() drops duplicates.
        self._watchers[watcher] = None
        if flt is None or flt.is_empty:
            self._everyone[watcher] = None
        else:
            group = self._groups.get(flt)
            if group is None:
                group = self._groups[flt] = _Group(flt)
                self._index.add(flt, group)
            group.watchers[watcher] = None
        if start_after_revision:
            replay = store.events_after(start_after_revision)
            if replay:
                watcher._replay(replay)
        if self._shutting_down:
            watcher._ending = True
            watcher._ending_revision = self._revision
        return watcher

    def final_bookmark(self) -> None:
        """Graceful shutdown: each watcher drains what it has, sends a last
        BOOKMARK (if it allows bookmarks) and ends; later changes are not sent."""
        self._shutting_down = True
        for watcher in self._watchers:
            watcher._ending = True
            watcher._ending_revision = self._revision
            watcher._notify()

    def close(self) -> None:
        """Detach from the store."""
        self._unsubscribe()

    def _broadcast(self, events: Sequence[Event]) -> None:
        if not events:
            return
        self._revision = events[-1].revision
        batch = _Batch(events)
        evicted = [w for w in self._everyone if not w._push(batch)]
        if self._groups:
            for group, seen in _route(self._index, events).items():
                batch = _Batch(seen)
                evicted.extend(w for w in group.watchers if not w._push(batch))
        for watcher in evicted:
            self._remove(watcher)

    def _remove(self, watcher: Watcher) -> None:
        if self._watchers.pop(watcher, 0) is not None:
            return  # removed before
        if self._everyone.pop(watcher, 0) is None:
            return
        flt = watcher._filter
        assert flt is not None
        group = self._groups[flt]
        del group.watchers[watcher]
        if not group.watchers:
            del self._groups[flt]
            self._index.remove(flt)
