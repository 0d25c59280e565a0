"""to_proto/from_proto round trips, with mitmproxy's own get_state() as the oracle."""

from __future__ import annotations

import datetime
import math
from fractions import Fraction
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.connection import Client, ConnectionState, Server
from mitmproxy.proxy.mode_specs import ProxyMode

from connmeta.certs import describe
from connmeta.mitm import from_proto, to_proto
from connmeta.v1 import connection_pb2 as pb
from tests.certgen import der, key
from tests.mitm.strategies import clients, proxy_modes, servers

TIME_KEYS = {"timestamp_start", "timestamp_end", "timestamp_tls_setup", "timestamp_tcp_setup"}


def assert_same_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Equal get_state(); timestamps to the nanosecond, exactly where a double is coarser."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name in TIME_KEYS and value is not None:
            assert isinstance(got[name], float)
            if abs(value) >= 2**23:
                assert got[name] == value, name
            else:
                assert math.isclose(got[name], value, rel_tol=0, abs_tol=5e-10), name
        else:
            assert got[name] == value, name
            assert type(got[name]) is type(value), name


def assert_certificates_described_as_asked(conn: pb.Connection, described: bool) -> None:
    for cert in conn.certificate_list:
        assert cert == (describe(cert.der) if described else pb.Certificate(der=cert.der))


def through_the_wire(msg: pb.Client | pb.Server) -> pb.Client | pb.Server:
    return type(msg).FromString(msg.SerializeToString())


@given(client=clients, describe_certificates=st.booleans())
def test_client_round_trip_keeps_class_state_and_get_state(
    client: Client, describe_certificates: bool
) -> None:
    msg = to_proto(client, describe_certificates=describe_certificates)
    back = from_proto(through_the_wire(msg))
    assert type(back) is Client
    assert back.state is client.state
    assert_same_state(back.get_state(), client.get_state())
    assert back.proxy_mode == client.proxy_mode
    assert_certificates_described_as_asked(msg.connection, describe_certificates)


@given(server=servers, describe_certificates=st.booleans())
def test_server_round_trip_keeps_class_state_and_get_state(
    server: Server, describe_certificates: bool
) -> None:
    msg = to_proto(server, describe_certificates=describe_certificates)
    back = from_proto(through_the_wire(msg))
    assert type(back) is Server
    assert back.state is server.state
    assert_same_state(back.get_state(), server.get_state())
    assert_certificates_described_as_asked(msg.connection, describe_certificates)
    # Tuples, not lists: re-assigning the same value must pass the guard on an OPEN server.
    back.address = server.address
    back.via = server.via


@given(mode=proxy_modes)
def test_proxy_mode_parts_are_filled_from_the_parsed_mode(mode: ProxyMode) -> None:
    client = Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), proxy_mode=mode)
    msg = to_proto(client).proxy_mode
    assert msg.full_spec == mode.full_spec
    assert msg.type_name == mode.type_name
    assert msg.data == mode.data
    host = msg.custom_listen_host if msg.HasField("custom_listen_host") else None
    port = msg.custom_listen_port if msg.HasField("custom_listen_port") else None
    assert (host, port) == (mode.custom_listen_host, mode.custom_listen_port)


def test_open_server_with_address_and_via_is_rebuilt_without_tripping_the_guard() -> None:
    server = Server(address=("example.com", 443), via=("https", ("proxy", 8443)))
    server.state = ConnectionState.OPEN
    back = from_proto(to_proto(server))
    assert back.state is ConnectionState.OPEN
    assert back.address == ("example.com", 443)
    assert back.via == ("https", ("proxy", 8443))


def test_ipv6_socket_4_tuples_keep_flowinfo_and_scope_id() -> None:
    # mitmproxy's Address type says 2-tuple; IPv6 sockets really give these.
    peername: Any = ("fe80::1", 443, 7, 3)
    sockname: Any = ("::1", 5, 0)
    server = Server(address=("::1", 443), peername=peername, sockname=sockname)
    msg = to_proto(server)
    assert msg.connection.peername == pb.Address(host="fe80::1", port=443, flowinfo=7, scope_id=3)
    back = from_proto(msg)
    assert back.peername == peername
    assert back.sockname == sockname


def test_alpn_none_and_empty_bytes_stay_distinct() -> None:
    absent = Server(address=None, alpn=None)
    empty = Server(address=None, alpn=b"")
    assert not to_proto(absent).connection.HasField("alpn")
    assert to_proto(empty).connection.HasField("alpn")
    assert from_proto(to_proto(absent)).alpn is None
    assert from_proto(to_proto(empty)).alpn == b""


def test_placeholder_server_with_every_optional_none_round_trips() -> None:
    server = Server(address=None)
    back = from_proto(to_proto(server))
    assert back.get_state() == server.get_state()


def _client_msg() -> pb.Client:
    return to_proto(Client(peername=("10.0.0.1", 5000), sockname=("10.0.0.2", 8080)))


def _server_msg() -> pb.Server:
    return to_proto(Server(address=("example.com", 443), peername=("93.184.216.34", 443)))


def _bad_der_chain(msg: pb.Client) -> pb.Client:
    """A chain whose leaf is fine and whose second certificate is not DER."""
    leaf = msg.connection.certificate_list.add(der=der(_self_signed()))
    assert leaf.der
    msg.connection.certificate_list.add(der=b"not DER")
    return msg


def _self_signed() -> x509.Certificate:
    signer = key("ec")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf.example")])
    when = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name)
    builder = builder.public_key(signer.public_key()).serial_number(2**100)
    builder = builder.not_valid_before(when).not_valid_after(when)
    return builder.sign(signer, hashes.SHA256())


def _edit(msg: Any, path: str, value: Any) -> Any:
    *parents, leaf = path.split(".")
    target = msg
    for name in parents:
        target = getattr(target, name)
    setattr(target, leaf, value)
    return msg


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: _edit(_server_msg(), "connection.peername.port", 70000),
            r"^Server\.connection\.peername\.port: 70000 is outside 0-65535$",
        ),
        (
            lambda: _edit(_server_msg(), "address.port", 65536),
            r"^Server\.address\.port: 65536 is outside 0-65535$",
        ),
        (
            lambda: _edit(_server_msg(), "connection.state", 7),
            r"^Server\.connection\.state: unknown",
        ),
        (
            lambda: _edit(_server_msg(), "connection.transport_protocol", 0),
            r"^Server\.connection\.transport_protocol: TRANSPORT_PROTOCOL_UNSPECIFIED",
        ),
        (
            lambda: _edit(_server_msg(), "connection.transport_protocol", 9),
            r"^Server\.connection\.transport_protocol: unknown value 9",
        ),
        (
            lambda: _edit(_client_msg(), "connection.tls_version", 42),
            r"^Client\.connection\.tls_version: unknown value 42",
        ),
        (
            lambda: _edit(_server_msg(), "via.address.host", "proxy"),
            r"^Server\.via\.scheme: SCHEME_UNSPECIFIED \(0\) is not a scheme",
        ),
        (
            lambda: _edit(_edit(_server_msg(), "via.address.host", "p"), "via.scheme", 99),
            r"^Server\.via\.scheme: unknown value 99",
        ),
        (
            lambda: _edit(_server_msg(), "via.scheme", pb.SCHEME_HTTP),
            r"^Server\.via\.address: required",
        ),
        (
            lambda: _edit(_server_msg(), "address.flowinfo", 1),
            r"^Server\.address: flowinfo and scope_id belong to socket addresses",
        ),
        (
            lambda: _edit(_server_msg(), "connection.peername.scope_id", 2),
            r"^Server\.connection\.peername\.scope_id: set without flowinfo",
        ),
        (
            lambda: _bad_der_chain(_client_msg()),
            r"^Client\.connection\.certificate_list\[1\]\.der: malformed certificate DER",
        ),
        (
            lambda: _edit(_client_msg(), "proxy_mode.full_spec", "regular:foo"),
            r"^Client\.proxy_mode\.full_spec: 'regular:foo' is not a proxy mode: mode takes no",
        ),
        (
            lambda: _edit(_client_msg(), "proxy_mode.full_spec", "local:!"),
            r"^Client\.proxy_mode\.full_spec: 'local:!' is not a proxy mode: invalid intercept",
        ),
        (
            lambda: _edit(_client_msg(), "connection.timestamp_start.nanos", 1_000_000_000),
            r"^Client\.connection\.timestamp_start\.nanos: 1000000000 is outside 0-999999999$",
        ),
        (
            lambda: _edit(_client_msg(), "connection.timestamp_end.nanos", -1),
            r"^Client\.connection\.timestamp_end\.nanos: -1 is outside",
        ),
        (
            lambda: _edit(_server_msg(), "timestamp_tcp_setup.seconds", 253_402_300_800),
            r"^Server\.timestamp_tcp_setup\.seconds: 253402300800 is outside the range",
        ),
    ],
    ids=[
        "peername-port-above-65535",
        "address-port-above-65535",
        "unknown-state",
        "transport-unspecified",
        "unknown-transport",
        "unknown-tls-version",
        "via-scheme-unspecified",
        "unknown-via-scheme",
        "via-without-address",
        "flowinfo-on-server-address",
        "scope-id-without-flowinfo",
        "malformed-certificate-der",
        "invalid-proxy-mode",
        "invalid-local-redirector-spec",
        "timestamp-nanos-too-large",
        "timestamp-nanos-negative",
        "timestamp-seconds-beyond-9999",
    ],
)
def test_from_proto_rejects_what_mitmproxy_cannot_hold_naming_the_field(
    build: Any, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        from_proto(build())


def test_from_proto_rejects_an_empty_certificate_der() -> None:
    msg = _client_msg()
    msg.mitmcert.der = b""
    with pytest.raises(ValueError, match=r"^Client\.mitmcert\.der: malformed certificate DER"):
        from_proto(msg)


@pytest.mark.parametrize("field", ["peername", "sockname", "timestamp_start"])
def test_from_proto_requires_client_peername_sockname_and_timestamp_start(field: str) -> None:
    msg = _client_msg()
    msg.connection.ClearField(field)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"^Client\.connection\.{field}: required for a client"):
        from_proto(msg)


def test_from_proto_requires_client_proxy_mode() -> None:
    msg = _client_msg()
    msg.ClearField("proxy_mode")
    with pytest.raises(ValueError, match=r"^Client\.proxy_mode: required for a client"):
        from_proto(msg)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (math.nan, r"nan is not a finite number"),
        (math.inf, r"inf is not a finite number"),
        (-math.inf, r"-inf is not a finite number"),
        (1e12, r"1000000000000\.0 is outside the range of a Timestamp"),
        (-1e11, r"-100000000000\.0 is outside the range of a Timestamp"),
    ],
)
def test_to_proto_rejects_timestamps_a_protobuf_timestamp_cannot_hold(
    value: float, match: str
) -> None:
    server = Server(address=None, timestamp_end=value)
    with pytest.raises(ValueError, match=rf"^Server\.connection\.timestamp_end: {match}"):
        to_proto(server)


@pytest.mark.parametrize(
    ("server", "match"),
    [
        (Server(address=("a", 70000)), r"^Server\.address\.port: 70000 is outside 0-65535$"),
        (Server(address=("::1", 1, 0, 0)), r"^Server\.address: .* is not a \(host, port\) pair"),  # type: ignore[arg-type]
        (Server(address=None, peername=("a", -1)), r"^Server\.connection\.peername\.port: -1"),
        (Server(address=None, tls_version="TLSv9"), r"^Server\.connection\.tls_version: 'TLSv9'"),  # type: ignore[arg-type]
        (
            Server(address=None, transport_protocol="sctp"),  # type: ignore[arg-type]
            r"^Server\.connection\.transport_protocol: 'sctp' is not tcp or udp",
        ),
        (Server(address=None, via=("socks5", ("p", 1))), r"^Server\.via\.scheme: 'socks5'"),  # type: ignore[arg-type]
        (Server(address=None, sni="bad\udcff"), r"^Server\.connection\.sni: .* not valid Unicode"),
        (Server(address=None, alpn="h2"), r"^Server\.connection\.alpn: 'h2' is a str, expected"),  # type: ignore[arg-type]
    ],
    ids=[
        "port",
        "address-4-tuple",
        "negative-port",
        "tls-version",
        "transport",
        "via-scheme",
        "surrogate-sni",
        "str-alpn",
    ],
)
def test_to_proto_rejects_values_mitmproxy_get_state_would_reject_too(
    server: Server, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        to_proto(server)


@pytest.mark.parametrize("field", ["peername", "timestamp_start"])
def test_to_proto_rejects_a_client_missing_a_required_field(field: str) -> None:
    client = Client(peername=("10.0.0.1", 1), sockname=("10.0.0.2", 2))
    setattr(client, field, None)
    with pytest.raises(ValueError, match=rf"^Client\.connection\.{field}: required for a client"):
        to_proto(client)


@given(value=st.floats(-62_135_596_800.0, 253_402_300_799.0))
def test_timestamps_are_the_float_rounded_to_the_nearest_nanosecond(value: float) -> None:
    msg = to_proto(Server(address=None, timestamp_start=value)).connection.timestamp_start
    # Fraction is the float's exact value; round() on it breaks ties to even.
    assert msg.seconds * 10**9 + msg.nanos == round(Fraction(value) * 10**9)
    assert 0 <= msg.nanos < 10**9


def test_a_realistic_timestamp_survives_bit_for_bit() -> None:
    server = Server(address=None, timestamp_start=1_700_000_000.123456789)
    assert from_proto(to_proto(server)).timestamp_start == server.timestamp_start
