"""The state file: a store saved change by change comes back the same, and a file
that is not a connmeta state file is refused untouched."""

from __future__ import annotations

import datetime
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from connmeta.records import EventType, Record
from connmeta.state_file import FILE_NAME, StateError, StateFile, open_store
from connmeta.store import Compacted, Filter, Store
from connmeta.v1 import connection_pb2 as pb
from tests.snapshots import CLOSED, FakeClock, address, client, next_id, server

BOOT = "boot-1"


def opened(directory: Path, **options: Any) -> tuple[Store, StateFile]:
    options.setdefault("boot", BOOT)
    return open_store(directory, **options)


def reopened(directory: Path, state: StateFile, **options: Any) -> Store:
    """The store as a restarted sidecar finds it (the old one just vanishes)."""
    state.close()
    store, _ = opened(directory, **options)
    return store


def _certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "origin.example")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


def busy(store: Store, clock: FakeClock) -> None:
    """Every kind of change a store makes: adds, modifies, settles, resyncs, deletes."""
    der = _certificate()
    tls = server(next_id(), client_id="c-1", sni="origin.example")
    tls.server.connection.certificate_list.add(der=der)
    mitm = client(next_id())
    mitm.client.mitmcert.der = der
    pending = next_id()
    store.attach_proxy("proxy-a")
    store.apply([client("c-1"), tls, mitm], proxy="proxy-a")
    store.apply([server(pending, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)], proxy="proxy-a")
    store.update_server(pending, address=address(("new.example", 8443)), via=None, mask=["address"])
    settled = next_id()
    store.apply([server(settled, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)], proxy="proxy-b")
    store.update_server(settled, address=address(("b.example", 1)), via=None, mask=["address"])
    store.apply([server(settled, hook=pb.HOOK_SERVER_CONNECTED)], proxy="proxy-b")
    for _ in range(5):
        id = next_id()
        store.apply([client(id)], proxy="proxy-b")
        clock.now += 10
        store.apply([client(id, state=CLOSED, hook=pb.HOOK_CLIENT_DISCONNECTED)], proxy="proxy-b")
    resync = store.begin_resync("proxy-a")
    store.apply([client("c-1")], proxy="proxy-a")
    store.end_resync(resync)
    clock.now += 1000
    store.apply([client(next_id(), state=CLOSED, hook=pb.HOOK_CLIENT_DISCONNECTED)])
    assert store.expire() > 0


def events(store: Store) -> list[tuple[int, EventType, bytes, bytes | None]]:
    return [
        (e.revision, e.type, e.record.data, e.prev.data if e.prev else None)
        for e in store.events_after(store.oldest_revision)
    ]


def contents(store: Store) -> dict[str, bytes]:
    return {r.id: r.data for r in store.snapshot()[0]}


# -- a saved store comes back the same -------------------------------------------------


def test_a_reopened_store_has_the_same_records_history_incarnation_and_revision(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    store, state = opened(tmp_path, clock=clock, closed_retention_count=3)
    busy(store, clock)
    again = reopened(tmp_path, state, clock=clock, closed_retention_count=3)
    assert contents(again) == contents(store)
    assert (again.incarnation, again.revision, again.oldest_revision) == (
        store.incarnation,
        store.revision,
        store.oldest_revision,
    )
    assert events(again) == events(store)


def test_the_next_change_after_a_reopen_gets_the_next_revision(tmp_path: Path) -> None:
    store, state = opened(tmp_path)
    store.apply([client(next_id())])
    last = store.revision
    again = reopened(tmp_path, state)
    id = next_id()
    again.apply([client(id)])
    record = again.get(id)
    assert record is not None
    assert record.revision == last + 1


def test_a_watch_resumed_from_before_the_reopen_gets_each_later_event_once(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    store, state = opened(tmp_path, clock=clock)
    store.apply([client(next_id())])
    seen = store.revision
    busy(store, clock)
    expected = [(e.revision, e.type, e.record.data) for e in store.events_after(seen)]
    again = reopened(tmp_path, state, clock=clock)
    assert [(e.revision, e.type, e.record.data) for e in again.events_after(seen)] == expected


def test_record_from_data_derives_what_the_store_indexes(tmp_path: Path) -> None:
    clock = FakeClock()
    store, _ = opened(tmp_path, clock=clock)
    busy(store, clock)
    records = [e.record for e in store.events_after(store.oldest_revision)]
    records += [e.prev for e in store.events_after(store.oldest_revision) if e.prev is not None]
    assert {r.has_certificates for r in records} == {True, False}
    assert {r.has_pending for r in records} == {True, False}
    assert {r.has_last_change for r in records} == {True, False}
    assert {r.terminal for r in records} == {True, False}
    for record in records:
        derived = Record.from_data(record.data)
        assert (derived.id, derived.client_id, derived.proxy, derived._bits) == (
            record.id,
            record.client_id,
            record.proxy,
            record._bits,
        ), record
        assert (derived.host, derived.port, derived.sni) == (record.host, record.port, record.sni)


def test_derived_state_is_rebuilt_pending_ids_and_retention_order(tmp_path: Path) -> None:
    clock = FakeClock()
    store, state = opened(tmp_path, clock=clock, closed_retention_seconds=100)
    closed = [next_id() for _ in range(3)]
    for id in closed:
        store.apply([client(id, state=CLOSED, hook=pb.HOOK_CLIENT_DISCONNECTED)])
        clock.now += 60
    pending = next_id()
    store.apply([server(pending, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)], proxy="p")
    store.update_server(pending, address=address(("x.example", 1)), via=None, mask=["address"])
    again = reopened(tmp_path, state, clock=clock, closed_retention_seconds=100)
    assert [r.id for r in again.pending_records("p")] == [pending]
    assert [r.id for r in again.list(Filter(), limit=10)[0]] == sorted(contents(store))
    # The first two closed 180 s and 120 s ago, the third 60 s ago: retention
    # deletes exactly the two, oldest first, as the original store would.
    assert again.expire() == 2
    deleted = again.events_after(again.revision - 2)
    assert [(e.type, e.record.id) for e in deleted] == [
        (EventType.DELETED, closed[0]),
        (EventType.DELETED, closed[1]),
    ]


def test_page_token_key_is_kept(tmp_path: Path) -> None:
    _, state = opened(tmp_path)
    key = state.token_key
    state.close()
    _, again = opened(tmp_path)
    assert again.token_key == key
    assert len(key) == 32


# -- the saved history follows the store's bound -----------------------------------------


def test_saved_history_is_bounded_like_the_stores_and_keeps_one_row_per_live_id(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    store, state = opened(tmp_path, history_size=20, clock=clock)
    ids = [next_id() for _ in range(10)]
    store.apply([client(id) for id in ids])
    for round in range(30):
        store.apply([client(ids[round % 10], state=CLOSED, hook=pb.HOOK_CLIENT_DISCONNECTED)])
        store.apply([client(ids[round % 10])])
    gone = ids.pop()
    store.apply([client(gone, state=CLOSED, hook=pb.HOOK_CLIENT_DISCONNECTED)])
    clock.now += 1000
    assert store.expire() == 1
    for _ in range(25):  # push the deletion out of the history
        store.apply([client(ids[0], state=CLOSED, hook=pb.HOOK_CLIENT_DISCONNECTED)])
        store.apply([client(ids[0])])
    saved = sqlite3.connect(tmp_path / FILE_NAME)
    (rows,) = saved.execute("SELECT count(*) FROM changes").fetchone()
    saved.close()
    assert rows <= 20 + len(ids), "history plus at most one older row per live id"
    again = reopened(tmp_path, state, history_size=20, clock=clock)
    assert contents(again) == contents(store)
    assert gone not in contents(again)
    assert events(again) == events(store)


def test_a_smaller_history_size_on_reopen_keeps_the_newest_events(tmp_path: Path) -> None:
    store, state = opened(tmp_path, history_size=50)
    for _ in range(30):
        store.apply([client(next_id())])
    again = reopened(tmp_path, state, history_size=10)
    assert events(again) == events(store)[-10:]
    with pytest.raises(Compacted):
        again.events_after(store.revision - 11)


# -- after a reboot: another history ----------------------------------------------------


def test_after_a_reboot_records_stay_under_a_new_incarnation_without_history(
    tmp_path: Path,
) -> None:
    store, state = opened(tmp_path)
    store.apply([client(next_id()) for _ in range(3)])
    key = state.token_key
    again = reopened(tmp_path, state, boot="boot-2")
    assert contents(again) == contents(store)
    assert again.incarnation != store.incarnation
    assert again.revision > store.revision
    assert again.events_after(again.oldest_revision) == []
    with pytest.raises(Compacted):
        again.events_after(store.revision)
    _, third = opened(tmp_path, boot="boot-2")
    assert third.incarnation == again.incarnation, "one reboot, one new incarnation"
    assert third.token_key != key


# -- failures --------------------------------------------------------------------------


def test_a_failed_write_is_reported_with_the_file_before_any_listener_runs(
    tmp_path: Path,
) -> None:
    failures: list[tuple[Path, sqlite3.Error]] = []
    store, state = opened(tmp_path, on_failure=lambda p, e: failures.append((p, e)))
    heard: list[object] = []
    store.subscribe(lambda events: heard.append(failures[:]))
    state._db.close()
    store.apply([client(next_id())])
    assert [p for p, _ in failures] == [tmp_path / FILE_NAME]
    assert heard == [failures], "the failure is handled before watchers hear of the change"


def _sqlite_of_another_application(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()


def _newer_schema(path: Path) -> None:
    opened(path.parent)[1].close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 2")
    db.close()


def _truncated(path: Path) -> None:
    store, state = opened(path.parent)
    for _ in range(40):
        store.apply([client(next_id()) for _ in range(50)])
    state.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a database at all\n" * 100)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_garbage, "is not a connmeta state file (not an SQLite database)"),
        (_sqlite_of_another_application, "an SQLite database of another application"),
        (_newer_schema, "schema version 2, newer than this connmeta understands (1)"),
        (_truncated, "is damaged"),
    ],
    ids=["garbage", "foreign-sqlite", "newer-schema", "truncated"],
)
def test_a_file_that_is_not_a_usable_state_file_is_refused_naming_it_and_left_untouched(
    tmp_path: Path, make: Any, says: str
) -> None:
    path = tmp_path / FILE_NAME
    make(path)
    before = path.read_bytes()
    with pytest.raises(StateError) as raised:
        opened(tmp_path)
    assert str(path) in str(raised.value)
    assert says in str(raised.value)
    assert path.read_bytes() == before


def test_saved_history_follows_the_stores_byte_bound(tmp_path: Path) -> None:
    store, state = opened(tmp_path, history_bytes=20_000)
    for _ in range(100):
        store.apply([client(next_id())])
    kept = events(store)
    assert 0 < len(kept) < 100, "the byte bound, not the count, trimmed the history"
    again = reopened(tmp_path, state, history_bytes=20_000)
    assert events(again) == kept
    assert contents(again) == contents(store)


def test_a_proxy_that_does_not_come_back_after_a_restart_has_its_records_closed(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    store, state = opened(tmp_path, clock=clock)
    id = next_id()
    store.attach_proxy("gone")
    store.apply([client(id)], proxy="gone")
    again = reopened(tmp_path, state, clock=clock)
    clock.now += 60
    assert again.close_gone_proxies(30) == 1
    record = again.get(id)
    assert record is not None
    assert (record.state, record.last_hook) == (CLOSED, pb.HOOK_PROXY_GONE)


def test_a_restored_store_lists_by_every_index_what_the_saved_one_listed(tmp_path: Path) -> None:
    """After a restart the indexes are rebuilt from the saved records: a List
    by kind, state, client id or host (and writes after the restart) must
    select what the store before it selected."""
    store, state = opened(tmp_path)
    ids = [next_id() for _ in range(12)]
    for i, id in enumerate(ids):
        store.apply(
            [
                server(
                    id,
                    client_id=ids[0],
                    state=CLOSED if i % 3 == 0 else pb.CONNECTION_STATE_OPEN,
                    addr=(f"h{i % 4}.example.com", 443),
                    sni=f"s{i % 2}.example.org",
                )
            ]
        )
    store.apply([client(next_id())])
    filters = [
        Filter(),
        Filter(states=frozenset({CLOSED})),
        Filter(client_id=ids[0]),
        Filter(host="h1.example.com"),
        Filter(host="*.example.com", states=frozenset({CLOSED})),
        Filter(sni="s1.example.org"),
    ]

    def listed(s: Store) -> list[list[str]]:
        return [[r.id for r in s.list(f, limit=100)[0]] for f in filters]

    before = listed(store)
    again = reopened(tmp_path, state)
    assert listed(again) == before
    # Writes after the restart keep the rebuilt indexes current (the saved
    # store is not written to any more: the file is the restored one's now).
    again.apply([server(ids[5], client_id=ids[0], addr=("h1.example.com", 443))])
    records = again.snapshot()[0]
    assert listed(again) == [sorted(r.id for r in records if f.matches(r)) for f in filters]
