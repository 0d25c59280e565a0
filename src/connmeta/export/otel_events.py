"""A store change as an OpenTelemetry Event: name, time, severity, attributes.

One change of a connection record (ADDED, MODIFIED, DELETED) is one Event, a
LogRecord with an EventName. Event names carry no dynamic values (the OTel
event rules): one name per change kind, and what happened in mitmproxy is
the ``connmeta.hook`` attribute. Attributes use the semantic conventions
wherever one exists (``server.*``, ``client.*``, ``network.*``, ``tls.*``,
``error.type``) and ``connmeta.*`` for the sidecar's own notions.

Where the conventions leave a choice:

- ``server.address``/``.port`` of a server is where mitmproxy was asked to
  connect, also behind an upstream proxy (``via``); ``network.peer.*`` is the
  socket peer, i.e. the upstream proxy then. On a client, ``server.address``
  is the SNI the client sent (``tls.client.server_name``, which the
  conventions deprecated in its favour, is set too on both kinds).
- On a client connection mitmproxy is the TLS server, so the certificate it
  presented (``mitmcert``) is ``tls.server.*`` and a client certificate is
  ``tls.client.*``; on a server connection the upstream's chain is
  ``tls.server.*``.
- ``tls.cipher`` is the IANA name (``connmeta.export._ciphers``); a suite
  the table does not know is ``connmeta.tls.openssl_cipher`` instead.
- ``error.type`` is one of a few fixed classes (``ERROR_TYPES``): mitmproxy's
  error is free text, which goes to the body.

The Timestamp is the occurrence time, taken from mitmproxy's own timestamps:
the one the reporting hook set (``timestamp_start`` for client_connected,
``timestamp_tcp_setup`` for server_connected, ``timestamp_tls_setup`` for
tls_established_*, ``timestamp_end`` for disconnects). Changes mitmproxy has
no timestamp for (server_connect, TLS failures, resyncs, the sidecar's own
changes: a pending change, a proxy gone) use the record's ``update_time``,
and a deletion (retention) the time the store deleted it.

Pure and SDK-free: ``connmeta.export.otlp`` feeds these to the SDK.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from connmeta.addresses import SCHEME_NAMES, format_address
from connmeta.export._ciphers import iana_cipher
from connmeta.records import Event, EventType
from connmeta.v1 import connection_pb2 as pb

__all__ = [
    "ERROR_TYPES",
    "EVENT_NAMES",
    "SEVERITY_INFO",
    "SEVERITY_WARN",
    "AttributeValue",
    "OtelEvent",
    "to_otel_event",
]

AttributeValue = str | int | bool | Sequence[str]

EVENT_NAMES: Final = {
    EventType.ADDED: "connmeta.connection.added",
    EventType.MODIFIED: "connmeta.connection.modified",
    EventType.DELETED: "connmeta.connection.deleted",
}
"""The EventName of each change kind."""

SEVERITY_INFO: Final = 9  # SeverityNumber.INFO: the default of every event
SEVERITY_WARN: Final = 13  # SeverityNumber.WARN: the connection carries an error

_STATES: Final = {
    pb.CONNECTION_STATE_CLOSED: "closed",
    pb.CONNECTION_STATE_CAN_READ: "can_read",
    pb.CONNECTION_STATE_CAN_WRITE: "can_write",
    pb.CONNECTION_STATE_OPEN: "open",
}
_TRANSPORTS: Final = {pb.TRANSPORT_PROTOCOL_TCP: "tcp", pb.TRANSPORT_PROTOCOL_UDP: "udp"}
# tls.protocol.name and .version per mitmproxy's version string. QUIC runs
# TLS 1.3 (RFC 9001); DTLS keeps its own name, which the conventions' open
# enum admits.
_TLS_VERSIONS: Final = {
    pb.TLS_VERSION_SSL_V3: ("ssl", "3"),
    pb.TLS_VERSION_TLS_V1: ("tls", "1.0"),
    pb.TLS_VERSION_TLS_V1_1: ("tls", "1.1"),
    pb.TLS_VERSION_TLS_V1_2: ("tls", "1.2"),
    pb.TLS_VERSION_TLS_V1_3: ("tls", "1.3"),
    pb.TLS_VERSION_DTLS_V0_9: ("dtls", "0.9"),
    pb.TLS_VERSION_DTLS_V1: ("dtls", "1.0"),
    pb.TLS_VERSION_DTLS_V1_2: ("dtls", "1.2"),
    pb.TLS_VERSION_QUIC_V1: ("tls", "1.3"),
}
_HOOKS: Final = {
    value: name.removeprefix("HOOK_").lower()
    for name, value in pb.Hook.items()
    if value != pb.HOOK_UNSPECIFIED
}
_CHANGE_STATUSES: Final = {
    value: name.removeprefix("CHANGE_STATUS_").lower()
    for name, value in pb.ChangeStatus.items()
    if value != pb.CHANGE_STATUS_UNSPECIFIED
}
_TimeField = Literal["timestamp_start", "timestamp_end", "timestamp_tls_setup"]
# Which of mitmproxy's timestamps a hook's report is the occurrence time of
# (server_connected: Server.timestamp_tcp_setup, see _occurrence_ns).
_HOOK_TIMES: Final[dict[int, _TimeField]] = {
    pb.HOOK_CLIENT_CONNECTED: "timestamp_start",
    pb.HOOK_TLS_ESTABLISHED_CLIENT: "timestamp_tls_setup",
    pb.HOOK_TLS_ESTABLISHED_SERVER: "timestamp_tls_setup",
    pb.HOOK_CLIENT_DISCONNECTED: "timestamp_end",
    pb.HOOK_SERVER_DISCONNECTED: "timestamp_end",
    pb.HOOK_SERVER_CONNECT_ERROR: "timestamp_end",
}

# error.type: low cardinality by rule, so mitmproxy's messages are sorted into
# these classes by the first matching phrase; anything else is "_OTHER".
_ERROR_CLASSES: Final = (
    ("connection refused", "connection_refused"),
    ("timed out", "timeout"),
    ("timeout", "timeout"),
    ("name or service not known", "name_resolution"),
    ("nodename nor servname", "name_resolution"),
    ("getaddrinfo", "name_resolution"),
    ("temporary failure in name resolution", "name_resolution"),
    ("certificate verify failed", "certificate_verify_failed"),
    ("killed", "killed"),
    ("connection reset", "connection_reset"),
    ("network is unreachable", "network_unreachable"),
    ("no route to host", "network_unreachable"),
    ("tls", "tls_error"),
    ("ssl", "tls_error"),
    ("handshake", "tls_error"),
)
ERROR_TYPES: Final = frozenset({cls for _, cls in _ERROR_CLASSES} | {"_OTHER"})
"""Every value ``error.type`` takes."""


@dataclass(frozen=True, slots=True)
class OtelEvent:
    """What one LogRecord carries."""

    name: str
    timestamp_ns: int
    severity_number: int
    severity_text: str
    body: str | None
    attributes: dict[str, AttributeValue]


def to_otel_event(event: Event, deleted_at_ns: int) -> OtelEvent:
    """The Event for one store change; ``deleted_at_ns`` is when the store made it
    (only a DELETED event uses it: its record is the last version, not the deletion)."""
    record = event.record
    msg = record.message()
    attrs: dict[str, AttributeValue] = {}
    if msg.HasField("server"):
        conn = msg.server.connection
        _server_attributes(msg.server, attrs)
    else:
        conn = msg.client.connection
        _client_attributes(msg.client, attrs)
    _connection_attributes(conn, attrs)
    _connmeta_attributes(msg, attrs)
    body: str | None = None
    severity, severity_text = SEVERITY_INFO, "INFO"
    if conn.HasField("error"):
        attrs["error.type"] = classify_error(conn.error)
        body = conn.error
        severity, severity_text = SEVERITY_WARN, "WARN"

    if event.type is EventType.DELETED:
        timestamp = deleted_at_ns
    else:
        timestamp = _occurrence_ns(event, msg, conn)
    return OtelEvent(EVENT_NAMES[event.type], timestamp, severity, severity_text, body, attrs)


def classify_error(message: str) -> str:
    """``error.type`` for one of mitmproxy's error messages (one of ERROR_TYPES)."""
    lowered = message.lower()
    for phrase, cls in _ERROR_CLASSES:
        if phrase in lowered:
            return cls
    return "_OTHER"


def _occurrence_ns(event: Event, msg: pb.ConnectionRecord, conn: pb.Connection) -> int:
    record, prev = event.record, event.prev
    # A version whose mitmproxy part equals the one before is the sidecar's own
    # change (a pending change accepted or settled): it happened at update_time.
    own_change = prev is not None and (
        record.data[record.meta_end() :] == prev.data[prev.meta_end() :]
    )
    if not own_change:
        hook = msg.metadata.last_hook
        if hook == pb.HOOK_SERVER_CONNECTED:
            if msg.server.HasField("timestamp_tcp_setup"):
                return int(msg.server.timestamp_tcp_setup.ToNanoseconds())
        else:
            field = _HOOK_TIMES.get(hook)
            if field is not None and conn.HasField(field):
                return int(getattr(conn, field).ToNanoseconds())
    return int(msg.metadata.update_time.ToNanoseconds())


def _put_address(attrs: dict[str, AttributeValue], prefix: str, address: pb.Address) -> None:
    attrs[f"{prefix}.address"] = address.host
    attrs[f"{prefix}.port"] = address.port


def _network_type(host: str) -> str | None:
    try:
        return "ipv4" if ipaddress.ip_address(host).version == 4 else "ipv6"
    except ValueError:
        return None  # a host name: no address family to tell


def _client_attributes(client: pb.Client, attrs: dict[str, AttributeValue]) -> None:
    conn = client.connection
    if conn.HasField("peername"):
        # No PROXY protocol or X-Forwarded-For here: the client behind any
        # intermediaries is the socket peer.
        _put_address(attrs, "client", conn.peername)
    if conn.HasField("sni"):
        attrs["server.address"] = conn.sni
    if client.HasField("mitmcert"):
        _certificate_attributes(client.mitmcert, "tls.server", attrs)
    if conn.certificate_list:
        _certificate_attributes(conn.certificate_list[0], "tls.client", attrs)
    if client.HasField("proxy_mode"):
        attrs["connmeta.client.proxy_mode"] = client.proxy_mode.full_spec


def _server_attributes(server: pb.Server, attrs: dict[str, AttributeValue]) -> None:
    if server.HasField("address"):
        _put_address(attrs, "server", server.address)
    conn = server.connection
    if conn.certificate_list:
        _certificate_attributes(conn.certificate_list[0], "tls.server", attrs)
    if server.HasField("via"):
        scheme = SCHEME_NAMES.get(server.via.scheme, "unspecified")
        attrs["connmeta.server.via"] = f"{scheme}://{format_address(server.via.address)}"


def _connection_attributes(conn: pb.Connection, attrs: dict[str, AttributeValue]) -> None:
    if conn.HasField("peername"):
        _put_address(attrs, "network.peer", conn.peername)
        network_type = _network_type(conn.peername.host)
        if network_type is not None:
            attrs["network.type"] = network_type
    if conn.HasField("sockname"):
        _put_address(attrs, "network.local", conn.sockname)
    transport = _TRANSPORTS.get(conn.transport_protocol)
    if transport is not None:
        attrs["network.transport"] = transport
    if conn.HasField("sni"):
        attrs["tls.client.server_name"] = conn.sni
    if conn.tls:
        attrs["tls.established"] = conn.HasField("timestamp_tls_setup")
    version = _TLS_VERSIONS.get(conn.tls_version)
    if version is not None:
        attrs["tls.protocol.name"], attrs["tls.protocol.version"] = version
    if conn.HasField("cipher"):
        iana = iana_cipher(conn.cipher)
        if iana is not None:
            attrs["tls.cipher"] = iana
        else:
            attrs["connmeta.tls.openssl_cipher"] = conn.cipher
    if conn.HasField("alpn") and conn.alpn:
        attrs["tls.next_protocol"] = conn.alpn.decode("ascii", "backslashreplace")
    if conn.alpn_offers:
        attrs["connmeta.tls.alpn_offers"] = [
            offer.decode("ascii", "backslashreplace") for offer in conn.alpn_offers
        ]


def _certificate_attributes(
    cert: pb.Certificate, prefix: str, attrs: dict[str, AttributeValue]
) -> None:
    """``tls.server.*`` or ``tls.client.*`` of a leaf certificate (never the chain:
    PEM chains are kilobytes per event)."""
    if cert.sha256_fingerprint:
        attrs[f"{prefix}.hash.sha256"] = cert.sha256_fingerprint.hex().upper()
    if cert.HasField("not_before"):
        attrs[f"{prefix}.not_before"] = cert.not_before.ToJsonString()
    if cert.HasField("not_after"):
        attrs[f"{prefix}.not_after"] = cert.not_after.ToJsonString()
    if cert.subject:
        attrs[f"{prefix}.subject"] = _distinguished_name(cert.subject)
    if cert.issuer:
        attrs[f"{prefix}.issuer"] = _distinguished_name(cert.issuer)


def _distinguished_name(attributes: Sequence[pb.NameAttribute]) -> str:
    """RFC 4514 order (last RDN first), as the conventions' examples write it."""
    return ", ".join(f"{a.name}={_escape_dn(a.value)}" for a in reversed(attributes))


def _escape_dn(value: str) -> str:
    out = "".join("\\" + ch if ch in ',+"\\<>;' else ch for ch in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def _connmeta_attributes(msg: pb.ConnectionRecord, attrs: dict[str, AttributeValue]) -> None:
    meta = msg.metadata
    is_server = msg.HasField("server")
    conn = msg.server.connection if is_server else msg.client.connection
    attrs["connmeta.connection.id"] = conn.id
    attrs["connmeta.connection.kind"] = "server" if is_server else "client"
    attrs["connmeta.connection.state"] = _STATES.get(conn.state, "closed")
    hook = _HOOKS.get(meta.last_hook)
    if hook is not None:
        attrs["connmeta.hook"] = hook
    # A client's own id, so that one attribute groups a client with its servers.
    client_id = meta.client_id if is_server else conn.id
    if client_id:
        attrs["connmeta.client.id"] = client_id
    attrs["connmeta.revision"] = meta.revision
    if meta.proxy_id:
        attrs["connmeta.proxy.id"] = meta.proxy_id
    if meta.HasField("last_change"):
        change = meta.last_change
        if change.principal:
            attrs["connmeta.last_change.principal"] = change.principal
        if change.actor:
            attrs["connmeta.last_change.actor"] = change.actor
        status = _CHANGE_STATUSES.get(change.status)
        if status is not None:
            attrs["connmeta.last_change.status"] = status
