"""mitmproxy Client/Server ↔ connmeta.v1 Client/Server, losslessly.

to_proto runs inside the proxy's hooks, so it writes straight into the
message's sub-fields (no intermediate messages, no per-call tables) and leaves
the certificate facts to the sidecar when asked to. from_proto rebuilds the
object the way mitmproxy's from_state would, plus the state, which
get_state() drops but the open-connection guard depends on.
"""

from __future__ import annotations

from typing import Any, Final, Literal, NamedTuple, overload

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf.timestamp_pb2 import Timestamp
from mitmproxy import certs
from mitmproxy.connection import Client, Connection, ConnectionState, Server
from mitmproxy.proxy.mode_specs import ProxyMode

from connmeta import certs as facts
from connmeta.addresses import (
    address_to_tuple,
    enum_label,
    fill_address,
    fill_via,
    host_port,
    via_to_tuple,
)
from connmeta.mitm._timestamps import fill_timestamp, timestamp_to_float
from connmeta.v1 import connection_pb2 as pb

__all__ = ["from_proto", "to_proto"]

_TRANSPORT_VALUES: Final[dict[str, pb.TransportProtocol.ValueType]] = {
    "tcp": pb.TRANSPORT_PROTOCOL_TCP,
    "udp": pb.TRANSPORT_PROTOCOL_UDP,
}
_TRANSPORT_NAMES: Final = {v: k for k, v in _TRANSPORT_VALUES.items()}
_TLS_VALUES: Final[dict[str, pb.TlsVersion.ValueType]] = {
    "SSLv3": pb.TLS_VERSION_SSL_V3,
    "TLSv1": pb.TLS_VERSION_TLS_V1,
    "TLSv1.1": pb.TLS_VERSION_TLS_V1_1,
    "TLSv1.2": pb.TLS_VERSION_TLS_V1_2,
    "TLSv1.3": pb.TLS_VERSION_TLS_V1_3,
    "DTLSv0.9": pb.TLS_VERSION_DTLS_V0_9,
    "DTLSv1": pb.TLS_VERSION_DTLS_V1,
    "DTLSv1.2": pb.TLS_VERSION_DTLS_V1_2,
    "QUICv1": pb.TLS_VERSION_QUIC_V1,
}
_TLS_NAMES: Final = {v: k for k, v in _TLS_VALUES.items()}
_TimeField = Literal["timestamp_start", "timestamp_end", "timestamp_tls_setup"]
# __members__, not iteration: iterating a Flag skips CLOSED (0) and OPEN (two bits).
_STATES: Final = {int(s.value): s for s in ConnectionState.__members__.values()}
_STATE_VALUES: Final[dict[ConnectionState, pb.ConnectionState.ValueType]] = {
    s: pb.ConnectionState.ValueType(v) for v, s in _STATES.items()
}
# DER out of a Cert: 12.x has to_cryptography(); 11.x only the attribute it wraps.
_x509_of = getattr(certs.Cert, "to_cryptography", None) or (lambda cert: cert._cert)


class _Paths(NamedTuple):
    """Field paths for error messages, built once per message type, not per call."""

    kind: str
    conn: str
    peername: str
    sockname: str
    certificate_list: str
    transport_protocol: str
    tls_version: str
    state: str
    timestamp_start: str
    timestamp_end: str
    timestamp_tls_setup: str

    @classmethod
    def of(cls, kind: str) -> _Paths:
        conn = f"{kind}.connection"
        return cls(kind, conn, *(f"{conn}.{name}" for name in cls._fields[2:]))


_CLIENT: Final = _Paths.of("Client")
_SERVER: Final = _Paths.of("Server")


@overload
def to_proto(conn: Client, *, describe_certificates: bool = True) -> pb.Client: ...
@overload
def to_proto(conn: Server, *, describe_certificates: bool = True) -> pb.Server: ...
def to_proto(conn: Client | Server, *, describe_certificates: bool = True) -> pb.Client | pb.Server:
    """The message for a mitmproxy Client or Server, state included.

    With ``describe_certificates=False`` certificates carry only ``der``; the
    sidecar derives the rest. Raises ValueError, naming the field, for what
    a message cannot hold: a non-finite or out-of-range timestamp, a port
    outside 0-65535, a client without peername/sockname/timestamp_start, a
    string that is not valid Unicode, or a value outside mitmproxy's own
    literals (which its get_state() would reject as well).
    """
    paths = _CLIENT if isinstance(conn, Client) else _SERVER
    try:
        if isinstance(conn, Client):
            return _client_to_proto(conn, describe_certificates)
        if isinstance(conn, Server):
            return _server_to_proto(conn, describe_certificates)
    except (TypeError, UnicodeEncodeError) as e:
        # protobuf names neither the field nor the value; find them (slow path only).
        raise ValueError(_find_bad_value(conn, paths, e)) from e
    raise TypeError(f"expected a mitmproxy Client or Server, got {type(conn).__name__}")


@overload
def from_proto(msg: pb.Client) -> Client: ...
@overload
def from_proto(msg: pb.Server) -> Server: ...
def from_proto(msg: pb.Client | pb.Server) -> Client | Server:
    """The mitmproxy Client or Server for a message, state included.

    Every check runs before the object is built, so a ValueError (naming the
    field) leaves nothing half-made. The state is assigned last: constructing
    an OPEN server with an address would trip mitmproxy's guard.
    """
    if isinstance(msg, pb.Client):
        return _client_from_proto(msg)
    if isinstance(msg, pb.Server):
        return _server_from_proto(msg)
    raise TypeError(f"expected a connmeta.v1 Client or Server, got {type(msg).__name__}")


def _client_to_proto(c: Client, describe: bool) -> pb.Client:
    msg = pb.Client()
    p = _CLIENT
    if c.peername is None:
        raise ValueError(f"{p.peername}: required for a client, got None")
    if c.sockname is None:
        raise ValueError(f"{p.sockname}: required for a client, got None")
    if c.timestamp_start is None:
        raise ValueError(f"{p.timestamp_start}: required for a client, got None")
    _fill_connection(msg.connection, c, describe, p)
    if c.mitmcert is not None:
        _fill_certificate(msg.mitmcert, c.mitmcert, describe, "Client.mitmcert")
    mode = c.proxy_mode
    pm = msg.proxy_mode
    pm.full_spec = mode.full_spec
    pm.type_name = mode.type_name
    pm.data = mode.data
    if mode.custom_listen_host is not None:
        pm.custom_listen_host = mode.custom_listen_host
    if mode.custom_listen_port is not None:
        pm.custom_listen_port = mode.custom_listen_port
    return msg


def _server_to_proto(s: Server, describe: bool) -> pb.Server:
    msg = pb.Server()
    _fill_connection(msg.connection, s, describe, _SERVER)
    address = s.address
    if address is not None:
        if len(address) != 2:
            raise ValueError(f"Server.address: {address!r} is not a (host, port) pair")
        fill_address(msg.address, address, "Server.address")
    if s.timestamp_tcp_setup is not None:
        fill_timestamp(msg.timestamp_tcp_setup, s.timestamp_tcp_setup, "Server.timestamp_tcp_setup")
    if s.via is not None:
        fill_via(msg.via, s.via, "Server.via")
    return msg


def _fill_connection(m: pb.Connection, c: Connection, describe: bool, p: _Paths) -> None:
    m.id = c.id
    m.state = _STATE_VALUES[c.state]
    if c.peername is not None:
        fill_address(m.peername, c.peername, p.peername)
    if c.sockname is not None:
        fill_address(m.sockname, c.sockname, p.sockname)
    transport = _TRANSPORT_VALUES.get(c.transport_protocol)
    if transport is None:
        raise ValueError(f"{p.transport_protocol}: {c.transport_protocol!r} is not tcp or udp")
    m.transport_protocol = transport
    if c.error is not None:
        m.error = c.error
    m.tls = c.tls
    if c.certificate_list:
        path = p.certificate_list
        for i, cert in enumerate(c.certificate_list):
            _fill_certificate(m.certificate_list.add(), cert, describe, f"{path}[{i}]")
    if c.alpn is not None:
        m.alpn = c.alpn
    if c.alpn_offers:
        m.alpn_offers.extend(c.alpn_offers)
    if c.cipher is not None:
        m.cipher = c.cipher
    if c.cipher_list:
        m.cipher_list.extend(c.cipher_list)
    if c.tls_version is not None:
        version = _TLS_VALUES.get(c.tls_version)
        if version is None:
            raise ValueError(f"{p.tls_version}: {c.tls_version!r} is not a TLS version")
        m.tls_version = version
    if c.sni is not None:
        m.sni = c.sni
    if c.timestamp_start is not None:
        fill_timestamp(m.timestamp_start, c.timestamp_start, p.timestamp_start)
    if c.timestamp_end is not None:
        fill_timestamp(m.timestamp_end, c.timestamp_end, p.timestamp_end)
    if c.timestamp_tls_setup is not None:
        fill_timestamp(m.timestamp_tls_setup, c.timestamp_tls_setup, p.timestamp_tls_setup)


def _fill_certificate(m: pb.Certificate, cert: certs.Cert, describe: bool, path: str) -> None:
    der = _x509_of(cert).public_bytes(Encoding.DER)
    if not describe:
        m.der = der
        return
    try:
        m.CopyFrom(facts.described(der))
    except ValueError as e:
        raise ValueError(f"{path}.der: {e}") from e


def _client_from_proto(msg: pb.Client) -> Client:
    p = _CLIENT
    m = msg.connection
    for name in ("peername", "sockname", "timestamp_start"):
        if not m.HasField(name):
            raise ValueError(f"{p.conn}.{name}: required for a client")
    if not msg.HasField("proxy_mode"):
        raise ValueError(
            "Client.proxy_mode: required for a client (mitmproxy's default: 'regular')"
        )
    state, kwargs = _connection_from_proto(m, p)
    spec = msg.proxy_mode.full_spec
    try:
        proxy_mode = ProxyMode.parse(spec)
    except ValueError as e:
        # mitmproxy_rs appends a Rust backtrace to some messages; the first line says it all.
        reason = str(e).partition("\n")[0]
        raise ValueError(
            f"Client.proxy_mode.full_spec: {spec!r} is not a proxy mode: {reason}"
        ) from e
    mitmcert = (
        _cert_from_proto(msg.mitmcert, "Client.mitmcert") if msg.HasField("mitmcert") else None
    )
    client = Client(**kwargs, mitmcert=mitmcert, proxy_mode=proxy_mode)
    client.state = state
    return client


def _server_from_proto(msg: pb.Server) -> Server:
    state, kwargs = _connection_from_proto(msg.connection, _SERVER)
    address = host_port(msg.address, "Server.address") if msg.HasField("address") else None
    tcp_setup = (
        timestamp_to_float(msg.timestamp_tcp_setup, "Server.timestamp_tcp_setup")
        if msg.HasField("timestamp_tcp_setup")
        else None
    )
    # via_to_tuple only returns mitmproxy's nine scheme literals.
    via: Any = via_to_tuple(msg.via, "Server.via") if msg.HasField("via") else None
    server = Server(**kwargs, address=address, timestamp_tcp_setup=tcp_setup, via=via)
    server.state = state
    return server


def _connection_from_proto(m: pb.Connection, p: _Paths) -> tuple[ConnectionState, dict[str, Any]]:
    state = _STATES.get(m.state)
    if state is None:
        raise ValueError(
            f"{p.state}: {enum_label(pb.ConnectionState.Name, m.state)} is not a state"
        )
    transport = _TRANSPORT_NAMES.get(m.transport_protocol)
    if transport is None:
        label = enum_label(pb.TransportProtocol.Name, m.transport_protocol)
        raise ValueError(f"{p.transport_protocol}: {label} is not valid; use TCP or UDP")
    if m.tls_version == pb.TLS_VERSION_UNSPECIFIED:
        tls_version = None
    else:
        tls_version = _TLS_NAMES.get(m.tls_version)
        if tls_version is None:
            raise ValueError(f"{p.tls_version}: {enum_label(pb.TlsVersion.Name, m.tls_version)}")
    has = m.HasField
    path = p.certificate_list
    return state, {
        "peername": address_to_tuple(m.peername, p.peername) if has("peername") else None,
        "sockname": address_to_tuple(m.sockname, p.sockname) if has("sockname") else None,
        "id": m.id,
        "transport_protocol": transport,
        "error": m.error if has("error") else None,
        "tls": m.tls,
        # Lists, as from_state and mitmproxy's TLS layers build them; only
        # address and via need tuples (the guard compares them with !=).
        "certificate_list": [
            _cert_from_proto(c, f"{path}[{i}]") for i, c in enumerate(m.certificate_list)
        ],
        "alpn": m.alpn if has("alpn") else None,
        "alpn_offers": list(m.alpn_offers),
        "cipher": m.cipher if has("cipher") else None,
        "cipher_list": list(m.cipher_list),
        "tls_version": tls_version,
        "sni": m.sni if has("sni") else None,
        "timestamp_start": _optional_time(m, "timestamp_start", p.timestamp_start),
        "timestamp_end": _optional_time(m, "timestamp_end", p.timestamp_end),
        "timestamp_tls_setup": _optional_time(m, "timestamp_tls_setup", p.timestamp_tls_setup),
    }


def _optional_time(m: pb.Connection, name: _TimeField, path: str) -> float | None:
    if not m.HasField(name):
        return None
    ts: Timestamp = getattr(m, name)
    return timestamp_to_float(ts, path)


def _cert_from_proto(m: pb.Certificate, path: str) -> certs.Cert:
    try:
        return certs.Cert(x509.load_der_x509_certificate(m.der))
    except ValueError as e:
        raise ValueError(f"{path}.der: malformed certificate DER ({len(m.der)} bytes): {e}") from e


def _find_bad_value(conn: object, p: _Paths, error: Exception) -> str:
    """Name the field protobuf refused: a str with lone surrogates, or a wrong type."""
    conn_path = p.conn
    fields: list[tuple[str, object, type[object]]] = [
        (f"{conn_path}.id", getattr(conn, "id", None), str),
        (f"{conn_path}.tls", getattr(conn, "tls", None), bool),
    ]
    for name, kind in (("error", str), ("alpn", bytes), ("cipher", str), ("sni", str)):
        value = getattr(conn, name, None)
        if value is not None:
            fields.append((f"{conn_path}.{name}", value, kind))
    for name, kind in (("alpn_offers", bytes), ("cipher_list", str)):
        for i, item in enumerate(getattr(conn, name, None) or ()):
            fields.append((f"{conn_path}.{name}[{i}]", item, kind))
    hosts = (("peername", p.peername), ("sockname", p.sockname), ("address", "Server.address"))
    for name, path in hosts:
        address = getattr(conn, name, None)
        if isinstance(address, tuple) and address:
            fields.append((f"{path}.host", address[0], str))
    via = getattr(conn, "via", None)
    if isinstance(via, tuple) and len(via) == 2 and isinstance(via[1], tuple) and via[1]:
        fields.append(("Server.via.address.host", via[1][0], str))
    mode = getattr(conn, "proxy_mode", None)
    if mode is not None:
        fields.append(("Client.proxy_mode.full_spec", getattr(mode, "full_spec", None), str))
    for path, value, expected in fields:
        if type(value) is not expected:
            return f"{path}: {value!r} is a {type(value).__name__}, expected {expected.__name__}"
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"{path}: {value!r} is not valid Unicode ({e.reason}); messages hold UTF-8"
    return f"{p.kind}: a value the message cannot hold: {error}"
