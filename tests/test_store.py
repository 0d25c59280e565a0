"""The store: revisions, etags, metadata, list pagination, history, retention, resync, updates."""

from __future__ import annotations

import datetime
import random
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from connmeta.store import (
    Compacted,
    ConnectionOpen,
    EtagMismatch,
    Event,
    EventType,
    Filter,
    InvalidArgument,
    Kind,
    NotFound,
    Record,
    Store,
    encode_field,
    encode_repeated,
)
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import report_service_pb2 as rs
from tests.snapshots import (
    CLOSED,
    OPEN,
    FakeClock,
    address,
    client,
    next_id,
    server,
    via_spec,
)


def recorder(store: Store) -> list[Event]:
    events: list[Event] = []
    store.subscribe(events.extend)
    return events


def update(store: Store, id: str, **kwargs: object) -> Record:
    args: dict[str, object] = {
        "address": None,
        "via": None,
        "mask": frozenset({"address"}),
        "etag": "",
        "actor": "tester",
    }
    args.update(kwargs)
    return store.update_server(id, **args)  # type: ignore[arg-type]


# -- revisions, etags, metadata ---------------------------------------------------


def test_each_snapshot_gets_the_next_revision() -> None:
    store = Store()
    events = recorder(store)
    a, b = next_id(), next_id()
    base = store.revision
    assert store.apply([client(a), server(b, client_id=a, state=CLOSED)]) == []
    assert store.revision == base + 2
    store.apply([server(b, client_id=a, state=OPEN)])
    assert store.revision == base + 3
    assert [(e.revision, e.type, e.record.id) for e in events] == [
        (base + 1, EventType.ADDED, a),
        (base + 2, EventType.ADDED, b),
        (base + 3, EventType.MODIFIED, b),
    ]
    assert events[2].prev is events[1].record


def test_etag_and_metadata_follow_each_change() -> None:
    clock = FakeClock(1_700_000_000.25)
    store = Store(clock=clock)
    c, s = next_id(), next_id()
    base = store.revision
    store.apply([client(c), server(s, client_id=c, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)])
    first = store.get(s)
    assert first is not None
    clock.now += 1
    store.apply([server(s, client_id=c, state=OPEN)])
    second = store.get(s)
    assert second is not None
    assert (first.etag, second.etag) == (f'"{base + 2}"', f'"{base + 3}"')
    meta = second.message().metadata
    assert meta.revision == base + 3
    assert meta.create_revision == base + 2
    assert meta.etag == f'"{base + 3}"'
    assert meta.client_id == c
    assert meta.last_hook == pb.HOOK_SERVER_CONNECTED
    assert meta.update_time.ToNanoseconds() == 1_700_000_001_250_000_000
    assert second.kind is Kind.SERVER
    assert second.state == OPEN
    assert second.client_id == c
    client_record = store.get(c)
    assert client_record is not None
    assert client_record.client_id == c
    assert client_record.message().metadata.client_id == ""


def test_record_data_holds_the_reported_connection_unchanged() -> None:
    store = Store()
    snap = server(next_id(), sni="origin.example", via=("http", ("p.example", 3128)))
    store.apply([snap])
    record = store.get(snap.server.connection.id)
    assert record is not None
    assert record.message().server == snap.server
    assert record.basic() is record.data  # no certificates: BASIC is FULL


def test_identical_snapshot_is_skipped_without_a_revision() -> None:
    store = Store()
    events = recorder(store)
    snap = server(next_id())
    base = store.revision
    store.apply([snap])
    store.apply([snap])
    resync = server(snap.server.connection.id, hook=pb.HOOK_RESYNC)
    store.apply([resync])
    assert store.revision == base + 1
    assert len(events) == 1
    other_hook = server(snap.server.connection.id, hook=pb.HOOK_TLS_ESTABLISHED_SERVER)
    store.apply([other_hook])
    assert store.revision == base + 2


def test_malformed_snapshot_is_refused_alone_naming_its_index() -> None:
    store = Store()
    events = recorder(store)
    good, later = server(next_id()), server(next_id())
    no_id = server("")
    base = store.revision
    (rejection,) = store.apply([good, no_id, later])
    assert (rejection.index, rejection.reason) == (1, "INVALID_SNAPSHOT")
    assert rejection.violations == [("snapshots[1].server.connection.id", "required")]
    assert store.revision == base + 2, "the snapshots before and after it are applied"
    assert [e.record.id for e in events] == [good.server.connection.id, later.server.connection.id]


@pytest.mark.parametrize(
    ("snapshot", "field"),
    [
        (server("s-1", client_id=""), "snapshots[0].client_id"),
        (server("s-1", hook=99), "snapshots[0].hook"),
        (server("s-1", state=7), "snapshots[0].server.connection.state"),
        (client(""), "snapshots[0].client.connection.id"),
    ],
)
def test_malformed_snapshot_is_refused_naming_the_field(snapshot: object, field: str) -> None:
    store = Store()
    (rejection,) = store.apply([snapshot])  # type: ignore[list-item]
    assert [f for f, _ in rejection.violations] == [field]
    assert len(store) == 0


def test_snapshot_without_connection_is_refused() -> None:
    from connmeta.v1 import report_service_pb2 as rs

    (rejection,) = Store().apply([rs.ConnectionSnapshot(hook=pb.HOOK_SERVER_CONNECT)])
    assert rejection.violations[0][0] == "snapshots[0].connection"


def test_id_reported_as_the_other_kind_is_refused_and_keeps_its_kind() -> None:
    store = Store()
    id = next_id()
    store.apply([client(id)])
    (rejection,) = store.apply([server(id)])
    assert rejection.reason == "CONNECTION_KIND_CONFLICT"
    record = store.get(id)
    assert record is not None
    assert record.kind is Kind.CLIENT


def test_id_held_by_a_live_proxy_is_refused_to_another_until_it_leaves() -> None:
    store = Store()
    id = next_id()
    store.attach_proxy("proxy-a")
    store.apply([client(id)], proxy="proxy-a")
    (rejection,) = store.apply([client(id, sni="b")], proxy="proxy-b")
    assert rejection.reason == "CONNECTION_OWNED_BY_OTHER_PROXY"
    store.detach_proxy("proxy-a")
    assert store.apply([client(id, sni="b")], proxy="proxy-b") == []
    record = store.get(id)
    assert record is not None
    assert record.proxy == "proxy-b"
    assert record.message().metadata.proxy_id == "proxy-b"


def _certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "origin.example")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(12345)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


def test_certificates_are_described_and_left_out_of_the_basic_view() -> None:
    store = Store()
    snap = server(next_id())
    snap.server.connection.certificate_list.add(der=_certificate())
    store.apply([snap])
    record = store.get(snap.server.connection.id)
    assert record is not None
    assert record.has_certificates
    cert = record.message().server.connection.certificate_list[0]
    assert cert.subject_common_name == "origin.example"
    assert cert.serial_number == "12345"
    basic = pb.ConnectionRecord.FromString(record.basic())
    assert len(basic.server.connection.certificate_list) == 0
    assert basic.metadata == record.message().metadata


def test_malformed_certificate_is_refused_naming_the_entry() -> None:
    snap = server(next_id())
    snap.server.connection.certificate_list.add(der=b"not a certificate")
    (rejection,) = Store().apply([snap])
    assert rejection.violations[0][0] == "snapshots[0].server.connection.certificate_list[0].der"


def test_encode_repeated_and_encode_field_splice_like_protobuf() -> None:
    store = Store()
    ids = [next_id() for _ in range(3)]
    store.apply([server(i) for i in ids])
    records = [store.get(i) for i in ids]
    chunks = [r.data for r in records if r is not None]
    spliced = encode_repeated(1, chunks) + encode_field(2, b"tok")
    response = cs.ListConnectionsResponse.FromString(spliced)
    assert [c.server.connection.id for c in response.connections] == ids
    assert response.next_page_token == "tok"
    big = b"x" * 300  # a two-byte length varint
    assert cs.GetConnectionResponse.FromString(encode_field(1, big)) is not None


# -- get and list ---------------------------------------------------------------


def test_get_unknown_id_is_none() -> None:
    assert Store().get("nope") is None


def _ids(records: Sequence[Record]) -> list[str]:
    return [r.id for r in records]


def test_list_returns_matching_records_in_id_order() -> None:
    store = Store()
    c = next_id("c")
    snaps = [
        client(c),
        server("s-b", client_id=c, addr=("api.example.com", 443), sni="api.example.com"),
        server("s-a", client_id=c, addr=("example.com", 80), state=CLOSED),
        server("s-c", client_id="other", addr=("x.Example.COM", 443)),
    ]
    base = store.revision
    store.apply(snaps)
    everything, revision, more = store.list(Filter(), limit=100)
    assert _ids(everything) == sorted([c, "s-a", "s-b", "s-c"])
    assert (revision, more) == (base + 4, False)

    def ids_for(**kwargs: object) -> list[str]:
        flt = Filter.from_proto(cs.ConnectionFilter(**kwargs))  # type: ignore[arg-type]
        return _ids(store.list(flt, limit=100)[0])

    assert ids_for(kind=cs.CONNECTION_KIND_SERVER) == ["s-a", "s-b", "s-c"]
    assert ids_for(kind=cs.CONNECTION_KIND_CLIENT) == [c]
    assert ids_for(states=[CLOSED]) == ["s-a"]
    assert ids_for(host="*.example.com") == ["s-b", "s-c"]
    assert ids_for(host="EXAMPLE.com") == ["s-a"]
    assert ids_for(host="*.example.com", port=443) == ["s-b", "s-c"]
    assert ids_for(port=80) == ["s-a"]
    assert ids_for(sni="api.example.com") == ["s-b"]
    assert ids_for(client_id=c) == [c, "s-a", "s-b"]
    assert ids_for(host="198.51.100.7", kind=cs.CONNECTION_KIND_CLIENT) == [c]


def test_list_pages_stay_pinned_to_the_first_pages_revision_while_writes_happen() -> None:
    clock = FakeClock()
    store = Store(clock=clock, closed_retention_seconds=10)
    ids = [f"id-{i:03d}" for i in range(50)]
    store.apply([server(i, state=OPEN) for i in ids])
    expected = {i: store.get(i) for i in ids}
    rng = random.Random(7)
    seen: list[Record] = []
    page, pinned, more = store.list(Filter(), limit=7)
    seen.extend(page)
    while more:
        # Modify, add, close and delete records, before and after the cursor.
        victim = rng.choice(ids)
        store.apply([server(victim, state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED)])
        store.apply([server(f"id-{rng.randrange(1000):03d}x")])
        clock.now += 11
        store.expire()
        page, revision, more = store.list(
            Filter(), after_id=seen[-1].id, limit=7, at_revision=pinned
        )
        assert revision == pinned
        seen.extend(page)
    assert _ids(seen) == ids
    assert all(r is expected[r.id] for r in seen)
    assert store.revision > pinned


def test_filtered_list_pinned_to_a_revision_filters_the_old_versions() -> None:
    store = Store()
    store.apply([server("a", state=OPEN), server("b", state=CLOSED)])
    flt = Filter.from_proto(cs.ConnectionFilter(states=[OPEN]))
    _, pinned, _ = store.list(flt, limit=1)
    store.apply([server("a", state=CLOSED), server("b", state=OPEN)])
    assert _ids(store.list(flt, limit=10, at_revision=pinned)[0]) == ["a"]
    assert _ids(store.list(flt, limit=10)[0]) == ["b"]


def test_list_page_from_a_compacted_revision_is_compacted() -> None:
    store = Store(history_size=5)
    base = store.revision
    store.apply([server(next_id()) for _ in range(10)])
    assert store.oldest_revision == base + 5
    with pytest.raises(Compacted) as info:
        store.list(Filter(), limit=1, at_revision=base + 4)
    assert (info.value.requested_revision, info.value.oldest_revision) == (base + 4, base + 5)
    assert len(store.list(Filter(), limit=100, at_revision=base + 5)[0]) == 5


def test_list_page_from_a_revision_ahead_of_the_store_is_out_of_its_history() -> None:
    store = Store()
    with pytest.raises(Compacted, match="not in this store's history") as info:
        store.list(Filter(), limit=1, at_revision=store.revision + 1)
    assert info.value.ahead


def test_last_page_reports_no_more() -> None:
    store = Store()
    store.apply([server(f"x{i}") for i in range(4)])
    page, _, more = store.list(Filter(), limit=4)
    assert len(page) == 4
    assert not more
    page, _, more = store.list(Filter(), limit=3)
    assert len(page) == 3
    assert more


# -- history ----------------------------------------------------------------------


def test_new_store_starts_from_the_clock_in_microseconds_under_a_new_incarnation() -> None:
    clock = FakeClock(1_700_000_000.25)
    first, second = Store(clock=clock), Store(clock=clock)
    assert first.revision == 1_700_000_000_250_000
    assert first.incarnation != second.incarnation
    clock.now += 1.0  # a restart a second later starts above what the first issued
    first.apply([client(next_id()) for _ in range(1000)])
    assert Store(clock=clock).revision > first.revision


def test_fresh_store_lists_at_its_own_revision_so_a_listing_can_be_resumed() -> None:
    # Revision 0 means "from now" to a watch: an empty store must never list at 0,
    # or a list-then-watch client would lose the first change.
    store = Store(clock=FakeClock(1.0))
    assert (store.revision, store.oldest_revision) == (1_000_000, 1_000_000)
    records, listed, more = store.list(Filter(), limit=10)
    assert (records, listed, more) == ([], 1_000_000, False)
    assert store.events_after(listed) == []
    id = next_id()
    store.apply([server(id)])
    [event] = store.events_after(listed)
    assert (event.revision, event.type, event.record.id, event.prev) == (
        1_000_001,
        EventType.ADDED,
        id,
        None,
    )
    assert (event.record.revision, event.record.create_revision, event.record.etag) == (
        1_000_001,
        1_000_001,
        '"1000001"',
    )
    # A page pinned to the empty listing still shows the store as it was then.
    assert store.list(Filter(), limit=10, at_revision=listed) == ([], 1_000_000, False)
    assert store.oldest_revision == 1_000_000


def test_events_after_returns_exactly_the_later_events() -> None:
    store = Store(history_size=100)
    base = store.revision
    store.apply([server(next_id()) for _ in range(10)])
    assert [e.revision for e in store.events_after(base + 6)] == [
        base + 7,
        base + 8,
        base + 9,
        base + 10,
    ]
    assert store.events_after(base + 10) == []
    assert [e.revision for e in store.events_after(base)] == list(range(base + 1, base + 11))


def test_events_after_a_compacted_revision_is_compacted() -> None:
    store = Store(history_size=3)
    base = store.revision
    store.apply([server(next_id()) for _ in range(10)])
    assert store.oldest_revision == base + 7
    assert [e.revision for e in store.events_after(base + 7)] == [base + 8, base + 9, base + 10]
    with pytest.raises(Compacted):
        store.events_after(base + 6)


def test_unsubscribed_listener_gets_nothing_more() -> None:
    store = Store()
    events: list[Event] = []
    unsubscribe = store.subscribe(events.extend)
    store.apply([server(next_id())])
    unsubscribe()
    store.apply([server(next_id())])
    assert len(events) == 1


# -- retention ----------------------------------------------------------------------


def test_terminal_records_expire_after_the_retention_time() -> None:
    clock = FakeClock()
    store = Store(clock=clock, closed_retention_seconds=60)
    events = recorder(store)
    done, open_ = next_id(), next_id()
    base = store.revision
    store.apply([server(done, state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED), server(open_)])
    clock.now += 59
    assert store.expire() == 0
    clock.now += 1
    assert store.expire() == 1
    assert store.get(done) is None
    assert store.get(open_) is not None
    deleted = events[-1]
    assert (deleted.type, deleted.revision, deleted.record.id) == (
        EventType.DELETED,
        base + 3,
        done,
    )
    assert deleted.record.revision == base + 1  # the last version, unchanged
    assert store.revision == base + 3


def test_retention_count_deletes_the_oldest_terminal_records_first() -> None:
    clock = FakeClock()
    store = Store(clock=clock, closed_retention_count=2)
    events = recorder(store)
    ids = [next_id() for _ in range(4)]
    for i in ids:
        clock.now += 1
        store.apply([server(i, state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED)])
    assert store.expire() == 2
    assert [e.record.id for e in events if e.type is EventType.DELETED] == ids[:2]
    assert [store.get(i) is not None for i in ids] == [False, False, True, True]


def test_a_reconnected_record_is_not_expired() -> None:
    clock = FakeClock()
    store = Store(clock=clock, closed_retention_seconds=60)
    id = next_id()
    store.apply([server(id, state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED)])
    store.apply([server(id, state=OPEN, hook=pb.HOOK_SERVER_CONNECTED)])
    clock.now += 3600
    assert store.expire() == 0


def test_expired_id_reported_again_is_added_anew_and_listed_once() -> None:
    clock = FakeClock()
    store = Store(clock=clock, closed_retention_seconds=1)
    base = store.revision
    store.apply([server("a", state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED), server("b")])
    store.list(Filter(), limit=10)
    clock.now += 2
    store.expire()
    events = recorder(store)
    store.apply([server("a")])
    assert events[0].type is EventType.ADDED
    record = store.get("a")
    assert record is not None
    assert record.create_revision == record.revision == base + 4
    assert _ids(store.list(Filter(), limit=10)[0]) == ["a", "b"]


# -- resync ------------------------------------------------------------------------


def test_resync_closes_exactly_the_connections_not_reported() -> None:
    store = Store()
    kept, lost, lost_client, already_closed = next_id(), next_id(), next_id(), next_id()
    store.apply(
        [
            server(kept),
            server(lost),
            client(lost_client),
            server(already_closed, state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED),
        ]
    )
    events = recorder(store)
    resync = store.begin_resync()
    store.apply([server(kept, hook=pb.HOOK_RESYNC)])
    assert store.end_resync(resync) == 2
    assert sorted(e.record.id for e in events) == sorted([lost, lost_client])
    for id in (lost, lost_client):
        record = store.get(id)
        assert record is not None
        assert record.state == CLOSED
        assert record.terminal
        assert record.last_hook == pb.HOOK_RESYNC
        msg = record.message()
        assert msg.metadata.last_hook == pb.HOOK_RESYNC
        assert msg.metadata.revision == record.revision
    kept_record = store.get(kept)
    assert kept_record is not None
    assert kept_record.state == OPEN


def test_resync_closes_only_its_own_proxys_connections() -> None:
    store = Store()
    a_lost, b_live = next_id(), next_id()
    store.apply([client(a_lost)], proxy="proxy-a")
    store.apply([client(b_live)], proxy="proxy-b")
    resync = store.begin_resync("proxy-a")
    assert store.end_resync(resync) == 1
    lost, live = store.get(a_lost), store.get(b_live)
    assert lost is not None
    assert live is not None
    assert (lost.state, live.state) == (CLOSED, OPEN)


def test_overlapping_resyncs_of_two_proxies_are_independent() -> None:
    store = Store()
    a1, a2, b1, b2 = next_id(), next_id(), next_id(), next_id()
    store.apply([client(a1), client(a2)], proxy="proxy-a")
    store.apply([client(b1), client(b2)], proxy="proxy-b")
    ra = store.begin_resync("proxy-a")
    rb = store.begin_resync("proxy-b")
    store.apply([client(a1, hook=pb.HOOK_RESYNC)], proxy="proxy-a")
    store.apply([client(b2, hook=pb.HOOK_RESYNC)], proxy="proxy-b")
    assert store.end_resync(rb) == 1
    assert store.end_resync(ra) == 1
    states = {id: store.get(id).state for id in (a1, a2, b1, b2)}  # type: ignore[union-attr]
    assert states == {a1: OPEN, a2: CLOSED, b1: CLOSED, b2: OPEN}


def test_a_report_on_another_stream_of_the_same_proxy_counts_for_its_resync() -> None:
    store = Store()
    kept = next_id()
    store.apply([client(kept)], proxy="proxy-a")
    resync = store.begin_resync("proxy-a")
    store.apply([client(kept, sni="x")], proxy="proxy-a")  # e.g. the old stream, still open
    assert store.end_resync(resync) == 0


def test_resync_keeps_a_pending_change_of_a_server_it_reports() -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)], proxy="p")
    update(store, id, address=address(("new.example", 443)))
    resync = store.begin_resync("p")
    store.apply([server(id, state=CLOSED, hook=pb.HOOK_RESYNC, sni="s")], proxy="p")
    store.end_resync(resync)
    msg = store.get(id).message()  # type: ignore[union-attr]
    assert msg.server.address == address(("origin.example", 443)), "what the proxy holds"
    assert msg.metadata.pending_change.address == address(("new.example", 443))
    assert msg.metadata.pending_change.status == pb.CHANGE_STATUS_PENDING


def test_resync_settles_the_pending_change_of_a_server_it_no_longer_holds() -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED)], proxy="p")
    update(store, id, address=address(("new.example", 443)))
    store.end_resync(store.begin_resync("p"))
    meta = store.get(id).message().metadata  # type: ignore[union-attr]
    assert not meta.HasField("pending_change")
    assert meta.last_change.status == pb.CHANGE_STATUS_NOT_APPLIED
    assert "no longer holds" in meta.last_change.status_detail


# -- update_server --------------------------------------------------------------------


def test_update_records_a_pending_change_and_keeps_what_the_proxy_holds() -> None:
    clock = FakeClock(1_700_000_100.0)
    store = Store(clock=clock)
    id = next_id()
    base = store.revision
    store.apply([server(id, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)])
    events = recorder(store)
    etag = f'"{base + 1}"'
    record = update(store, id, address=address(("new.example", 8443)), etag=etag, actor="router")
    assert record.revision == base + 2
    assert record.etag == f'"{base + 2}"'
    assert record.has_pending
    msg = record.message()
    assert msg.server.address == address(("origin.example", 443)), "observed, not desired"
    change = msg.metadata.pending_change
    assert (change.actor, list(change.fields), change.revision, change.status) == (
        "router",
        ["address"],
        base + 2,
        pb.CHANGE_STATUS_PENDING,
    )
    assert change.address == address(("new.example", 8443))
    assert change.time.seconds == 1_700_000_100
    assert not msg.metadata.HasField("last_change")
    assert [(e.type, e.record) for e in events] == [(EventType.MODIFIED, record)]


def test_route_outcome_that_applied_the_change_moves_it_to_last_change() -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)])
    update(store, id, address=address(("new.example", 8443)), actor="op")
    applied = server(id, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT, addr=("new.example", 8443))
    applied.route_outcome.kind = rs.ROUTE_OUTCOME_KIND_APPLIED
    applied.route_outcome.applied_fields.append("address")
    store.apply([applied])
    record = store.get(id)
    assert record is not None
    assert not record.has_pending
    msg = record.message()
    assert msg.server.address == address(("new.example", 8443))
    assert (msg.metadata.last_change.status, msg.metadata.last_change.actor) == (
        pb.CHANGE_STATUS_APPLIED,
        "op",
    )


def test_server_that_connects_without_the_change_settles_it_not_applied() -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)])
    update(store, id, address=address(("new.example", 8443)))
    store.apply([server(id, state=OPEN, hook=pb.HOOK_SERVER_CONNECTED)])
    meta = store.get(id).message().metadata  # type: ignore[union-attr]
    assert not meta.HasField("pending_change")
    assert meta.last_change.status == pb.CHANGE_STATUS_NOT_APPLIED
    assert "before the change reached the proxy" in meta.last_change.status_detail


def test_timed_out_route_outcome_settles_the_change_not_applied() -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)])
    update(store, id, address=address(("new.example", 8443)))
    unchanged = server(id, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)
    unchanged.route_outcome.kind = rs.ROUTE_OUTCOME_KIND_TIMED_OUT
    store.apply([unchanged])
    change = store.get(id).message().metadata.last_change  # type: ignore[union-attr]
    assert change.status == pb.CHANGE_STATUS_NOT_APPLIED
    assert "deadline" in change.status_detail


def test_deferred_via_settles_as_deferred() -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)])
    update(store, id, via=via_spec(("http", ("p.example", 3128))), mask=frozenset({"via"}))
    deferred = server(id, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)
    deferred.route_outcome.kind = rs.ROUTE_OUTCOME_KIND_DEFERRED
    deferred.route_outcome.deferred_fields.append("via")
    store.apply([deferred])
    change = store.get(id).message().metadata.last_change  # type: ignore[union-attr]
    assert change.status == pb.CHANGE_STATUS_DEFERRED


def test_last_change_survives_later_reports() -> None:
    store = Store()
    id = next_id()
    base = store.revision
    store.apply([server(id, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)])
    update(store, id, via=via_spec(("http", ("p.example", 3128))), mask=frozenset({"via"}))
    store.apply([server(id, state=OPEN, via=("http", ("p.example", 3128)))])
    store.apply([server(id, state=OPEN, via=("http", ("p.example", 3128)), sni="later")])
    record = store.get(id)
    assert record is not None
    assert record.revision == base + 4
    change = record.message().metadata.last_change
    assert (list(change.fields), change.revision, change.status) == (
        ["via"],
        base + 2,
        pb.CHANGE_STATUS_APPLIED,
    )


def test_update_via_unset_asks_to_remove_the_upstream_proxy() -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=CLOSED, via=("https", ("p.example", 443)))])
    record = update(store, id, via=None, mask=frozenset({"via"}))
    msg = record.message()
    assert msg.server.HasField("via"), "observed until the proxy applies it"
    assert list(msg.metadata.pending_change.fields) == ["via"]
    assert not msg.metadata.pending_change.HasField("via"), "unset: connect directly"


def test_naming_the_current_value_again_withdraws_a_pending_change() -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=CLOSED)])
    update(store, id, address=address(("new.example", 443)))
    record = update(store, id, address=address(("origin.example", 443)))
    assert not record.has_pending
    assert not record.message().metadata.HasField("pending_change")


def test_repeating_a_pending_change_makes_no_revision() -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=CLOSED)])
    first = update(store, id, address=address(("new.example", 443)))
    assert update(store, id, address=address(("new.example", 443)), actor="other") is first


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mask": frozenset()}, "update_mask"),
        ({"mask": frozenset({"sni"})}, "update_mask.paths[0]"),
        ({"mask": frozenset({"address"}), "address": None}, "address"),
        ({"address": address(("h.example", 0))}, "address.port"),
        ({"address": address(("h.example", 70000))}, "address.port"),
        ({"address": address(("", 443))}, "address.host"),
        ({"address": address(("bad host", 443))}, "address.host"),
        ({"address": address(("[::1]", 443))}, "address.host"),
        (
            {"address": pb.Address(host="::1", port=443, scope_id=1)},
            "address.scope_id",
        ),
        (
            {
                "mask": frozenset({"via"}),
                "via": pb.ServerSpec(scheme=pb.SCHEME_TCP, address=address(("p", 1))),
            },
            "via.scheme",
        ),
        ({"mask": frozenset({"via"}), "via": pb.ServerSpec(scheme=pb.SCHEME_HTTP)}, "via.address"),
        (
            {"mask": frozenset({"via"}), "via": via_spec(("http", ("p.example", 0)))},
            "via.address.port",
        ),
    ],
)
def test_update_with_invalid_request_is_invalid_argument(
    kwargs: dict[str, object], field: str
) -> None:
    store = Store()
    id = next_id()
    base = store.revision
    store.apply([server(id, state=CLOSED)])
    if "address" not in kwargs:
        kwargs = {**kwargs, "address": address(("ok.example", 443))}
    with pytest.raises(InvalidArgument) as info:
        update(store, id, **kwargs)
    assert field in [f for f, _ in info.value.violations]
    assert store.revision == base + 1


def test_update_of_a_client_is_invalid_argument() -> None:
    store = Store()
    id = next_id()
    store.apply([client(id)])
    with pytest.raises(InvalidArgument, match="client"):
        update(store, id, address=address(("h.example", 443)))


def test_update_of_unknown_id_is_not_found_but_a_bad_request_is_checked_first() -> None:
    store = Store()
    with pytest.raises(NotFound) as info:
        update(store, "ghost", address=address(("h.example", 443)))
    assert info.value.id == "ghost"
    with pytest.raises(InvalidArgument):
        update(store, "ghost", address=address(("h.example", 0)))


def test_update_with_stale_etag_is_aborted_before_the_guard() -> None:
    store = Store()
    id = next_id()
    base = store.revision
    store.apply([server(id, state=OPEN)])
    current = f'"{base + 1}"'
    with pytest.raises(EtagMismatch) as info:
        update(store, id, address=address(("h.example", 443)), etag='"7"')
    assert (info.value.expected, info.value.actual) == ('"7"', current)
    with pytest.raises(ConnectionOpen):
        update(store, id, address=address(("h.example", 443)), etag=current)


def test_update_address_on_open_server_is_refused() -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=OPEN, addr=("origin.example", 443))])
    with pytest.raises(ConnectionOpen) as info:
        update(store, id, address=address(("elsewhere.example", 443)))
    assert (info.value.field, info.value.current) == ("address", "origin.example:443")


def test_stored_bytes_are_exactly_what_protobuf_would_encode() -> None:
    store = Store()
    c = next_id()
    store.apply([client(c), server(next_id(), client_id=c, sni="s.example")])
    for record in store.list(Filter(), limit=10)[0]:
        assert record.message().SerializeToString() == record.data
        assert record.message().metadata.revision == record.revision


def test_pinned_pages_show_a_record_deleted_after_the_first_page_once() -> None:
    clock = FakeClock()
    store = Store(clock=clock, closed_retention_seconds=10)
    ids = [f"id-{i:02d}" for i in range(20)]
    store.apply([server(i, state=OPEN) for i in ids])
    store.apply([server("id-10", state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED)])
    page, pinned, more = store.list(Filter(), limit=3)
    seen = list(page)
    clock.now += 11
    # One deletion among twenty ids is too few to rebuild the sorted id list:
    # the deleted id stays in it, and the pinned pages bring its old version back.
    assert store.expire() == 1
    while more:
        page, revision, more = store.list(
            Filter(), after_id=seen[-1].id, limit=3, at_revision=pinned
        )
        assert revision == pinned
        seen.extend(page)
    assert _ids(seen) == ids
    assert seen[10].state == CLOSED  # as it was at the pinned revision


# -- memory bounds and vanished proxies ---------------------------------------------


def _big_server(id: str, size: int) -> object:
    snap = server(id)
    snap.server.connection.error = "x" * size  # stands for a certificate chain's bytes
    return snap


def test_history_is_bounded_by_bytes_as_well_as_count() -> None:
    store = Store(history_size=1_000_000, history_bytes=100_000)
    first = store.revision
    store.apply([_big_server(next_id(), 10_000) for _ in range(50)])  # type: ignore[misc]
    assert store.oldest_revision > first, "the oldest events left the history"
    kept = store.revision - store.oldest_revision
    assert 5 <= kept <= 10, kept
    with pytest.raises(Compacted):
        store.events_after(first)
    assert len(store.events_after(store.oldest_revision)) == kept


def test_closed_connections_are_bounded_by_bytes_oldest_first() -> None:
    clock = FakeClock()
    store = Store(clock=clock, closed_retention_bytes=50_000, closed_retention_seconds=3600)
    ids = [next_id() for _ in range(20)]
    for id in ids:
        snap = _big_server(id, 10_000)
        snap.server.connection.state = CLOSED  # type: ignore[attr-defined]
        store.apply([snap])  # type: ignore[list-item]
        clock.now += 1
    store.expire()
    kept = [id for id in ids if store.get(id) is not None]
    assert kept == ids[-len(kept) :], "the oldest go first"
    assert 3 <= len(kept) <= 5, kept


def test_open_connections_of_a_proxy_gone_too_long_are_closed() -> None:
    clock = FakeClock()
    store = Store(clock=clock)
    mine, other = next_id(), next_id()
    store.attach_proxy("p")
    store.attach_proxy("q")
    store.apply([client(mine)], proxy="p")
    store.apply([client(other)], proxy="q")
    store.detach_proxy("p")
    clock.now += 299
    assert store.close_gone_proxies(300) == 0
    clock.now += 2
    assert store.close_gone_proxies(300) == 1
    record = store.get(mine)
    assert record is not None
    assert (record.state, record.last_hook) == (CLOSED, pb.HOOK_PROXY_GONE)
    other_record = store.get(other)
    assert other_record is not None
    assert other_record.state == OPEN, "a live proxy's connections stay"


def test_a_proxy_that_reconnects_in_time_keeps_its_connections() -> None:
    clock = FakeClock()
    store = Store(clock=clock)
    id = next_id()
    store.attach_proxy("p")
    store.apply([client(id)], proxy="p")
    store.detach_proxy("p")
    clock.now += 200
    store.attach_proxy("p")
    clock.now += 200
    assert store.close_gone_proxies(300) == 0
    record = store.get(id)
    assert record is not None
    assert record.state == OPEN


def test_retained_bytes_follow_every_new_version_of_a_closed_record() -> None:
    store = Store(closed_retention_bytes=1 << 30)
    ids = [next_id() for _ in range(3)]
    store.apply([server(id, state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED) for id in ids])
    update(store, ids[0], address=address(("new.example", 443)))  # a new, larger version
    store.end_resync(store.begin_resync())  # settles the pending change: NOT_APPLIED
    held = sum(len(r.data) for r in (store.get(id) for id in ids) if r is not None)
    assert store._terminal_bytes == held
    store._retention_count = 0
    store.expire()
    assert (len(store), store._terminal_bytes) == (0, 0)


# -- census (what /metrics reads) ------------------------------------------------------


def _recount(store: Store) -> dict[tuple[Kind, int], int]:
    counts = {(kind, state): 0 for kind in Kind for state in range(4)}
    for record in store.snapshot()[0]:
        counts[record.kind, record.state] += 1
    return counts


def test_census_follows_every_kind_of_change() -> None:
    """Reports, updates, resync closes, proxy-gone closes and retention deletes
    each keep the per-(kind, state) counts equal to a count of the records."""
    clock = FakeClock()
    store = Store(clock=clock, closed_retention_seconds=10)
    rng = random.Random(7)
    states = [OPEN, CLOSED, pb.CONNECTION_STATE_CAN_READ, pb.CONNECTION_STATE_CAN_WRITE]
    ids = [next_id("census") for _ in range(40)]
    for round in range(30):
        batch = []
        for id in rng.sample(ids, 8):
            known = store.get(id)
            a_client = known.kind is Kind.CLIENT if known else rng.random() < 0.3
            if a_client:
                batch.append(client(id, state=rng.choice(states)))
            else:
                state = rng.choice(states)
                hook = pb.HOOK_SERVER_CONNECT if state == CLOSED else pb.HOOK_SERVER_CONNECTED
                batch.append(server(id, state=state, hook=hook))
        store.apply(batch, proxy="p1")
        closed_servers = [
            r for r in store.snapshot()[0] if r.kind is Kind.SERVER and r.state == CLOSED
        ]
        if closed_servers:
            update(store, closed_servers[0].id, address=address(("b.example", 443)))
        if round % 7 == 3:
            store.end_resync(store.begin_resync("p1"))
        if round % 5 == 4:
            clock.now += 11
            store.expire()
        assert store.census() == _recount(store), f"round {round}"
    store.attach_proxy("p1")
    store.apply([server(next_id("census"))], proxy="p1")
    store.detach_proxy("p1")
    clock.now += 1000
    assert store.close_gone_proxies(10) >= 1
    assert store.census() == _recount(store)
    restored = Store.restored(
        store.snapshot()[0], [], incarnation=store.incarnation, revision=store.revision
    )
    assert restored.census() == _recount(store)
    assert sum(store.census().values()) == len(store) > 0
