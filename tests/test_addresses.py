"""connmeta.addresses: tuples, text and ServerSpecs, with mitmproxy's server_spec as oracle."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.net import server_spec

from connmeta.addresses import (
    SCHEME_NAMES,
    SCHEME_VALUES,
    address_to_tuple,
    format_address,
    parse_address,
    tuple_to_address,
    via_to_tuple,
)
from connmeta.v1 import connection_pb2 as pb

hosts = st.one_of(st.ip_addresses().map(str), st.sampled_from(["example.com", "localhost"]))
ports = st.integers(0, 65535)
u32 = st.integers(0, 2**32 - 1)
tuples = st.one_of(
    st.tuples(hosts, ports), st.tuples(hosts, ports, u32), st.tuples(hosts, ports, u32, u32)
)


@given(t=tuples)
def test_tuple_round_trips_with_its_length(t: tuple[str, int] | tuple[str, int, int]) -> None:
    back = address_to_tuple(tuple_to_address(t))
    assert back == t
    assert type(back) is tuple


@given(host=hosts, port=ports)
def test_format_then_parse_gives_the_address_back(host: str, port: int) -> None:
    address = pb.Address(host=host, port=port)
    assert parse_address(format_address(address)) == address


def test_format_brackets_ipv6_like_mitmproxy() -> None:
    assert format_address(pb.Address(host="::1", port=8080)) == "[::1]:8080"
    assert format_address(pb.Address(host="10.0.0.1", port=80)) == "10.0.0.1:80"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("example.com", "port is missing"),
        ("::1:80", "bracket IPv6"),
        ("[::1]", "expected \\[v6-host\\]:port"),
        ("example.com:65536", "not a number in 0-65535"),
        ("example.com:-1", "not a number"),
        (":80", "host is empty"),
    ],
)
def test_parse_address_rejects_ambiguous_or_incomplete_text(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_address(text)


def test_scheme_names_are_exactly_mitmproxys_server_spec_literals() -> None:
    scheme_literal = typing.get_args(server_spec.ServerSpec)[0]
    assert set(SCHEME_NAMES.values()) == set(typing.get_args(scheme_literal))
    assert len(SCHEME_NAMES) == len(pb.Scheme.values()) - 1  # all but UNSPECIFIED
    assert {v: k for k, v in SCHEME_VALUES.items()} == SCHEME_NAMES


@given(scheme=st.sampled_from(sorted(SCHEME_VALUES)), host=hosts, port=ports.filter(bool))
def test_via_to_tuple_matches_mitmproxy_parsing_the_same_spec(
    scheme: str, host: str, port: int
) -> None:
    shown = f"[{host}]" if ":" in host else host
    spec = pb.ServerSpec(scheme=SCHEME_VALUES[scheme], address=pb.Address(host=host, port=port))
    assert via_to_tuple(spec) == server_spec.parse(f"{scheme}://{shown}:{port}", "http")


def test_address_port_above_65535_is_refused_with_its_path() -> None:
    with pytest.raises(ValueError, match=r"^Server\.address\.port: 70000 is outside 0-65535$"):
        address_to_tuple(pb.Address(host="a", port=70000), "Server.address")


def test_tuple_to_address_refuses_a_negative_flowinfo() -> None:
    with pytest.raises(ValueError, match=r"^Address\.flowinfo: -1 is outside"):
        tuple_to_address(("::1", 1, -1))


def test_core_modules_import_without_mitmproxy() -> None:
    code = (
        "import sys, connmeta, connmeta.addresses, connmeta.certs\n"
        "assert not any(m.split('.')[0] == 'mitmproxy' for m in sys.modules), 'mitmproxy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
