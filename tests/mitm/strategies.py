"""Hypothesis strategies for every mitmproxy Client and Server the converters must carry."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from mitmproxy import certs
from mitmproxy.connection import Client, ConnectionState, Server
from mitmproxy.proxy.mode_specs import ProxyMode

from tests.certgen import certificates

SCHEMES = ["http", "https", "http3", "tls", "dtls", "tcp", "udp", "dns", "quic"]
TLS_VERSIONS = [
    "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3", "DTLSv0.9", "DTLSv1", "DTLSv1.2", "QUICv1",
]  # fmt: skip
STATES = list(ConnectionState.__members__.values())

ports = st.integers(0, 65535)
hostnames = st.sampled_from(["example.com", "localhost", "a_b.example", "xn--bcher-kva.example"])
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
# A socket address: 2-tuple, or an IPv6 socket's 4-tuple (and the 3-tuple get_state keeps).
socket_addresses = st.one_of(
    st.tuples(ipv4 | hostnames | st.text(), ports),
    st.tuples(ipv6, ports),
    st.tuples(ipv6, ports, st.integers(0, 2**20 - 1)),
    st.tuples(ipv6, ports, st.integers(0, 2**20 - 1), st.integers(0, 2**32 - 1)),
)
host_ports = st.tuples(ipv4 | ipv6 | hostnames, ports)
vias = st.tuples(st.sampled_from(SCHEMES), host_ports)
# Realistic epoch seconds most of the time, the whole Timestamp range sometimes.
timestamps = st.one_of(
    st.floats(1.0e9, 2.2e9),
    st.floats(-62_135_596_800.0, 253_402_300_799.0),
    st.integers(0, 2**31),
)
optional_timestamps = st.none() | timestamps
mitm_certs = certificates().map(certs.Cert)


def _case(word: str) -> st.SearchStrategy[str]:
    return st.sampled_from([word, word.upper(), word.capitalize()])


def _target(scheme: str) -> st.SearchStrategy[str]:
    host = hostnames | ipv4 | ipv6.map(lambda h: f"[{h}]")
    # tls, dtls, tcp and udp have no default port in mitmproxy's server_spec.
    needs_port = scheme in ("tls", "dtls", "tcp", "udp")
    port = ports.filter(bool).map(lambda p: f":{p}")
    suffix = port if needs_port else st.just("") | port
    return st.builds(lambda h, p: f"{scheme}://{h}{p}", host, suffix)


_mode_heads = st.one_of(
    *(_case(m) for m in ("regular", "transparent", "socks5", "dns")),
    st.tuples(_case("upstream"), st.sampled_from(["http", "https"]).flatmap(_target)).map(":".join),
    st.tuples(_case("upstream"), hostnames).map(":".join),
    st.tuples(_case("reverse"), st.sampled_from(SCHEMES).flatmap(_target)).map(":".join),
    st.tuples(_case("reverse"), hostnames).map(":".join),
    _case("wireguard"),
    st.tuples(_case("wireguard"), st.sampled_from(["wg0.conf", "/etc/wg/x.conf"])).map(":".join),
    _case("local"),
    st.tuples(_case("local"), st.sampled_from(["curl", "!curl", "1234"])).map(":".join),
    _case("tun"),
    st.tuples(_case("tun"), st.just("tun0")).map(":".join),
)
_listen = st.one_of(
    st.just(""),
    ports.map(lambda p: f"@{p}"),
    st.tuples(st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "[::1]", "localhost"]), ports).map(
        lambda hp: f"@{hp[0]}:{hp[1]}"
    ),
)
proxy_modes = st.builds(lambda head, listen: ProxyMode.parse(head + listen), _mode_heads, _listen)


def _connection_fields() -> dict[str, st.SearchStrategy[Any]]:
    return {
        "id": st.uuids().map(str) | st.text(),
        "transport_protocol": st.sampled_from(["tcp", "udp"]),
        "error": st.none() | st.text(),
        "tls": st.booleans(),
        "certificate_list": st.lists(mitm_certs, max_size=2),
        "alpn": st.none() | st.binary(max_size=8),
        "alpn_offers": st.lists(st.binary(max_size=8), max_size=3),
        "cipher": st.none() | st.sampled_from(["TLS_AES_256_GCM_SHA384", "ECDHE-RSA-AES128"]),
        "cipher_list": st.lists(st.text(max_size=12), max_size=3),
        "tls_version": st.none() | st.sampled_from(TLS_VERSIONS),
        "sni": st.none() | st.text(),
        "timestamp_end": optional_timestamps,
        "timestamp_tls_setup": optional_timestamps,
    }


def _with_state(conn: Client | Server, state: ConnectionState) -> Client | Server:
    # Assigned last, as mitmproxy does: Server(address=..., state=OPEN) raises.
    conn.state = state
    return conn


clients = st.builds(
    _with_state,
    st.builds(
        Client,
        peername=socket_addresses,
        sockname=socket_addresses,
        timestamp_start=timestamps,
        mitmcert=st.none() | mitm_certs,
        proxy_mode=proxy_modes,
        **_connection_fields(),
    ),
    st.sampled_from(STATES),
)
servers = st.builds(
    _with_state,
    st.builds(
        Server,
        address=st.none() | host_ports,
        peername=st.none() | socket_addresses,
        sockname=st.none() | socket_addresses,
        timestamp_start=optional_timestamps,
        timestamp_tcp_setup=optional_timestamps,
        via=st.none() | vias,
        **_connection_fields(),
    ),
    st.sampled_from(STATES),
)

__all__ = ["clients", "proxy_modes", "servers"]
