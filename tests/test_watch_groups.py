"""Grouped, indexed fan-out gives every watcher exactly what matching it alone gives.

The hub groups filtered watchers by equal Filter and consults only the filters
a FilterIndex names for each record; these tests compare what each watcher
receives with the one-watcher reference (``watch._filtered`` over the store's
history), for random filters and random changes, and the index with a scan.
"""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from connmeta.filters import Filter, FilterIndex
from connmeta.records import Kind
from connmeta.store import Store
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import report_service_pb2 as rs
from connmeta.watch import Watcher, WatchHub, _filtered
from tests.snapshots import CAN_READ, CAN_WRITE, CLOSED, OPEN, FakeClock, client, server

BOOKMARK = cs.WATCH_EVENT_TYPE_BOOKMARK

HOSTS = ["a.example.com", "B.Example.COM", "x.a.example.com", "example.com", "other.net", "a"]
SNIS = [None, "a.example.com", "X.example.com", "example.com", "other.net"]
PATTERNS = ["", "a.example.com", "A.EXAMPLE.com", "*.example.com", "*.a.example.com"]
PATTERNS += ["*.Example.Com", "example.com", "*.net", "other.net", "*.com"]
CLIENTS = ["client-1", "client-2", "client-3"]
IDS = ["conn-1", "conn-2", "conn-3", "conn-4"]
STATES = [CLOSED, CAN_READ, CAN_WRITE, OPEN]

filters = st.builds(
    lambda kind, states, host, port, sni, client_id: Filter.from_proto(
        cs.ConnectionFilter(
            kind=kind, states=states, host=host, port=port, sni=sni, client_id=client_id
        )
    ),
    kind=st.sampled_from([0, cs.CONNECTION_KIND_CLIENT, cs.CONNECTION_KIND_SERVER]),
    states=st.lists(st.sampled_from(STATES), max_size=2),
    host=st.sampled_from(PATTERNS),
    port=st.sampled_from([0, 0, 443, 80]),
    sni=st.sampled_from(PATTERNS),
    client_id=st.sampled_from(["", "", *CLIENTS]),
)


def _snapshot(
    kind: str, id: str, state: int, host: str, port: int, sni: str | None, client_id: str
) -> rs.ConnectionSnapshot:
    hook = pb.HOOK_SERVER_DISCONNECTED if state == CLOSED else pb.HOOK_SERVER_CONNECTED
    if kind == "client":
        return client(
            f"{id}-c",
            state=state,
            peer=(host, port),
            sni=sni,
            hook=pb.HOOK_CLIENT_DISCONNECTED if state == CLOSED else pb.HOOK_CLIENT_CONNECTED,
        )
    return server(id, client_id=client_id, state=state, addr=(host, port), sni=sni, hook=hook)


snapshots = st.builds(
    _snapshot,
    kind=st.sampled_from(["server", "server", "client"]),
    id=st.sampled_from(IDS),
    state=st.sampled_from(STATES),
    host=st.sampled_from(HOSTS),
    port=st.sampled_from([443, 80]),
    sni=st.sampled_from(SNIS),
    client_id=st.sampled_from(CLIENTS),
)
# A step: a batch of snapshots (one store change), or a retention sweep (DELETED events).
steps = st.one_of(st.lists(snapshots, min_size=1, max_size=4), st.just("expire"))


async def _received(watcher: Watcher) -> tuple[list[bytes], int]:
    """Every event queued for ``watcher``, and the bookmark revision it then reports."""
    out: list[bytes] = []
    while True:
        batch = await asyncio.wait_for(watcher.next(), 1)
        events = [cs.WatchEvent.FromString(b) for b in batch]
        if events and events[-1].type == BOOKMARK:
            assert len(events) == 1
            return out, events[0].revision
        out.extend(batch)


@settings(max_examples=200, deadline=None)
@given(
    chosen=st.lists(
        st.tuples(filters, st.booleans(), st.integers(0, 2), st.booleans()), min_size=1, max_size=8
    ),
    plan=st.lists(steps, min_size=1, max_size=8),
    drain_after=st.integers(0, 8),
)
def test_grouped_delivery_equals_matching_each_watcher_alone(
    chosen: list[tuple[Filter, bool, int, bool]], plan: list[object], drain_after: int
) -> None:
    """Filters drawn from small pools (so watchers share them), watchers
    starting before different changes, live or resuming from the first
    revision (a replay), all drained midway once, changes that enter and
    leave filters, deletions by retention."""

    async def run() -> None:
        clock = FakeClock()
        store = Store(clock=clock, closed_retention_seconds=1)
        hub = WatchHub(store, bookmark_interval=0)
        base = store.revision
        watchers: list[tuple[Watcher, Filter, bool, int]] = []
        received: dict[int, list[bytes]] = {}
        for step_index, step in enumerate(plan):
            for flt, basic, start, resume in chosen:
                if start == step_index:
                    after = base if resume and base else 0
                    watcher = hub.watch(
                        start_after_revision=after, allow_bookmarks=True, flt=flt, basic=basic
                    )
                    watchers.append((watcher, flt, basic, after or store.revision))
            if step == "expire":
                clock.now += 2
                store.expire()
            else:
                assert isinstance(step, list)
                store.apply(step)
            if step_index == drain_after:
                for watcher, *_ in watchers:
                    events, _ = await _received(watcher)
                    received.setdefault(id(watcher), []).extend(events)
        for watcher, flt, basic, after in watchers:
            events, bookmark = await _received(watcher)
            got = received.get(id(watcher), []) + events
            expected = [
                seen
                for event in store.events_after(after)
                if (seen := _filtered(event, flt, basic)) is not None
            ]
            assert [cs.WatchEvent.FromString(b) for b in got] == [
                cs.WatchEvent.FromString(b) for b in expected
            ]
            assert got == expected
            assert bookmark == store.revision
        assert hub.group_count == len({flt for _, flt, _, _ in watchers if not flt.is_empty})
        for watcher, *_ in watchers:
            watcher.close()
        assert (hub.group_count, hub.watcher_count) == (0, 0)

    asyncio.run(run())


@settings(max_examples=300, deadline=None)
@given(distinct=st.lists(filters, max_size=12, unique=True), plan=st.lists(snapshots, max_size=6))
def test_the_index_names_exactly_the_matching_filters(
    distinct: list[Filter], plan: list[rs.ConnectionSnapshot]
) -> None:
    store = Store()
    index: FilterIndex[int] = FilterIndex()
    indexed = [f for f in distinct if not f.is_empty]
    for i, flt in enumerate(indexed):
        index.add(flt, i)
    store.apply(plan)
    for record in store.snapshot()[0]:
        found = index.matching(record)
        assert len(found) == len(set(found))  # each filter evaluated (and named) once
        assert sorted(found) == [i for i, flt in enumerate(indexed) if flt.matches(record)]
    for flt in indexed:
        index.remove(flt)
    assert len(index) == 0


def test_the_index_files_each_filter_under_its_most_selective_condition() -> None:
    index: FilterIndex[str] = FilterIndex()
    index.add(Filter(kind=Kind.SERVER, host="*.example.com", client_id="c1"), "client id")
    index.add(Filter(host="*.example.com", sni="exact.example.com"), "exact sni")
    index.add(Filter(states=frozenset({1, 3})), "states")
    assert index._client_id.keys() == {"c1"}
    assert index._sni.keys() == {"exact.example.com"}
    assert index._state.keys() == {1, 3}
    assert not index._host_suffix
    assert not index._kind
