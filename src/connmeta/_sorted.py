"""Sorted id sets for the store's indexes, and following one change's events into them.

``SortedIds`` and ``Postings`` are described in ``connmeta.index``, which
re-exports them; ``follow`` is the per-event part of ``Index.update``: each
event of a change moves its id between the kind/state postings and the
client-id postings.

Self-contained (bisect and itertools only, records typed by protocols) so
that the normal install compiles it with mypyc (``hatch_build.py``).
Interpreted, keeping these indexes current cost about 2 µs of the ~7.5 µs a
new record costs ``Store.apply`` as served, and 3.3 of 10.7 µs a changed one.
Compiled (in-process A/B against the interpreted module, interleaved batch
by batch, 100k records): new 7.94 -> 7.45 µs, changed 11.30 -> 10.76 µs;
``Index.update`` alone 1.55 -> 1.15 µs an event; the transport ingest's
server CPU 8.9-9.4 -> 8.6-8.8 µs a record. What remains is the sorted
insertion itself (~1.1 µs a ``SortedIds.add`` among 100k random ids: two
bisects of ~10 string compares each and a list insert); a hand-written
bisect (1.53 vs 1.23 µs an add) and sorting a change's ids before
inserting them (1.30 vs 1.35 µs) did not pay. ``CONNMETA_PURE_PYTHON=1``
imports this source instead.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from typing import Final, Protocol

__all__ = ["Postings", "SortedIds", "compiled", "follow"]

_LOAD: Final = 512
# A posting of at most this many ids is a tuple, sorted when read.
_SMALL: Final = 32
_NO_IDS: Final[tuple[str, ...]] = ()

# connmeta.records.EventType's values (tests/test_store_index.py checks they agree).
ADDED: Final = 1
MODIFIED: Final = 2
DELETED: Final = 3


def compiled() -> bool:
    """Whether this is the module compiled by mypyc (else its Python source runs)."""
    return not __file__.endswith(".py")


class SortedIds:
    """A sorted set of ids: add, discard, and iterate after any id in O(log n + page)."""

    __slots__ = ("_chunks", "_len", "_maxes")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        ordered = sorted(set(ids))
        self._chunks: list[list[str]] = [
            ordered[i : i + _LOAD] for i in range(0, len(ordered), _LOAD)
        ]
        self._maxes: list[str] = [chunk[-1] for chunk in self._chunks]
        self._len: int = len(ordered)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, id: str) -> bool:
        maxes = self._maxes
        i = bisect_left(maxes, id)
        if i == len(maxes):
            return False
        chunk = self._chunks[i]
        j = bisect_left(chunk, id)
        return j < len(chunk) and chunk[j] == id

    def add(self, id: str) -> None:
        """Add ``id``; no-op when present."""
        maxes = self._maxes
        chunks = self._chunks
        i = bisect_left(maxes, id)
        if i == len(maxes):
            if not maxes:
                chunks.append([id])
                maxes.append(id)
                self._len += 1
                return
            i -= 1
            chunk = chunks[i]
            chunk.append(id)
            maxes[i] = id
        else:
            chunk = chunks[i]
            j = bisect_left(chunk, id)
            if chunk[j] == id:  # j < len(chunk): id <= maxes[i]
                return
            chunk.insert(j, id)
        self._len += 1
        if len(chunk) > 2 * _LOAD:
            chunks.insert(i + 1, chunk[_LOAD:])
            del chunk[_LOAD:]
            maxes.insert(i, chunk[-1])

    def discard(self, id: str) -> None:
        """Remove ``id`` if present."""
        maxes = self._maxes
        i = bisect_left(maxes, id)
        if i == len(maxes):
            return
        chunk = self._chunks[i]
        j = bisect_left(chunk, id)
        if chunk[j] != id:
            return
        del chunk[j]
        self._len -= 1
        if not chunk:
            del self._chunks[i]
            del maxes[i]
        elif j == len(chunk):
            maxes[i] = chunk[-1]

    def after(self, id: str) -> Iterator[str]:
        """The ids greater than ``id``, in order (all of them for "")."""
        chunks = self._chunks
        i = bisect_right(self._maxes, id) if id else 0
        if i == len(chunks):
            return iter(_NO_IDS)
        first = chunks[i]
        head = itertools.islice(first, bisect_right(first, id), None) if id else iter(first)
        return itertools.chain(
            head, itertools.chain.from_iterable(itertools.islice(chunks, i + 1, None))
        )

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self._chunks)


Posting = str | tuple[str, ...] | SortedIds


class Postings:
    """key -> the sorted set of ids having it; a key without ids is absent."""

    __slots__ = ("_map",)

    def __init__(self) -> None:
        self._map: dict[object, Posting] = {}

    @classmethod
    def of(cls, ids: dict[str, list[str]]) -> Postings:
        """Postings holding each key's ``ids`` (distinct), built at once."""
        postings = cls()
        for key, some in ids.items():
            postings._map[key] = (
                some[0]
                if len(some) == 1
                else tuple(some)
                if len(some) <= _SMALL
                else SortedIds(some)
            )
        return postings

    def __len__(self) -> int:
        """How many distinct keys."""
        return len(self._map)

    def __iter__(self) -> Iterator[object]:
        """The keys."""
        return iter(self._map)

    def add(self, key: object, id: str) -> bool:
        """Add ``id`` under ``key``; True when ``key`` is new."""
        posting = self._map.get(key)
        if posting is None:
            self._map[key] = id
            return True
        if isinstance(posting, SortedIds):
            posting.add(id)
        elif isinstance(posting, str):
            if posting != id:
                self._map[key] = (posting, id)
        elif id not in posting:
            if len(posting) < _SMALL:
                self._map[key] = (*posting, id)
            else:
                self._map[key] = SortedIds((*posting, id))
        return False

    def discard(self, key: object, id: str) -> bool:
        """Remove ``id`` from ``key``; True when ``key`` is left without ids."""
        posting = self._map.get(key)
        if posting is None:
            return False
        if isinstance(posting, str):
            if posting != id:
                return False
            del self._map[key]
            return True
        if isinstance(posting, SortedIds):
            posting.discard(id)
            if len(posting) <= _SMALL // 2:
                self._map[key] = tuple(posting)
            return False
        if id in posting:
            rest = tuple(i for i in posting if i != id)
            self._map[key] = rest[0] if len(rest) == 1 else rest
        return False

    def size(self, key: object) -> int:
        posting = self._map.get(key)
        if posting is None:
            return 0
        return 1 if isinstance(posting, str) else len(posting)

    def after(self, key: object, id: str) -> Iterator[str]:
        """The ids under ``key`` greater than ``id``, in order."""
        posting = self._map.get(key)
        if posting is None:
            return iter(_NO_IDS)
        if isinstance(posting, SortedIds):
            return posting.after(id)
        if isinstance(posting, str):
            return iter((posting,) if posting > id else _NO_IDS)
        return iter(sorted(i for i in posting if i > id))


class _Record(Protocol):
    """What ``follow`` reads of a ``connmeta.records.Record``."""

    @property
    def id(self) -> str: ...
    @property
    def client_id(self) -> str: ...
    @property
    def _bits(self) -> int: ...


class _Event(Protocol):
    """What ``follow`` reads of a ``connmeta.records.Event``."""

    @property
    def type(self) -> int: ...
    @property
    def record(self) -> _Record: ...
    @property
    def prev(self) -> _Record | None: ...


def follow(by_slot: list[SortedIds], by_client: Postings, events: Sequence[_Event]) -> None:
    """Move each event's id between the postings by ``kind | state << 2`` (the
    record's low bits) and by client id; oldest event first."""
    for event in events:
        record = event.record
        id = record.id
        type = event.type
        if type == ADDED:
            by_slot[record._bits & 15].add(id)
            by_client.add(record.client_id, id)
        elif type == MODIFIED:
            prev = event.prev
            assert prev is not None
            old = prev._bits & 15
            new = record._bits & 15
            if old != new:
                by_slot[old].discard(id)
                by_slot[new].add(id)
            if prev.client_id != record.client_id:
                by_client.discard(prev.client_id, id)
                by_client.add(record.client_id, id)
        elif type == DELETED:
            by_slot[record._bits & 15].discard(id)
            by_client.discard(record.client_id, id)
