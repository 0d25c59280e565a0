"""connmeta.validation: the contract's rules, each stated once, and how errors quote input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from connmeta import validation
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs
from connmeta.validation import change_violations, id_problem, proxy_mode_problem, shown

ADDRESS = ["address"]
VIA = ["via"]
PROTO = Path(__file__).resolve().parents[1] / "proto" / "connmeta" / "v1"


def address(host: str = "origin-b.example", port: int = 443) -> pb.Address:
    return pb.Address(host=host, port=port)


def via(
    scheme: int = pb.SCHEME_HTTP, host: str = "proxy.example", port: int = 3128
) -> pb.ServerSpec:
    return pb.ServerSpec(scheme=scheme, address=pb.Address(host=host, port=port))  # type: ignore[arg-type]


def answer(mask: list[str], a: pb.Address | None, v: pb.ServerSpec | None) -> list[tuple[str, str]]:
    return change_violations(mask, a, v, mask_required=False, prefix="answer.")


# -- changes (updates and route answers) ---------------------------------------


def test_valid_answers_have_no_violations() -> None:
    assert answer([], None, None) == []
    assert answer(ADDRESS, address(port=1), None) == []
    assert answer(ADDRESS, address(port=65535), None) == []
    assert answer(VIA, None, via(pb.SCHEME_HTTPS)) == []
    assert answer(VIA, None, None) == [], "no via: connect directly"
    assert answer(["address", "via"], address(), via()) == []


def test_an_update_needs_a_mask_and_an_answer_does_not() -> None:
    assert change_violations([], None, None, mask_required=True) == [
        ("update_mask", "required: name 'address', 'via' or both")
    ]
    assert answer([], None, None) == []


@pytest.mark.parametrize("port", [0, 65536, 70000])
def test_change_with_a_port_out_of_range_is_refused(port: int) -> None:
    (problem,) = answer(ADDRESS, address(port=port), None)
    assert problem == ("answer.address.port", f"{port} is outside 1-65535")


@pytest.mark.parametrize("given", [None, pb.Address(host="", port=443)])
def test_change_naming_address_without_a_host_is_refused(given: pb.Address | None) -> None:
    (problem,) = answer(ADDRESS, given, None)
    assert problem[0] in ("answer.address", "answer.address.host")
    assert "required" in problem[1]


@pytest.mark.parametrize("scheme", [pb.SCHEME_HTTP3, pb.SCHEME_TLS, pb.SCHEME_UNSPECIFIED, 99])
def test_change_with_a_via_scheme_mitmproxy_cannot_use_is_refused(scheme: int) -> None:
    (problem,) = answer(VIA, None, via(scheme))
    assert problem[0] == "answer.via.scheme"
    assert "http or https" in problem[1]


@pytest.mark.parametrize(("host", "port"), [("", 3128), ("proxy.example", 0)])
def test_change_with_an_incomplete_via_address_is_refused(host: str, port: int) -> None:
    (problem,) = answer(VIA, None, via(host=host, port=port))
    assert problem[0].startswith("answer.via.address")


def test_server_address_with_ipv6_socket_parts_is_refused() -> None:
    four_tuple = pb.Address(host="::1", port=443, flowinfo=0, scope_id=0)
    fields = [field for field, _ in answer(ADDRESS, four_tuple, None)]
    assert fields == ["answer.address.flowinfo", "answer.address.scope_id"]


def test_fields_the_mask_does_not_name_are_ignored() -> None:
    bad = pb.Address(host="", port=70000)
    assert answer(VIA, bad, None) == []
    assert answer(ADDRESS, address(), via(pb.SCHEME_TLS)) == []


def test_change_with_an_unknown_mask_path_names_its_index() -> None:
    problems = answer(["sni", "address", "tls"], address(), None)
    assert [field for field, _ in problems] == [
        "answer.update_mask.paths[0]",
        "answer.update_mask.paths[2]",
    ]


def test_every_violation_of_a_change_is_reported() -> None:
    problems = answer(["address", "via", "alpn"], address(port=0), via(pb.SCHEME_TCP, host=""))
    assert [field for field, _ in problems] == [
        "answer.update_mask.paths[2]",
        "answer.address.port",
        "answer.via.scheme",
        "answer.via.address.host",
    ]


@pytest.mark.parametrize(
    "host", ["a b", "a/b", "[::1]", "user@host", "a?b", "a#b", "tab\there", "x" * 254, "é\u2028"]
)
def test_update_host_that_is_no_host_name_or_ip_is_refused(host: str) -> None:
    (problem,) = answer(ADDRESS, address(host=host), None)
    assert problem[0] == "answer.address.host"


def test_actor_is_bounded_printable_ascii() -> None:
    assert validation.actor_problem("") is None
    assert validation.actor_problem("ops team / ticket 42") is None
    assert validation.actor_problem("a" * 256) is None
    assert validation.actor_problem("a" * 257) is not None
    assert validation.actor_problem("line\nbreak") is not None


# -- identifiers ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "a b", "new\nline", "ünï", "x" * 257, "\x00", "٣"])
def test_ids_are_1_to_256_bytes_of_printable_ascii_without_spaces(value: str) -> None:
    assert id_problem(value) is not None


def test_uuid_and_bounded_ids_are_valid() -> None:
    assert id_problem("4c9e1a52-8d0f-4f49-a1b4-5c0f4b8f9f00") is None
    assert id_problem("x" * 256) is None
    assert id_problem("", required=False) is None


# -- quoting input ---------------------------------------------------------------


def test_shown_quotes_at_most_a_prefix_and_says_how_long_the_value_was() -> None:
    text = shown("x" * 100_000)
    assert len(text) < 100
    assert "100000 chars" in text
    assert shown("a\nb") == repr("a\nb")


def test_escape_keeps_a_log_line_one_line() -> None:
    assert validation.escape("id\nFAKE log line") == "id\\x0aFAKE log line"
    assert len(validation.escape("y" * 10_000)) <= 257


# -- proxy modes: mitmproxy's ProxyMode.parse is the oracle ------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "regular",
        "REGULAR",
        "regular@8081",
        "regular@127.0.0.1:8081",
        "regular@::1:8081",
        "transparent",
        "socks5",
        "dns",
        "upstream:http://proxy:3128",
        "upstream:https://proxy",
        "upstream:proxy",
        "upstream:http://[::1]:3128@127.0.0.1:0",
        "reverse:https://example.com",
        "reverse:tcp://example.com:22",
        "reverse:dns://1.1.1.1",
        "reverse:http://example.com@8443",
        "wireguard",
        "wireguard:wg0.conf",
        "tun",
        "local",
    ],
)
def test_proxy_modes_mitmproxy_parses_are_accepted(spec: str) -> None:
    from mitmproxy.proxy.mode_specs import ProxyMode

    ProxyMode.parse(spec)  # the oracle accepts it
    assert proxy_mode_problem(spec) is None


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "bogus",
        "regular:data",
        "upstream:socks5://proxy:1080",
        "upstream:",
        "reverse:tcp://example.com",
        "reverse:http://",
        "regular@70000",
        "regular@ 3",
        "regular@٣",
        "upstream:http://user:pass@proxy:3128",
        "osproxy",
    ],
)
def test_proxy_modes_outside_the_grammar_mitmproxy_parses_are_refused(spec: str) -> None:
    assert proxy_mode_problem(spec) is not None


# -- every rule is stated in a proto comment ------------------------------------------


def test_the_limits_enforced_are_the_limits_the_protos_state() -> None:
    text = " ".join(path.read_text() for path in PROTO.glob("*.proto"))
    text = re.sub(r"\s*//\s*", " ", text)
    assert f"1-{validation.MAX_ID_BYTES} bytes of printable ASCII without spaces" in text
    assert f"at most {validation.MAX_HOST_BYTES} bytes, without control characters" in text
    assert f"At most {validation.MAX_ACTOR_BYTES} bytes of printable ASCII" in text
    assert f"1-{validation.MAX_ROUTER_NAME_BYTES} bytes of printable ASCII" in text
    assert "at most 1 MiB" in text
    assert validation.MAX_CONNECTION_BYTES == 1 << 20
    assert f"At most {validation.MAX_ROUTE_DEADLINE_SECONDS} s" in text
    assert f"1-{validation.MAX_UPDATE_HOST_BYTES} bytes" in text


# -- snapshots: the cheap check agrees with the full one, and accepted means convertible ------

# Each field is valid most of the time, so that valid snapshots are common
# and every rule is still broken alone now and then.
_UUID = "4c9e1a52-8d0f-4f49-a1b4-5c0f4b8f9f00"
_ids = st.one_of(
    st.sampled_from([_UUID] * 12 + ["", "a b", "x\ny", "x" * 257, "ü"]),
    st.text(max_size=8),
)
_hosts = st.one_of(
    st.sampled_from(["example.com"] * 12 + ["::1", "", "h" * 256, "a\x01b", "ü.example"]),
    st.text(max_size=8),
)


def _mostly(valid: object, *invalid: object) -> st.SearchStrategy[object]:
    return st.sampled_from([valid] * 12 + list(invalid))


@st.composite
def _addresses(draw: st.DrawFn) -> pb.Address:
    address = pb.Address(host=draw(_hosts), port=draw(_mostly(443, 0, 65535, 65536)))  # type: ignore[arg-type]
    if draw(_mostly(False, True)):
        address.flowinfo = draw(st.sampled_from([0, 7]))
    if draw(_mostly(False, True)):
        address.scope_id = draw(st.sampled_from([0, 3]))
    return address


@st.composite
def _timestamps(draw: st.DrawFn) -> Timestamp:
    return Timestamp(
        seconds=draw(_mostly(1_700_000_000, 0, -62_135_596_801, 253_402_300_800)),  # type: ignore[arg-type]
        nanos=draw(_mostly(5, 0, 999_999_999, 1_000_000_000, -1)),  # type: ignore[arg-type]
    )


@st.composite
def _snapshots(draw: st.DrawFn) -> rs.ConnectionSnapshot:
    conn = pb.Connection(
        id=draw(_ids),
        state=draw(st.sampled_from([0, 1, 2, 3, 3, 3, 3, 4])),  # type: ignore[arg-type]
        transport_protocol=draw(_mostly(1, 2, 0, 3)),  # type: ignore[arg-type]
        tls_version=draw(_mostly(5, 0, 9, 10)),  # type: ignore[arg-type]
    )
    for name in ("peername", "sockname"):
        if draw(_mostly(True, False)):
            getattr(conn, name).CopyFrom(draw(_addresses()))
    for name in ("timestamp_start", "timestamp_end", "timestamp_tls_setup"):
        if draw(st.booleans()):
            getattr(conn, name).CopyFrom(draw(_timestamps()))
    snap = rs.ConnectionSnapshot(hook=draw(_mostly(4, 0, 11, 12)), client_id=draw(_ids))  # type: ignore[arg-type]
    if draw(st.booleans()):
        server = snap.server
        server.connection.CopyFrom(conn)
        if draw(_mostly(True, False)):
            server.address.CopyFrom(draw(_addresses()))
        if draw(st.booleans()):
            server.timestamp_tcp_setup.CopyFrom(draw(_timestamps()))
        if draw(_mostly(False, True)):
            server.via.scheme = draw(st.integers(0, 10))  # type: ignore[assignment]
            if draw(_mostly(True, False)):
                server.via.address.CopyFrom(draw(_addresses()))
    else:
        client = snap.client
        client.connection.CopyFrom(conn)
        if draw(_mostly(True, False)):
            client.connection.timestamp_start.CopyFrom(draw(_timestamps()))
        if draw(_mostly(True, False)):
            client.proxy_mode.full_spec = str(
                draw(_mostly("regular", "upstream:http://p:3128", "bogus", "regular@ 3"))
            )
    if draw(_mostly(False, True)):
        snap.route_outcome.kind = draw(st.integers(0, 5))  # type: ignore[assignment]
    return snap


@given(_snapshots())
def test_a_snapshot_the_cheap_check_passes_has_no_violation_and_converts(
    snap: rs.ConnectionSnapshot,
) -> None:
    from connmeta.mitm import from_proto

    side = snap.server if snap.HasField("server") else snap.client
    body = side.SerializeToString()
    full = validation.snapshot_violations(snap, "s")
    if body and validation._plainly_valid(snap, body):
        assert full == []
    assert validation.snapshot_violations(snap, "s", body) == full
    if not full:
        from_proto(side)  # accepted means mitmproxy can hold it
