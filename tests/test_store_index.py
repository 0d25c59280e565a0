"""The store's indexes (connmeta.index) change what a List reads, never what it returns.

Over random reports, changes, closes and deletions, a List through the
indexes (any filter, any page size, current or pinned to an earlier
revision) returns exactly what a scan of every record with Filter.matches
returns.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import connmeta
from connmeta import _sorted
from connmeta.filters import Filter
from connmeta.index import Index, Postings
from connmeta.records import EventType, Kind, Record
from connmeta.store import _INDEX_STEP, Store
from connmeta.v1 import report_service_pb2 as rs
from tests.snapshots import CAN_READ, CLOSED, OPEN, FakeClock, client, server


def _source_module() -> ModuleType:
    """connmeta/_sorted.py run as Python, whichever module the package imported."""
    path = Path(connmeta.__file__).parent / "_sorted.py"
    spec = importlib.util.spec_from_file_location("connmeta_sorted_source", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


source = _source_module()
modules = [pytest.param(_sorted, id="compiled" if _sorted.compiled() else "source")]
if _sorted.compiled():
    modules.append(pytest.param(source, id="source"))

IDS = [f"c{i:02d}" for i in range(24)]
HOSTS = ["a.example.com", "B.Example.com", "example.com", "x.a.example.com", "other.net", ""]
STATES = [OPEN, CLOSED, CAN_READ]

snapshot = st.builds(
    lambda is_server, id, client_id, state, host, port, sni: (
        server(
            id,
            client_id=client_id,
            state=state,
            addr=(host, port) if host else None,
            sni=sni or None,
        )
        if is_server
        else client(id, state=state, peer=(host or "10.0.0.1", port), sni=sni or None)
    ),
    st.booleans(),
    st.sampled_from(IDS),
    st.sampled_from(IDS[:4]),
    st.sampled_from(STATES),
    st.sampled_from(HOSTS),
    st.sampled_from([443, 80, 8080]),
    st.sampled_from(HOSTS),
)

operation = st.one_of(
    st.tuples(st.just("apply"), st.lists(snapshot, min_size=1, max_size=6)),
    st.tuples(st.just("expire"), st.just(None)),
    st.tuples(st.just("list"), st.integers(0, 10)),
)

flt = st.builds(
    lambda kind, states, host, port, sni, client_id: Filter(
        kind=kind, states=frozenset(states), host=host, port=port, sni=sni, client_id=client_id
    ),
    st.sampled_from([None, Kind.CLIENT, Kind.SERVER]),
    st.sets(st.sampled_from(STATES), max_size=2),
    st.sampled_from(
        ["", "a.example.com", "*.example.com", "*.A.EXAMPLE.COM", "other.net", "*.net"]
    ),
    st.sampled_from([0, 0, 443, 8080]),
    st.sampled_from(["", "example.com", "*.example.com", "B.example.com"]),
    st.sampled_from(["", "", *IDS[:4], IDS[10]]),
)


def _scan(records: dict[str, Record], f: Filter) -> list[str]:
    return sorted(i for i, r in records.items() if f.matches(r))


def _postings(p: Postings) -> dict[object, list[str]]:
    return {k: list(p.after(k, "")) for k in p}


def _check_index(store: Store) -> None:
    """The index holds exactly what one built afresh from the records holds."""
    index = store._index
    fresh = Index(store._records.values())
    if index.names_active:
        fresh.activate_names(store._records.values())
    assert list(index.after("")) == sorted(store._records)
    assert [list(s) for s in index.by_slot] == [list(s) for s in fresh.by_slot]
    for mine, theirs in (
        (index.by_client, fresh.by_client),
        (index.by_name.postings, fresh.by_name.postings),
    ):
        assert _postings(mine) == _postings(theirs)
    assert index.by_name.reversed == fresh.by_name.reversed


def _paged(store: Store, f: Filter, limit: int, at_revision: int | None) -> list[str]:
    out: list[str] = []
    after = ""
    pinned = at_revision
    while True:
        page, revision, more = store.list(f, after_id=after, limit=limit, at_revision=pinned)
        pinned = revision
        out.extend(r.id for r in page)
        if not more:
            return out
        after = page[-1].id


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(operation, max_size=25),
    filters=st.lists(flt, min_size=1, max_size=4),
    limit=st.integers(1, 7),
)
def test_an_indexed_list_returns_what_a_full_scan_returns(
    ops: list[tuple[str, object]], filters: list[Filter], limit: int
) -> None:
    clock = FakeClock()
    store = Store(history_size=40, closed_retention_seconds=10, clock=clock)
    pinned: list[tuple[int, dict[str, Record]]] = []
    for op, arg in ops:
        if op == "apply":
            assert isinstance(arg, list)
            store.apply(arg)
        elif op == "expire":
            clock.now += 11
            store.expire()
        else:
            assert isinstance(arg, int)
            # A List with a filter from the pool, mid-sequence: the host/SNI/port
            # index may start here and must then follow every later change.
            f = filters[arg % len(filters)]
            assert _paged(store, f, limit, None) == _scan(store._records, f)
            pinned.append((store.revision, dict(store._records)))
    _check_index(store)
    for f in filters:
        assert _paged(store, f, limit, None) == _scan(store._records, f)
        _check_index(store)
        for revision, records in pinned:
            if revision >= store.oldest_revision:
                assert _paged(store, f, limit, revision) == _scan(records, f)


def test_the_pinned_listing_shows_what_a_filter_matched_then() -> None:
    store = Store()
    store.apply([server("s1", addr=("a.example.com", 443)), server("s2", addr=("b.net", 443))])
    first, revision, _ = store.list(Filter(host="*.example.com"), limit=10)
    assert [r.id for r in first] == ["s1"]
    store.apply([server("s1", addr=("a.example.com", 443), state=CLOSED)])
    store.apply([server("s3", addr=("c.example.com", 443))])
    pinned, _, _ = store.list(
        Filter(host="*.example.com", states=frozenset({OPEN})), limit=10, at_revision=revision
    )
    assert [r.id for r in pinned] == ["s1"]
    current, _, _ = store.list(Filter(host="*.example.com", states=frozenset({OPEN})), limit=10)
    assert [r.id for r in current] == ["s3"]


def test_the_installed_package_runs_the_compiled_module_unless_told_otherwise() -> None:
    # CI installs with a compiler; CONNMETA_PURE_PYTHON=1 runs the sources.
    if os.environ.get("CONNMETA_PURE_PYTHON"):
        assert not _sorted.compiled()
    elif os.environ.get("CONNMETA_EXPECT_COMPILED"):
        assert _sorted.compiled(), _sorted.__file__
    assert not source.compiled()


def test_the_event_types_follow_reads_are_the_records_module_s() -> None:
    assert (_sorted.ADDED, _sorted.MODIFIED, _sorted.DELETED) == (
        EventType.ADDED,
        EventType.MODIFIED,
        EventType.DELETED,
    )


@pytest.mark.parametrize("module", modules)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 3000)), max_size=3000))
def test_sorted_ids_is_a_sorted_set(module: Any, ops: list[tuple[bool, int]]) -> None:
    ids = module.SortedIds()
    model: set[str] = set()
    for add, n in ops:
        key = f"{n:05d}"
        if add:
            ids.add(key)
            model.add(key)
        else:
            ids.discard(key)
            model.discard(key)
    ordered = sorted(model)
    assert list(ids) == ordered
    assert len(ids) == len(model)
    for probe in ("", "00500", "01500", "99999"):
        assert list(ids.after(probe)) == [i for i in ordered if i > probe]
        assert (probe in ids) == (probe in model)


@pytest.mark.parametrize("module", modules)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 60)), max_size=400))
def test_postings_hold_each_key_s_ids_in_order(
    module: Any, ops: list[tuple[bool, int, int]]
) -> None:
    """Through every shape of a posting: one id, a small tuple, a SortedIds and back."""
    postings = module.Postings()
    model: dict[int, set[str]] = {}
    for add, key, n in ops:
        id = f"{n:03d}"
        had = bool(model.get(key))
        if add:
            assert postings.add(key, id) == (not had)
            model.setdefault(key, set()).add(id)
        else:
            left = postings.discard(key, id)
            model.get(key, set()).discard(id)
            assert left == (had and not model[key])
    assert sorted(postings) == sorted(k for k, v in model.items() if v)
    for key, ids in model.items():
        ordered = sorted(ids)
        assert postings.size(key) == len(ordered)
        for probe in ("", "010", "030", "999"):
            assert list(postings.after(key, probe)) == [i for i in ordered if i > probe]


def test_a_report_batch_with_snapshots_of_one_id_is_indexed_once() -> None:
    store = Store()
    batch: list[rs.ConnectionSnapshot] = [server("s1"), server("s1", state=CLOSED)]
    store.apply(batch)
    page, _, _ = store.list(Filter(states=frozenset({CLOSED})), limit=10)
    assert [r.id for r in page] == ["s1"]
    assert store.list(Filter(states=frozenset({OPEN})), limit=10)[0] == []


def test_a_record_under_two_names_a_wildcard_matches_is_listed_once() -> None:
    store = Store()
    store.apply([client("c1", peer=("a.example.com", 1), sni="b.example.com")])
    page, _, _ = store.list(Filter(sni="*.example.com"), limit=10)
    assert [r.id for r in page] == ["c1"]
    page, _, _ = store.list(Filter(host="*.example.com"), limit=10)
    assert [r.id for r in page] == ["c1"]


def test_a_name_index_built_in_steps_serves_the_same_lists_as_one_built_at_once() -> None:
    """The host/SNI index a List asks for is built step by step between other
    work; while it builds, changes keep coming, and host-filtered Lists must
    match a full scan before, during and after the build."""
    steps: list[Callable[[], None]] = []
    store = Store()
    store.build_indexes_in_steps(steps.append)
    n = 3 * _INDEX_STEP + 17
    store.apply([server(f"s{i:05d}", addr=(f"h{i % 7}.example.com", 443)) for i in range(n)])
    flt = Filter(host="*.example.com")
    exact = Filter(host="h3.example.com")

    def scan(f: Filter) -> list[str]:
        return sorted(r.id for r in store._records.values() if f.matches(r))

    def listed(f: Filter) -> list[str]:
        return [r.id for r in store.list(f, limit=n + 10)[0]]

    assert listed(exact) == scan(exact)  # begins the build; served by a scan meanwhile
    assert len(steps) == 1
    assert store._index.names_building
    rounds = 0
    while steps:
        rounds += 1
        # Changes between steps: a moved host, a new records.
        # Ids are indexed from the last: this one was indexed by an earlier step.
        store.apply([server(f"s{n - rounds:05d}", addr=("moved.example.org", 443))])
        store.apply([server(f"t{rounds:05d}", addr=(f"h{rounds % 7}.example.com", 443))])
        steps.pop()()
        assert listed(flt) == scan(flt)
        assert listed(exact) == scan(exact)
    assert rounds == 4  # ceil(n / _INDEX_STEP) steps, each reschedules the next
    assert store._index.names_active
    assert not store._index.names_building
    assert listed(Filter(host="moved.example.org")) == scan(Filter(host="moved.example.org"))
    _check_index(store)
