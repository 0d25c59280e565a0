"""The open-connection guard, checked against mitmproxy's own Server.__setattr__.

For every state and every (current, new) pair of address and via values, the
store refuses an update exactly when mitmproxy would raise on the assignment.
An accepted change is pending (desired) until the proxy settles it: the
server's own fields keep what the proxy reported.
"""

from __future__ import annotations

import itertools

import pytest
from mitmproxy.connection import ConnectionState, Server

from connmeta.guard import guard_refuses, value_text
from connmeta.store import ConnectionOpen, InvalidArgument, Record, Store
from tests.snapshots import address, next_id, server, via_spec

STATES = [
    ConnectionState.CLOSED,
    ConnectionState.CAN_READ,
    ConnectionState.CAN_WRITE,
    ConnectionState.OPEN,
]
ADDRESSES: list[tuple[object, ...] | None] = [
    None,
    ("a.example", 443),
    ("b.example", 443),
    ("a.example", 8443),
    ("::1", 443),
    ("::1", 443, 0, 0),
    ("::1", 443, 0, 5),
]
# A server's address is a (host, port) pair: mitmproxy's converters (and so
# the sidecar's contract) have no room for IPv6 socket parts there.
PAIRS = [a for a in ADDRESSES if a is None or len(a) == 2]
VIAS: list[tuple[str, tuple[str, int]] | None] = [
    None,
    ("http", ("proxy.example", 8080)),
    ("https", ("proxy.example", 8080)),
    ("http", ("other.example", 8080)),
    ("http", ("proxy.example", 3128)),
]


def mitmproxy_raises(state: ConnectionState, field: str, old: object, new: object) -> bool:
    srv = Server(address=None)
    setattr(srv, field, old)
    srv.state = state
    try:
        setattr(srv, field, new)
    except RuntimeError:
        return True
    return False


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.name)
@pytest.mark.parametrize(
    ("field", "old", "new"),
    [
        *(("address", o, n) for o, n in itertools.product(ADDRESSES, repeat=2)),
        *(("via", o, n) for o, n in itertools.product(VIAS, repeat=2)),
    ],
)
def test_guard_predicate_matches_mitmproxy(
    state: ConnectionState, field: str, old: object, new: object
) -> None:
    assert guard_refuses(state.value, old, new) == mitmproxy_raises(state, field, old, new)


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.name)
@pytest.mark.parametrize(
    ("old", "new"),
    [(o, n) for o, n in itertools.product(PAIRS, repeat=2) if n is not None],
)
def test_update_address_is_refused_exactly_when_mitmproxy_refuses(
    state: ConnectionState, old: tuple[object, ...] | None, new: tuple[object, ...]
) -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=state.value, addr=old)])
    before = store.revision

    def attempt() -> Record:
        return store.update_server(
            id, address=address(new), via=None, mask=frozenset({"address"}), etag="", actor="t"
        )

    if mitmproxy_raises(state, "address", old, new):
        with pytest.raises(ConnectionOpen) as info:
            attempt()
        assert (info.value.field, info.value.current) == ("address", value_text(old))
        assert store.revision == before
    else:
        record = attempt()
        assert store.revision == before + (old != new)
        msg = record.message()
        assert msg.server.HasField("address") == (old is not None), "observed: unchanged"
        if old != new:
            assert msg.metadata.pending_change.address == address(new)
            assert list(msg.metadata.pending_change.fields) == ["address"]
        else:
            assert not msg.metadata.HasField("pending_change")


@pytest.mark.parametrize("new", [a for a in ADDRESSES if a is not None and len(a) > 2])
def test_update_to_an_ipv6_socket_address_is_invalid_in_every_state(
    new: tuple[object, ...],
) -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=ConnectionState.CLOSED.value)])
    with pytest.raises(InvalidArgument, match=r"address\.flowinfo"):
        store.update_server(id, address=address(new), via=None, mask=frozenset({"address"}))


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.name)
@pytest.mark.parametrize(("old", "new"), list(itertools.product(VIAS, repeat=2)))
def test_update_via_is_refused_exactly_when_mitmproxy_refuses(
    state: ConnectionState,
    old: tuple[str, tuple[str, int]] | None,
    new: tuple[str, tuple[str, int]] | None,
) -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, state=state.value, via=old)])
    before = store.revision

    def attempt() -> Record:
        return store.update_server(
            id, address=None, via=via_spec(new), mask=frozenset({"via"}), etag="", actor="t"
        )

    if mitmproxy_raises(state, "via", old, new):
        with pytest.raises(ConnectionOpen, match="via"):
            attempt()
        assert store.revision == before
    else:
        record = attempt()
        assert store.revision == before + (old != new)
        msg = record.message()
        assert msg.server.HasField("via") == (old is not None), "observed: unchanged"
        pending = msg.metadata.pending_change
        assert msg.metadata.HasField("pending_change") == (old != new)
        if old != new:
            assert pending.HasField("via") == (new is not None)
            if new is not None:
                assert pending.via == via_spec(new)


def test_same_value_on_open_server_is_accepted_without_a_new_revision() -> None:
    store = Store()
    id = next_id()
    base = store.revision
    store.apply([server(id, addr=("a.example", 443), via=("http", ("p.example", 8080)))])
    current = store.get(id)
    record = store.update_server(
        id,
        address=address(("a.example", 443)),
        via=via_spec(("http", ("p.example", 8080))),
        mask=frozenset({"address", "via"}),
        etag=current.etag if current else "",
        actor="t",
    )
    assert record is current
    assert store.revision == base + 1


def test_one_changed_field_on_open_server_refuses_the_whole_update() -> None:
    store = Store()
    id = next_id()
    base = store.revision
    store.apply([server(id, addr=("a.example", 443), via=None)])
    with pytest.raises(ConnectionOpen, match="via"):
        store.update_server(
            id,
            address=address(("a.example", 443)),
            via=via_spec(("http", ("p.example", 8080))),
            mask=frozenset({"address", "via"}),
            etag="",
            actor="t",
        )
    assert store.revision == base + 1


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (("origin.example", 443), "origin.example:443"),
        (("::1", 8443), "[::1]:8443"),
        (("fe80::1", 80, 0, 2), "[fe80::1]:80"),
        (("http", ("proxy.internal", 3128)), "http://proxy.internal:3128"),
        (None, ""),
    ],
)
def test_refused_values_are_named_as_text_any_language_reads(value: object, text: str) -> None:
    assert value_text(value) == text
