"""The store's indexes: ids in order, and ids by what a List filters on.

``Store.list`` pages through current records in id order, from any id, with
or without a filter. Without indexes a page after an id near the end cost a
re-sort of every id after writes, and a filtered page that matches few
records a scan of every record (785 ms at a million, issue 14). Here:

- ``SortedIds``: ids in order, as short sorted chunks (at most
  ``2 * _LOAD`` each) with the largest id of each chunk in a list of its
  own: adding or removing an id, or starting a page after one, is a bisect of
  that list and of one chunk (O(log n) in C, plus a memmove of at most one
  chunk), whatever happened before; no lazy re-sort, no deleted-id scan.
  About 8.2 bytes per id. (``sortedcontainers.SortedList`` is the same idea;
  these 60 lines need neither its positional index nor a new dependency.)
- ``Postings``: key -> the ids having it. One id is kept as the str itself,
  a few as a tuple (sorted when read: at most ``_SMALL``), more as a
  ``SortedIds``: most keys (a client's id, a rare host) cost a dict entry and
  no container.
- ``Index``: ids by ``kind | state << 2`` (the record's census slot; every
  id in order is the merge of these few postings); by client_id; and, once
  a List first filters on host or SNI, by name: lowercased host and SNI in
  one index (the distinct names also reversed in a sorted list, so that
  ``*.example.com`` is a range of them). Names are not indexed before
  that: ingest leaves them in the record's bytes (reading them cost a
  quarter of ingest), and once the name index exists, each new version's
  are read (``Record.host``, ~3 µs) unless ingest supplied them. Port is
  not indexed: a port alone is rarely selective (443), and each membership
  costs 8-40 bytes per record; a port condition is checked on the
  candidates of another index, or on every record when it is the only one.

``SortedIds``, ``Postings`` and the per-event work of ``Index.update`` for
kind/state and client id live in ``connmeta._sorted``, compiled with mypyc by
the normal install (``hatch_build.py``); this module re-exports them.

The store keeps it current from its events, in ``Store._commit``: the one
place every change passes through. Reads choose the smallest source
(``Index.candidates``) and the store checks every candidate with
``Filter.matches``: an index only has to hold a superset of the matches.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final

from connmeta._sorted import Postings, SortedIds, follow
from connmeta.filters import Filter, NameTerm
from connmeta.records import Event, EventType, Record

__all__ = ["Index", "Postings", "SortedIds"]

# A wildcard matching more distinct names than this is not worth merging.
_MAX_MERGE: Final = 4096
_NO_IDS: Final[tuple[str, ...]] = ()


class _Names:
    """Postings by lowercased name, with the distinct names reversed and sorted."""

    __slots__ = ("postings", "reversed")

    def __init__(self) -> None:
        self.postings = Postings()
        self.reversed: list[str] = []

    def add(self, name: str, id: str) -> None:
        if name and self.postings.add(name, id):
            insort(self.reversed, name[::-1])

    def discard(self, name: str, id: str) -> None:
        if name and self.postings.discard(name, id):
            rev = name[::-1]
            keys = self.reversed
            i = bisect_left(keys, rev)
            if i < len(keys) and keys[i] == rev:
                del keys[i]

    def matching(self, term: NameTerm) -> Sequence[str] | None:
        """The names a pattern may match (a superset); None when too many to merge."""
        if term.exact is not None:
            return (term.exact,)
        assert term.suffix is not None
        prefix = term.suffix[::-1]
        keys = self.reversed
        start = bisect_left(keys, prefix)
        end = bisect_left(keys, prefix + "\U0010ffff", start)
        if end - start > _MAX_MERGE:
            return None
        return [k[::-1] for k in keys[start:end]]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Many new objects and no garbage: the collector's full passes would make
    building an index superlinear (as they made loading a saved state)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _merge(sources: list[Iterator[str]]) -> Iterator[str]:
    if not sources:
        return iter(_NO_IDS)
    if len(sources) == 1:
        return sources[0]
    return heapq.merge(*sources)


def _distinct(ids: Iterator[str]) -> Iterator[str]:
    """Sorted ``ids`` without repeats: a record whose host and SNI differ is
    under both names, and a wildcard may match both."""
    last = None
    for id in ids:
        if id != last:
            last = id
            yield id


class Index:
    """Current ids, in order and by what a List filters on (see the module's docstring)."""

    __slots__ = ("_names_todo", "by_client", "by_name", "by_slot", "names_active")

    def __init__(self, records: Iterable[Record] = ()) -> None:
        by_slot: list[list[str]] = [[] for _ in range(16)]
        by_client: dict[str, list[str]] = {}
        for record in records:
            id = record.id
            by_slot[record._bits & 15].append(id)
            ids = by_client.get(record.client_id)
            if ids is None:
                by_client[record.client_id] = [id]
            else:
                ids.append(id)
        self.by_client = Postings.of(by_client)
        self.by_slot = [SortedIds(ids) for ids in by_slot]
        # Host and SNI share one index: a record is under its host and its SNI,
        # once when they are the same name (as for most servers), which saves
        # one membership per record; Filter.matches tells which one matched.
        self.by_name = _Names()
        self.names_active = False
        """Whether host and SNI are indexed (from the first List filtering on them)."""
        # Ids whose names are still to be indexed while the name index is being
        # built step by step (None: not building); new versions' names are
        # kept from the start of the build.
        self._names_todo: list[str] | None = None

    @property
    def names_building(self) -> bool:
        """Whether the name index is being built (``begin_names``) and not complete yet."""
        return self._names_todo is not None

    def activate_names(self, records: Iterable[Record]) -> None:
        """Index host and SNI of ``records`` (every current one) at once, from now on kept."""
        if self.names_active:
            return
        self._names_todo = None
        with _collector_paused():
            for record in records:
                self._add_names(record)
        self.names_active = True

    def begin_names(self, ids: list[str]) -> None:
        """Start building the name index over ``ids`` (every current id), in steps
        (``build_names``): a million records take seconds, which must not stall
        the event loop in one go. From now on ``update`` keeps the names of new
        versions; the index serves reads once complete (``names_active``)."""
        if not self.names_active and self._names_todo is None:
            self._names_todo = ids

    def build_names(self, records: Mapping[str, Record], budget: int) -> bool:
        """Index the names of up to ``budget`` more ids; True while some remain.

        Reads each id's current record, so a version that ``update`` indexed
        meanwhile is added again (a no-op) and a deleted id is skipped; adding
        and discarding names are idempotent, which makes the interleaving safe.
        """
        todo = self._names_todo
        if todo is None:
            return False
        with _collector_paused():
            for _ in range(min(budget, len(todo))):
                record = records.get(todo.pop())
                if record is not None:
                    self._add_names(record)
        if todo:
            return True
        self._names_todo = None
        self.names_active = True
        return False

    def _add_names(self, record: Record) -> None:
        id = record.id
        host, sni = record.host.lower(), record.sni.lower()
        self.by_name.add(host, id)
        if sni != host:
            self.by_name.add(sni, id)

    def _discard_names(self, record: Record) -> None:
        id = record.id
        host, sni = record.host.lower(), record.sni.lower()
        self.by_name.discard(host, id)
        if sni != host:
            self.by_name.discard(sni, id)

    def update(self, events: Sequence[Event]) -> None:
        """Follow one change's events, oldest first."""
        # Ids by kind/state and by client id: compiled (connmeta._sorted).
        follow(self.by_slot, self.by_client, events)
        if not (self.names_active or self._names_todo is not None):
            return
        for event in events:
            record = event.record
            type = event.type
            if type is EventType.ADDED:
                self._add_names(record)
            elif type is EventType.MODIFIED:
                prev = event.prev
                assert prev is not None
                if prev.host != record.host or prev.sni != record.sni:
                    self._discard_names(prev)
                    self._add_names(record)
            elif type is EventType.DELETED:
                self._discard_names(record)

    def __len__(self) -> int:
        return sum(len(s) for s in self.by_slot)

    def after(self, id: str) -> Iterator[str]:
        """Every current id greater than ``id``, in order.

        The union of the kind/state postings (at most eight hold ids): one
        insertion per new record instead of two, and 8 bytes less per record,
        for a merge of a few sorted runs when reading.
        """
        return _merge([s.after(id) for s in self.by_slot if len(s)])

    def needs_names(self, flt: Filter) -> bool:
        """Whether planning ``flt`` would use the host and SNI index."""
        terms = flt.terms()
        return terms.host is not None or terms.sni is not None

    def candidates(self, flt: Filter, after_id: str) -> Iterator[str]:
        """Ids after ``after_id`` in order, a superset of the current records ``flt``
        matches, from the smallest index that covers one of its conditions."""
        terms = flt.terms()
        best_size = len(self)
        best: Callable[[], Iterator[str]] = lambda: self.after(after_id)  # noqa: E731

        def consider(size: int, source: Callable[[], Iterator[str]]) -> None:
            nonlocal best_size, best
            if size < best_size:
                best_size, best = size, source

        client_id = terms.client_id
        if client_id:
            consider(
                self.by_client.size(client_id), lambda: self.by_client.after(client_id, after_id)
            )
        if terms.kind is not None or terms.states:
            kinds = (terms.kind,) if terms.kind is not None else (1, 2)
            slots = [self.by_slot[k | s << 2] for k in kinds for s in terms.states or range(4)]
            consider(sum(len(s) for s in slots), lambda: _merge([s.after(after_id) for s in slots]))
        if self.names_active:
            names = self.by_name
            for term in (terms.host, terms.sni):
                keys = names.matching(term) if term is not None else None
                if keys is not None:
                    postings = names.postings
                    consider(
                        sum(postings.size(k) for k in keys),
                        lambda p=postings, ks=keys: _distinct(  # type: ignore[misc]
                            _merge([p.after(k, after_id) for k in ks])
                        ),
                    )
        return best()
