"""ConnectionFilter validation and matching."""

from __future__ import annotations

import pytest

from connmeta.filters import Filter
from connmeta.store import InvalidArgument, Record, Store
from connmeta.v1 import connection_service_pb2 as cs
from tests.snapshots import CLOSED, OPEN, client, server


def stored(*snapshots: object) -> list[Record]:
    store = Store()
    store.apply(list(snapshots))  # type: ignore[arg-type]
    return store.list(Filter(), limit=100)[0]


def flt(**kwargs: object) -> Filter:
    return Filter.from_proto(cs.ConnectionFilter(**kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": 7}, "filter.kind"),
        ({"states": [OPEN, 9]}, "filter.states"),
        ({"port": 70000}, "filter.port"),
        ({"host": "*"}, "filter.host"),
        ({"host": "*."}, "filter.host"),
        ({"host": "*example.com"}, "filter.host"),
        ({"host": "a.*.example.com"}, "filter.host"),
        ({"host": "*.*.example.com"}, "filter.host"),
        ({"sni": "exa*mple.com"}, "filter.sni"),
    ],
)
def test_invalid_filter_is_invalid_argument_naming_the_field(
    kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        flt(**kwargs)
    assert [f for f, _ in info.value.violations] == [field]


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidArgument) as info:
        flt(kind=5, host="*", sni="x*")
    assert [f for f, _ in info.value.violations] == ["filter.kind", "filter.host", "filter.sni"]


def test_empty_filter_matches_everything() -> None:
    empty = flt()
    assert empty.is_empty
    assert all(empty.matches(r) for r in stored(client("c"), server("s", state=CLOSED)))


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "badexample.com", False),
        ("*.Example.COM", "A.EXAMPLE.com", True),
        ("example.com", "EXAMPLE.COM", True),
        ("example.com", "a.example.com", False),
        ("2001:db8::1", "2001:db8::1", True),
    ],
)
def test_host_pattern_matching(pattern: str, host: str, expected: bool) -> None:
    [record] = stored(server("s", addr=(host, 443)))
    assert flt(host=pattern).matches(record) is expected


def test_port_applies_to_the_same_address_as_host() -> None:
    records = stored(server("s", addr=("h.example", 8443)), client("c", peer=("10.0.0.1", 8443)))
    assert [r.id for r in records if flt(port=8443).matches(r)] == ["c", "s"]
    assert [r.id for r in records if flt(port=443).matches(r)] == []


def test_sni_filter_skips_records_without_sni() -> None:
    records = stored(server("with", sni="api.example.com"), server("without"))
    assert [r.id for r in records if flt(sni="*.example.com").matches(r)] == ["with"]


def test_client_id_matches_the_client_and_its_servers() -> None:
    records = stored(
        client("c1"), server("s1", client_id="c1"), server("s2", client_id="c2"), client("c2")
    )
    assert [r.id for r in records if flt(client_id="c1").matches(r)] == ["c1", "s1"]


def test_conditions_combine_with_and() -> None:
    records = stored(
        server("a", state=OPEN, addr=("x.example", 443)),
        server("b", state=CLOSED, addr=("x.example", 443)),
        server("c", state=OPEN, addr=("y.example", 443)),
        client("d"),
    )
    f = flt(kind=cs.CONNECTION_KIND_SERVER, states=[OPEN], host="x.example")
    assert [r.id for r in records if f.matches(r)] == ["a"]


def test_equal_filters_compare_and_hash_equal() -> None:
    a = flt(kind=cs.CONNECTION_KIND_SERVER, states=[OPEN, CLOSED], host="*.Example.com")
    b = flt(kind=cs.CONNECTION_KIND_SERVER, states=[CLOSED, OPEN], host="*.example.com")
    assert a == b
    assert hash(a) == hash(b)
    assert a != flt(kind=cs.CONNECTION_KIND_SERVER)
    assert a != "not a filter"
