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


def test_each_snapshot_gets_the_next_revision_and_apply_returns_the_last() -> None:
    store = Store()
    events = recorder(store)
    a, b = next_id(), next_id()
    base = store.revision
    assert base == 1
    assert store.apply([client(a), server(b, client_id=a, state=CLOSED)]) == base + 2
    assert store.apply([server(b, client_id=a, state=OPEN)]) == base + 3
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


def test_malformed_snapshot_names_its_index_and_earlier_ones_stay_applied() -> None:
    store = Store()
    events = recorder(store)
    good = server(next_id())
    no_id = server("")
    base = store.revision
    with pytest.raises(InvalidArgument) as info:
        store.apply([good, no_id, server(next_id())])
    assert info.value.violations == [("snapshots[1].server.connection.id", "required")]
    assert store.revision == base + 1
    assert len(events) == 1


@pytest.mark.parametrize(
    ("snapshot", "field"),
    [
        (server("s-1", client_id=""), "snapshots[0].client_id"),
        (server("s-1", hook=99), "snapshots[0].hook"),
        (server("s-1", state=7), "snapshots[0].server.connection.state"),
        (client(""), "snapshots[0].client.connection.id"),
    ],
)
def test_malformed_snapshot_is_invalid_argument(snapshot: object, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Store().apply([snapshot])  # type: ignore[list-item]
    assert [f for f, _ in info.value.violations] == [field]


def test_snapshot_without_connection_is_invalid_argument() -> None:
    from connmeta.v1 import report_service_pb2 as rs

    with pytest.raises(InvalidArgument, match=r"snapshots\[0\]\.connection"):
        Store().apply([rs.ConnectionSnapshot(hook=pb.HOOK_SERVER_CONNECT)])


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


def test_malformed_certificate_is_invalid_argument() -> None:
    snap = server(next_id())
    snap.server.connection.certificate_list.add(der=b"not a certificate")
    with pytest.raises(InvalidArgument, match="certificate_list"):
        Store().apply([snap])


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


def test_list_page_from_a_future_revision_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="ahead"):
        Store().list(Filter(), limit=1, at_revision=3)


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


def test_fresh_store_is_at_revision_one_so_a_listing_can_be_resumed() -> None:
    # Revision 0 means "from now" to a watch: an empty store must never list at 0,
    # or a list-then-watch client would lose the first change.
    store = Store()
    assert (store.revision, store.oldest_revision) == (1, 1)
    records, listed, more = store.list(Filter(), limit=10)
    assert (records, listed, more) == ([], 1, False)
    assert store.events_after(listed) == []
    id = next_id()
    store.apply([server(id)])
    [event] = store.events_after(listed)
    assert (event.revision, event.type, event.record.id, event.prev) == (
        2,
        EventType.ADDED,
        id,
        None,
    )
    assert (event.record.revision, event.record.create_revision, event.record.etag) == (
        2,
        2,
        '"2"',
    )
    # A page pinned to the empty listing still shows the store as it was then.
    assert store.list(Filter(), limit=10, at_revision=listed) == ([], 1, False)
    assert store.oldest_revision == 1


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
    store.begin_resync()
    store.apply([server(kept, hook=pb.HOOK_RESYNC)])
    assert store.end_resync() == 2
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


def test_resync_end_without_start_is_invalid() -> None:
    with pytest.raises(InvalidArgument):
        Store().end_resync()


# -- update_server --------------------------------------------------------------------


def test_update_changes_address_and_records_last_change() -> None:
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
    assert (record.host, record.port) == ("new.example", 8443)
    msg = record.message()
    assert msg.server.address == address(("new.example", 8443))
    change = msg.metadata.last_change
    assert (change.actor, list(change.fields), change.revision) == (
        "router",
        ["address"],
        base + 2,
    )
    assert change.time.seconds == 1_700_000_100
    assert [(e.type, e.record) for e in events] == [(EventType.MODIFIED, record)]


def test_last_change_survives_later_reports() -> None:
    store = Store()
    id = next_id()
    base = store.revision
    store.apply([server(id, state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)])
    update(store, id, via=via_spec(("http", ("p.example", 3128))), mask=frozenset({"via"}))
    store.apply([server(id, state=OPEN, via=("http", ("p.example", 3128)))])
    record = store.get(id)
    assert record is not None
    assert record.revision == base + 3
    change = record.message().metadata.last_change
    assert (list(change.fields), change.revision) == (["via"], base + 2)


def test_update_via_unset_removes_the_upstream_proxy() -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=CLOSED, via=("https", ("p.example", 443)))])
    record = update(store, id, via=None, mask=frozenset({"via"}))
    assert not record.message().server.HasField("via")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mask": frozenset()}, "update_mask"),
        ({"mask": frozenset({"sni"})}, "update_mask.paths"),
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
    assert (info.value.field, info.value.current) == ("address", "('origin.example', 443)")


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
