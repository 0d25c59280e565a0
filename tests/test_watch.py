"""The watch hub: ordered, gapless, duplicate-free delivery; snapshots, bookmarks, eviction."""

from __future__ import annotations

import asyncio
import random

import pytest

from connmeta.store import Compacted, Filter, InvalidArgument, Store
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.watch import MAX_BATCH_EVENTS, Evicted, Watcher, WatchHub
from tests.snapshots import CLOSED, OPEN, client, next_id, server

ADDED = cs.WATCH_EVENT_TYPE_ADDED
MODIFIED = cs.WATCH_EVENT_TYPE_MODIFIED
DELETED = cs.WATCH_EVENT_TYPE_DELETED
BOOKMARK = cs.WATCH_EVENT_TYPE_BOOKMARK
END = cs.WATCH_EVENT_TYPE_INITIAL_EVENTS_END


def decode(batch: list[bytes]) -> list[cs.WatchEvent]:
    return [cs.WatchEvent.FromString(b) for b in batch]


def summary(batch: list[bytes]) -> list[tuple[int, int, str]]:
    return [(e.type, e.revision, _id(e)) for e in decode(batch)]


def _id(event: cs.WatchEvent) -> str:
    if not event.HasField("connection"):
        return ""
    side = event.connection.WhichOneof("kind")
    return getattr(event.connection, side).connection.id if side else ""


async def drain(watcher: Watcher) -> list[cs.WatchEvent]:
    """Everything queued right now (next() must not wait: something is pending)."""
    return decode(await asyncio.wait_for(watcher.next(), 1))


async def test_watch_from_now_sends_only_later_changes() -> None:
    store = Store()
    hub = WatchHub(store)
    base = store.revision
    store.apply([server("a")])
    watcher = hub.watch()
    store.apply([server("b"), server("a", state=CLOSED)])
    batch = await watcher.next()
    assert summary(batch) == [(ADDED, base + 2, "b"), (MODIFIED, base + 3, "a")]
    assert watcher.last_revision == base + 3


async def test_resume_replays_history_then_continues_live_without_duplicates() -> None:
    store = Store()
    hub = WatchHub(store)
    base = store.revision
    store.apply([server(next_id()) for _ in range(5)])
    watcher = hub.watch(start_after_revision=base + 2)
    store.apply([server(next_id())])
    events = await drain(watcher)
    assert [e.revision for e in events] == [base + 3, base + 4, base + 5, base + 6]


async def test_resume_under_concurrent_writes_has_no_gap_and_no_duplicate() -> None:
    rng = random.Random(1234)
    store = Store(history_size=100_000)
    hub = WatchHub(store, max_lag=100_000)
    ids = [f"c{i}" for i in range(40)]
    total_batches = 300
    results: dict[int, tuple[int, list[int]]] = {}
    done = asyncio.Event()

    async def writer() -> None:
        for _ in range(total_batches):
            store.apply(
                [
                    server(rng.choice(ids), state=rng.choice([0, 1, 2, 3]))
                    for _ in range(rng.randint(1, 5))
                ]
            )
            if rng.random() < 0.3:
                hub_watchers.append(asyncio.create_task(reader(len(hub_watchers))))
            await asyncio.sleep(0)
        done.set()

    async def reader(n: int) -> None:
        start = rng.choice([0, rng.randint(store.oldest_revision, store.revision)])  # 0: now
        watcher = hub.watch(start_after_revision=start)
        start = start or watcher.last_revision
        got: list[int] = []
        while True:
            if done.is_set() and watcher.last_revision == store.revision:
                break
            next_batch = asyncio.ensure_future(watcher.next())
            finished = asyncio.ensure_future(done.wait())
            await asyncio.wait({next_batch, finished}, return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            if next_batch.done():
                got.extend(e.revision for e in decode(next_batch.result()))
            else:
                next_batch.cancel()
                await asyncio.gather(next_batch, return_exceptions=True)
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
        watcher.close()
        results[n] = (start, got)

    hub_watchers: list[asyncio.Task[None]] = []
    await writer()
    await asyncio.gather(*hub_watchers)
    assert len(results) > 50
    for start, got in results.values():
        assert got == list(range(start + 1, store.revision + 1))
    assert hub.watcher_count == 0


async def test_initial_events_then_end_marker_then_changes() -> None:
    store = Store()
    hub = WatchHub(store)
    base = store.revision
    store.apply([server("b"), server("a"), client("c")])
    flt = Filter.from_proto(cs.ConnectionFilter(kind=cs.CONNECTION_KIND_SERVER))
    watcher = hub.watch(send_initial_events=True, flt=flt)
    store.apply([server("a", state=CLOSED)])
    first = await drain(watcher)
    assert sorted((e.type, e.revision, _id(e)) for e in first[:-1]) == [
        (ADDED, base + 1, "b"),
        (ADDED, base + 2, "a"),
    ]
    assert (first[-1].type, first[-1].revision, first[-1].HasField("connection")) == (
        END,
        base + 3,
        False,
    )
    assert [(e.type, e.revision) for e in await drain(watcher)] == [(MODIFIED, base + 4)]


async def test_initial_events_of_an_empty_store_are_just_the_end_marker() -> None:
    store = Store()
    watcher = WatchHub(store).watch(send_initial_events=True)
    # The empty store's revision, never 0: a watch can resume after it.
    assert [(e.type, e.revision) for e in await drain(watcher)] == [(END, store.revision)]
    assert store.revision > 0


async def test_large_snapshot_is_sent_in_bounded_batches() -> None:
    store = Store()
    hub = WatchHub(store)
    store.apply([server(f"s{i:05d}") for i in range(MAX_BATCH_EVENTS + 10)])
    watcher = hub.watch(send_initial_events=True)
    first = await drain(watcher)
    second = await drain(watcher)
    assert len(first) == MAX_BATCH_EVENTS
    assert len(second) == 11
    assert second[-1].type == END


async def test_records_entering_and_leaving_the_filter_are_added_and_deleted() -> None:
    store = Store()
    hub = WatchHub(store)
    flt = Filter.from_proto(cs.ConnectionFilter(states=[OPEN]))
    watcher = hub.watch(flt=flt)
    base = store.revision
    store.apply(
        [
            server("x", state=CLOSED, hook=pb.HOOK_SERVER_CONNECT),  # +1: unseen
            server("x", state=OPEN),  # +2: enters -> ADDED
            server("x", state=OPEN, hook=pb.HOOK_TLS_ESTABLISHED_SERVER),  # +3: MODIFIED
            server("x", state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED),  # +4: leaves -> DELETED
            server("y", state=OPEN),  # +5: new, matching -> ADDED
        ]
    )
    events = await drain(watcher)
    assert [(e.type, e.revision, _id(e)) for e in events] == [
        (ADDED, base + 2, "x"),
        (MODIFIED, base + 3, "x"),
        (DELETED, base + 4, "x"),
        (ADDED, base + 5, "y"),
    ]
    assert events[2].connection.server.connection.state == CLOSED  # the version that left
    assert watcher.last_revision == base + 5


async def test_store_deletion_reaches_watchers_as_deleted_with_the_last_version() -> None:
    from tests.snapshots import FakeClock

    clock = FakeClock()
    store = Store(clock=clock, closed_retention_seconds=1)
    hub = WatchHub(store)
    base = store.revision
    store.apply([server("gone", state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED)])
    watcher = hub.watch()
    clock.now += 2
    store.expire()
    [event] = await drain(watcher)
    assert (event.type, event.revision, event.connection.metadata.revision) == (
        DELETED,
        base + 2,
        base + 1,
    )


async def test_bookmark_is_sent_when_idle_at_the_current_revision() -> None:
    store = Store()
    hub = WatchHub(store, bookmark_interval=0.01)
    flt = Filter.from_proto(cs.ConnectionFilter(host="never.example"))
    base = store.revision
    watcher = hub.watch(allow_bookmarks=True, flt=flt)
    store.apply([server(next_id()) for _ in range(3)])  # none match
    events = decode(await asyncio.wait_for(watcher.next(), 1))
    assert [(e.type, e.revision) for e in events] == [(BOOKMARK, base + 3)]
    assert watcher.last_revision == base + 3


async def test_no_bookmarks_unless_allowed() -> None:
    hub = WatchHub(Store(), bookmark_interval=0.001)
    watcher = hub.watch()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(watcher.next(), 0.05)


async def test_slow_watcher_is_evicted_and_others_get_everything() -> None:
    store = Store()
    hub = WatchHub(store, max_lag=10)
    base = store.revision
    slow = hub.watch()
    fast = hub.watch()
    got: list[int] = []
    for _ in range(5):
        store.apply([server(next_id()) for _ in range(4)])
        got.extend(e.revision for e in await drain(fast))
    assert got == list(range(base + 1, base + 21))
    with pytest.raises(Evicted) as info:
        await slow.next()
    # It delivered nothing: its resume point is where it started (not 0, "from now").
    assert info.value.last_revision == base
    assert hub.watcher_count == 1
    assert hub.evictions == {"slow_consumer": 1, "write_timeout": 0}
    resumed = hub.watch(start_after_revision=info.value.last_revision)
    assert [e.revision for e in await drain(resumed)] == got


async def test_resuming_an_evicted_watcher_from_its_last_revision_loses_nothing() -> None:
    store = Store()
    hub = WatchHub(store, max_lag=8)
    base = store.revision
    watcher = hub.watch()
    seen: list[int] = []
    store.apply([server(next_id()) for _ in range(5)])
    seen.extend(e.revision for e in await drain(watcher))
    for _ in range(4):
        # Unread: the first change is not lag, the 12 events behind it are > max_lag.
        store.apply([server(next_id()) for _ in range(4)])
    with pytest.raises(Evicted) as info:
        await watcher.next()
    assert info.value.last_revision == base + 5
    resumed = hub.watch(start_after_revision=info.value.last_revision)
    seen.extend(e.revision for e in await drain(resumed))
    assert seen == list(range(base + 1, store.revision + 1))
    assert store.revision == base + 21


async def test_a_replay_longer_than_max_lag_is_not_evicted() -> None:
    store = Store()
    hub = WatchHub(store, max_lag=5)
    base = store.revision
    store.apply([server(next_id()) for _ in range(50)])
    watcher = hub.watch(start_after_revision=base + 1)
    revisions = [e.revision for e in await drain(watcher)]
    assert revisions == list(range(base + 2, base + 51))


async def test_final_bookmark_drains_then_bookmarks_then_ends() -> None:
    store = Store()
    hub = WatchHub(store)
    base = store.revision
    with_bookmarks = hub.watch(allow_bookmarks=True)
    without = hub.watch()
    store.apply([server(next_id()) for _ in range(2)])
    hub.final_bookmark()
    store.apply([server(next_id())])  # after the final bookmark: not sent
    assert [e.revision for e in await drain(with_bookmarks)] == [base + 1, base + 2]
    assert [(e.type, e.revision) for e in await drain(with_bookmarks)] == [(BOOKMARK, base + 2)]
    assert await with_bookmarks.next() == []
    assert [e.revision for e in await drain(without)] == [base + 1, base + 2]
    assert await without.next() == []
    assert hub.watcher_count == 0


async def test_async_iteration_ends_with_the_watch() -> None:
    store = Store()
    hub = WatchHub(store)
    watcher = hub.watch()
    store.apply([server(next_id())])
    hub.final_bookmark()
    batches = [batch async for batch in watcher]
    assert [len(b) for b in batches] == [1]


async def test_closing_a_waiting_watcher_ends_its_next() -> None:
    hub = WatchHub(Store())
    watcher = hub.watch()
    pending = asyncio.ensure_future(watcher.next())
    await asyncio.sleep(0)
    watcher.close()
    assert await asyncio.wait_for(pending, 1) == []
    assert hub.watcher_count == 0


def test_watch_arguments_are_validated() -> None:
    store = Store(history_size=2)
    hub = WatchHub(store)
    base = store.revision
    store.apply([server(next_id()) for _ in range(5)])
    assert store.revision == base + 5
    with pytest.raises(InvalidArgument, match="send_initial_events"):
        hub.watch(start_after_revision=base + 4, send_initial_events=True)
    with pytest.raises(Compacted, match="not in this store's history"):
        hub.watch(start_after_revision=base + 6)
    with pytest.raises(InvalidArgument, match="negative"):
        hub.watch(start_after_revision=-1)
    with pytest.raises(Compacted) as info:
        hub.watch(start_after_revision=base + 2)
    assert info.value.oldest_revision == base + 3
    assert hub.watch(start_after_revision=base + 3).last_revision == base + 3


async def test_every_watcher_shares_one_encoding_per_event_and_view() -> None:
    store = Store()
    hub = WatchHub(store)
    full = [hub.watch() for _ in range(3)]
    basic = hub.watch(basic=True)
    store.apply([server(next_id())])
    batches = [await w.next() for w in full]
    assert batches[0][0] is batches[1][0] is batches[2][0]
    assert (await basic.next())[0] == batches[0][0]  # no certificates: same bytes


async def _drain_to(watcher: Watcher, revision: int) -> list[cs.WatchEvent]:
    events: list[cs.WatchEvent] = []
    while watcher.last_revision < revision:
        events.extend(await drain(watcher))
    return events


async def test_a_retention_sweep_larger_than_max_lag_evicts_nobody_who_keeps_up() -> None:
    from tests.snapshots import FakeClock

    clock = FakeClock()
    store = Store(clock=clock, closed_retention_seconds=1)
    hub = WatchHub(store, max_lag=10)
    base = store.revision
    closed = [next_id() for _ in range(50)]
    store.apply([server(i, state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED) for i in closed])
    resumed = hub.watch(start_after_revision=base)
    assert len(await _drain_to(resumed, base + 50)) == 50  # caught up with its replay
    keeping_up = [
        resumed,
        hub.watch(),
        hub.watch(basic=True),
        hub.watch(flt=Filter.from_proto(cs.ConnectionFilter(states=[CLOSED]))),
    ]
    frozen = hub.watch()
    clock.now += 2
    assert store.expire() == 50  # one change, five times the lag budget
    assert hub.watcher_count == 5
    for watcher in keeping_up:
        events = await _drain_to(watcher, base + 100)
        assert [(e.type, _id(e)) for e in events] == [(DELETED, i) for i in closed]
    # The frozen watcher has not taken the sweep; what piles up behind it is lag.
    later = [server(next_id(), state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED) for _ in range(11)]
    for snapshot in later[:10]:
        store.apply([snapshot])
        for watcher in keeping_up:
            await drain(watcher)
    assert (frozen.lag, hub.watcher_count) == (10, 5)
    store.apply(later[10:])
    with pytest.raises(Evicted) as info:
        await frozen.next()
    assert info.value.last_revision == base + 50
    assert hub.watcher_count == 4
    assert all(w.lag == 0 and w.pending == 1 for w in keeping_up)


async def test_lag_counts_what_waits_behind_the_change_being_taken() -> None:
    store = Store()
    hub = WatchHub(store, max_lag=MAX_BATCH_EVENTS)
    watcher = hub.watch()
    store.apply([server(next_id()) for _ in range(3 * MAX_BATCH_EVENTS)])
    assert (watcher.pending, watcher.lag) == (3 * MAX_BATCH_EVENTS, 0)
    await drain(watcher)  # a third of the big change taken, the rest is not lag
    store.apply([server(next_id()) for _ in range(MAX_BATCH_EVENTS)])
    assert (watcher.pending, watcher.lag) == (3 * MAX_BATCH_EVENTS, MAX_BATCH_EVENTS)
    await drain(watcher)
    await drain(watcher)  # the big change is done: the next one is being taken
    assert (watcher.pending, watcher.lag) == (MAX_BATCH_EVENTS, 0)
    store.apply([server(next_id())])
    assert watcher.lag == 1
    assert len(await drain(watcher)) == MAX_BATCH_EVENTS
    assert len(await drain(watcher)) == 1
    assert (watcher.pending, watcher.lag, hub.watcher_count) == (0, 0, 1)


async def _never_written(response: bytes) -> None:
    """A write to a client that stopped reading: it never completes."""
    await asyncio.Event().wait()


async def test_a_write_blocked_for_write_timeout_ends_the_watch() -> None:
    store = Store()
    hub = WatchHub(store, write_timeout=0.05)
    base = store.revision
    watcher = hub.watch()
    store.apply([server(next_id())])
    response = await watcher.next_response()
    with pytest.raises(Evicted) as info:
        await asyncio.wait_for(watcher.send(_never_written, response), 10)  # liveness only
    # Its status goes out behind the blocked response: resume after that one.
    assert info.value.last_revision == base + 1
    assert hub.watcher_count == 0
    assert hub.evictions == {"slow_consumer": 0, "write_timeout": 1}
    store.apply([server(next_id())])
    assert watcher.pending == 0  # dropped: holds nothing any more


async def test_eviction_ends_a_blocked_write_at_once() -> None:
    store = Store()
    hub = WatchHub(store, max_lag=2, write_timeout=3600)
    watcher = hub.watch()
    store.apply([server(next_id())])
    sending = asyncio.create_task(watcher.send(_never_written, await watcher.next_response()))
    await asyncio.sleep(0)
    store.apply([server(next_id()) for _ in range(2)])  # the change being taken: not lag
    store.apply([server(next_id()) for _ in range(3)])  # 3 > max_lag behind it
    with pytest.raises(Evicted):
        await asyncio.wait_for(sending, 10)  # liveness only
    assert hub.watcher_count == 0


async def test_cancelling_a_blocked_write_from_outside_stays_a_cancellation() -> None:
    store = Store()
    hub = WatchHub(store, write_timeout=3600)
    watcher = hub.watch()
    store.apply([server(next_id())])
    sending = asyncio.create_task(watcher.send(_never_written, await watcher.next_response()))
    await asyncio.sleep(0)
    sending.cancel()  # as grpc does when the client goes away
    with pytest.raises(asyncio.CancelledError):
        await sending
    assert hub.watcher_count == 1  # the caller closes it, as for any ended call


async def _written(response: bytes) -> None:
    await asyncio.sleep(0)


async def test_events_sent_counts_change_events_written_not_bookmarks_or_markers() -> None:
    store = Store()
    store.apply([server(next_id()) for _ in range(3)])
    hub = WatchHub(store, bookmark_interval=0.01)
    watcher = hub.watch(send_initial_events=True, allow_bookmarks=True)
    await watcher.send(_written, await watcher.next_response())  # 3 ADDED + INITIAL_EVENTS_END
    assert hub.events_sent == 3
    store.apply([server(next_id()) for _ in range(2)])
    await watcher.send(_written, await watcher.next_response())
    assert hub.events_sent == 5
    bookmark = await asyncio.wait_for(watcher.next_response(), 1)
    assert [e.type for e in cs.WatchConnectionsResponse.FromString(bookmark).events] == [BOOKMARK]
    await watcher.send(_written, bookmark)
    assert hub.events_sent == 5
    store.apply([server(next_id())])
    await watcher.next_response()  # taken but never written: not sent
    assert hub.events_sent == 5
