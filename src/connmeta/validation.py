"""Every rule an input must satisfy, in one place: the contract of ``proto/connmeta/v1``.

The store, the report stream and routing all ask this module, so a rule is
stated once and a snapshot, an update and a router's answer are held to the
same standard. Each rule here is stated in a proto comment, and each rule a
proto comment states is checked here (``tests/test_validation.py`` walks
them).

Checks return violations, ``(field path, description)`` pairs, so that a
caller can report every problem of a message at once; an empty list means
valid. Descriptions quote client input only through :func:`shown`, which
escapes it and keeps a short prefix: an error must never grow with what the
caller sent (trailers over the client's metadata limit are lost).

The snapshot rules are those of ``connmeta.mitm.from_proto``: a snapshot
accepted here is one the converter turns back into a mitmproxy object.
protovalidate (``buf.validate``) could state the simple ones in the schema,
but not the proxy-mode grammar or certificate parsing, and its Python
runtime evaluates CEL per field, several times the cost of these checks on
the ingest path; one plain module keeps all of them together.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from typing import Final

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from connmeta import certs
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs

__all__ = [
    "ECHO_CHARS",
    "MAX_ACTOR_BYTES",
    "MAX_CONNECTION_BYTES",
    "MAX_HOST_BYTES",
    "MAX_ID_BYTES",
    "MAX_ROUTER_NAME_BYTES",
    "MAX_ROUTE_DEADLINE_SECONDS",
    "UPDATABLE_FIELDS",
    "VIA_SCHEMES",
    "Violations",
    "actor_problem",
    "change_violations",
    "escape",
    "id_problem",
    "plain_mode",
    "proxy_mode_problem",
    "route_deadline_violations",
    "router_name_problem",
    "shown",
    "snapshot_violations",
    "update_violations",
]

Violations = list[tuple[str, str]]

MAX_ID_BYTES: Final = 256
"""Connection ids, client ids, proxy ids, query ids."""
MAX_HOST_BYTES: Final = 255
"""A host in a reported address (RFC 1035's bound, which mitmproxy applies too)."""
MAX_UPDATE_HOST_BYTES: Final = 253
"""A host asked for in an update or a route answer: a DNS name or an IP literal."""
MAX_ACTOR_BYTES: Final = 256
MAX_ROUTER_NAME_BYTES: Final = 128
MAX_CONNECTION_BYTES: Final = 1 << 20
"""An encoded Client or Server. A page or watch batch stops growing past 1 MiB
and holds at least one record, so a record below this always fits a client's
default 4 MiB message limit."""
MAX_ROUTE_DEADLINE_SECONDS: Final = 60
ECHO_CHARS: Final = 64
"""How much of a client's value an error or log line quotes."""

UPDATABLE_FIELDS: Final = frozenset(("address", "via"))
VIA_SCHEMES: Final = frozenset((pb.SCHEME_HTTP, pb.SCHEME_HTTPS))
"""mitmproxy's HttpUpstreamProxy asserts these two; any other scheme as a via
crashes the connection's layer (facts §7)."""

_PORT_MAX: Final = 65535
_STATES: Final = frozenset(pb.ConnectionState.values())
_HOOKS: Final = frozenset(pb.Hook.values())
_TRANSPORTS: Final = frozenset((pb.TRANSPORT_PROTOCOL_TCP, pb.TRANSPORT_PROTOCOL_UDP))
_TLS_VERSIONS: Final = frozenset(pb.TlsVersion.values())
_SCHEMES: Final = frozenset(pb.Scheme.values()) - {pb.SCHEME_UNSPECIFIED}
_OUTCOMES: Final = frozenset(rs.RouteOutcomeKind.values()) - {rs.ROUTE_OUTCOME_KIND_UNSPECIFIED}
# Timestamp's range (0001-01-01 to 9999-12-31), as connmeta.mitm enforces it.
_MIN_SECONDS: Final = -62_135_596_800
_MAX_SECONDS: Final = 253_402_300_799
_NANOS: Final = 1_000_000_000
# Printable ASCII: ids without the space, free text (actor, names) with it.
_ID_RE: Final = re.compile(r"[\x21-\x7e]+")
_TEXT_RE: Final = re.compile(r"[\x20-\x7e]+")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_UPDATE_HOST_BAD: Final = re.compile(r"[\s/\[\]@?#]")


# -- quoting client input ------------------------------------------------------


def shown(value: str | bytes, limit: int = ECHO_CHARS) -> str:
    """``value`` as an escaped literal of at most ``limit`` characters of it.

    Longer values end with ``…`` and their full length, so an error says
    what was wrong without growing with the input.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} {'bytes' if isinstance(value, bytes) else 'chars'})"


def escape(text: str, limit: int = 256) -> str:
    """``text`` for a log line: control characters escaped (no forged lines), clipped."""
    clipped = text if len(text) <= limit else text[:limit] + "…"
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", clipped)


# -- identifiers and free text -------------------------------------------------


def id_problem(value: str, *, required: bool = True) -> str | None:
    """Why ``value`` is not a valid id (connection, client, proxy or query id), or None."""
    if not value:
        return "required" if required else None
    if len(value) > MAX_ID_BYTES:  # chars >= bytes would be; checked in bytes below
        return f"{shown(value)} is longer than {MAX_ID_BYTES} bytes"
    if not _ID_RE.fullmatch(value):
        return f"{shown(value)} must be printable ASCII without spaces (0x21-0x7E)"
    return None


def _text_problem(value: str, limit: int) -> str | None:
    if len(value) > limit:
        return f"{shown(value)} is longer than {limit} bytes"
    if value and not _TEXT_RE.fullmatch(value):
        return f"{shown(value)} must be printable ASCII (0x20-0x7E)"
    return None


def actor_problem(actor: str) -> str | None:
    """Why an update's ``actor`` is refused, or None. Empty is allowed (defaulted)."""
    return _text_problem(actor, MAX_ACTOR_BYTES)


def router_name_problem(name: str) -> str | None:
    """Why a router name is refused, or None."""
    if not name:
        return "required, the router's name"
    return _text_problem(name, MAX_ROUTER_NAME_BYTES)


# -- snapshots: the contract of connection.proto ----------------------------------


def snapshot_violations(
    snap: rs.ConnectionSnapshot, path: str, body: bytes | None = None
) -> Violations:
    """Every way ``snap`` breaks connection.proto's and report_service.proto's rules.

    ``body`` is its client or server as received, if the caller has it.
    """
    if body and _plainly_valid(snap, body):
        return []
    out: Violations = []
    which = snap.WhichOneof("connection")
    if snap.hook not in _HOOKS:
        out.append((f"{path}.hook", f"unknown Hook value {snap.hook}"))
    if which is None:
        out.append((f"{path}.connection", "one of client or server is required"))
        return out
    side: pb.Client | pb.Server = snap.client if which == "client" else snap.server
    side_path = f"{path}.{which}"
    size = side.ByteSize() if body is None else len(body)
    if size > MAX_CONNECTION_BYTES:
        out.append((side_path, f"{size} bytes encoded; at most {MAX_CONNECTION_BYTES}"))
        return out
    _connection(side.connection, f"{side_path}.connection", out)
    if which == "client":
        _client(snap.client, side_path, out)
        if snap.HasField("route_outcome"):
            out.append((f"{path}.route_outcome", "only a server snapshot carries one"))
    else:
        _server(snap.server, side_path, out)
        problem = id_problem(snap.client_id)
        if problem:
            out.append((f"{path}.client_id", f"{problem}: the id of the client it serves"))
        if snap.HasField("route_outcome"):
            _route_outcome(snap.route_outcome, f"{path}.route_outcome", out)
    return out


# The ingest path asks this first. It states the same rules as the checks
# below, more cheaply and conservatively: True only for a snapshot those
# checks pass (tests/test_validation.py holds the two together), False for
# anything unusual, which the checks then explain with field paths. Each upb
# attribute read costs 0.1-0.4 µs; on bench/store_bench.py's servers this
# takes about a third of the full checks' time (figure in bench/README.md).
def _plainly_valid(snap: rs.ConnectionSnapshot, body: bytes) -> bool:
    if len(body) > MAX_CONNECTION_BYTES or snap.hook not in _HOOKS:
        return False
    is_server = snap.HasField("server")
    side: pb.Client | pb.Server = snap.server if is_server else snap.client
    conn = side.connection
    if not (
        _plain_id(conn.id)
        and conn.state in _STATES
        and conn.transport_protocol in _TRANSPORTS
        and conn.tls_version in _TLS_VERSIONS
        and _plain_socket(conn.peername)
        and _plain_socket(conn.sockname)
        and _plain_time(conn.timestamp_start)
        and _plain_time(conn.timestamp_end)
        and _plain_time(conn.timestamp_tls_setup)
    ):
        return False
    # A certificate_list entry is tagged 0x42 ("B"): bytes without one hold
    # none, and the search in C costs less than the field's container.
    if b"B" in body and len(conn.certificate_list):
        return False
    if is_server:
        server = snap.server
        address = server.address
        return (
            _plain_id(snap.client_id)
            and address.port <= _PORT_MAX
            and _plain_host(address.host)
            and not address.HasField("flowinfo")
            and not address.HasField("scope_id")
            and _plain_time(server.timestamp_tcp_setup)
            and not server.HasField("via")
            and not snap.HasField("route_outcome")
        )
    client = snap.client
    has = conn.HasField
    return (
        has("peername")
        and has("sockname")
        and has("timestamp_start")
        and client.HasField("proxy_mode")
        and proxy_mode_problem(client.proxy_mode.full_spec) is None
        and not client.HasField("mitmcert")
        and not snap.HasField("route_outcome")
    )


@functools.lru_cache(maxsize=256)
def plain_mode(full_spec: bytes) -> bool:
    """Whether a proxy_mode.full_spec, as UTF-8 bytes, is one mitmproxy parses
    (``connmeta._ingest`` asks: a proxy reports a handful of modes)."""
    try:
        spec = full_spec.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return proxy_mode_problem(spec) is None


def _plain_id(value: str) -> bool:
    return (
        0 < len(value) <= MAX_ID_BYTES
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


def _plain_host(host: str) -> bool:
    return len(host) <= MAX_HOST_BYTES and host.isascii() and host.isprintable()


def _plain_socket(address: pb.Address) -> bool:
    return (
        address.port <= _PORT_MAX
        and _plain_host(address.host)
        and (address.HasField("flowinfo") or not address.HasField("scope_id"))
    )


def _plain_time(ts: Timestamp) -> bool:
    return 0 <= ts.nanos < _NANOS and _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS


def _connection(conn: pb.Connection, path: str, out: Violations) -> None:
    problem = id_problem(conn.id)
    if problem:
        out.append((f"{path}.id", problem))
    if conn.state not in _STATES:
        out.append((f"{path}.state", f"unknown ConnectionState value {conn.state}; use 0-3"))
    if conn.transport_protocol not in _TRANSPORTS:
        out.append((f"{path}.transport_protocol", "required: TCP or UDP"))
    if conn.tls_version not in _TLS_VERSIONS:
        out.append((f"{path}.tls_version", f"unknown TlsVersion value {conn.tls_version}"))
    has = conn.HasField
    if has("peername"):
        _socket_address(conn.peername, f"{path}.peername", out)
    if has("sockname"):
        _socket_address(conn.sockname, f"{path}.sockname", out)
    for name in ("timestamp_start", "timestamp_end", "timestamp_tls_setup"):
        if has(name):
            _timestamp(getattr(conn, name), f"{path}.{name}", out)
    for i, cert in enumerate(conn.certificate_list):
        _certificate(cert, f"{path}.certificate_list[{i}]", out)


def _client(client: pb.Client, path: str, out: Violations) -> None:
    conn = client.connection
    for name in ("peername", "sockname", "timestamp_start"):
        if not conn.HasField(name):
            out.append((f"{path}.connection.{name}", "required for a client"))
    if not client.HasField("proxy_mode"):
        out.append((f"{path}.proxy_mode", "required for a client (mitmproxy's default: regular)"))
    else:
        problem = proxy_mode_problem(client.proxy_mode.full_spec)
        if problem:
            out.append((f"{path}.proxy_mode.full_spec", problem))
    if client.HasField("mitmcert"):
        _certificate(client.mitmcert, f"{path}.mitmcert", out)


def _server(server: pb.Server, path: str, out: Violations) -> None:
    if server.HasField("address"):
        _pair(server.address, f"{path}.address", out)
    if server.HasField("timestamp_tcp_setup"):
        _timestamp(server.timestamp_tcp_setup, f"{path}.timestamp_tcp_setup", out)
    if server.HasField("via"):
        via = server.via
        if via.scheme not in _SCHEMES:
            out.append(
                (f"{path}.via.scheme", f"required, one of mitmproxy's schemes; got {via.scheme}")
            )
        if not via.HasField("address"):
            out.append((f"{path}.via.address", "required: where the server listens"))
        else:
            _pair(via.address, f"{path}.via.address", out)


def _route_outcome(outcome: rs.RouteOutcome, path: str, out: Violations) -> None:
    if outcome.kind not in _OUTCOMES:
        out.append((f"{path}.kind", f"required, a RouteOutcomeKind; got {outcome.kind}"))
    problem = id_problem(outcome.query_id, required=False)
    if problem:
        out.append((f"{path}.query_id", problem))
    problem = _text_problem(outcome.actor, MAX_ACTOR_BYTES)
    if problem:
        out.append((f"{path}.actor", problem))
    for name in ("applied_fields", "deferred_fields"):
        for i, field in enumerate(getattr(outcome, name)):
            if field not in UPDATABLE_FIELDS:
                out.append((f"{path}.{name}[{i}]", f"{shown(field)}: only address and via"))
    if outcome.HasField("waited"):
        _duration(outcome.waited, f"{path}.waited", out)


def _host(host: str, path: str, out: Violations) -> None:
    if len(host) > MAX_HOST_BYTES or len(host.encode()) > MAX_HOST_BYTES:
        out.append((path, f"{shown(host)} is longer than {MAX_HOST_BYTES} bytes"))
    elif _CONTROL_RE.search(host):
        out.append((path, f"{shown(host)} holds control characters"))


def _socket_address(address: pb.Address, path: str, out: Violations) -> None:
    _host(address.host, f"{path}.host", out)
    if address.port > _PORT_MAX:
        out.append((f"{path}.port", f"{address.port} is outside 0-{_PORT_MAX}"))
    if address.HasField("scope_id") and not address.HasField("flowinfo"):
        out.append((f"{path}.scope_id", "set without flowinfo; set flowinfo too (0 if unknown)"))


def _pair(address: pb.Address, path: str, out: Violations) -> None:
    """A (host, port) address: Server.address and every ServerSpec address."""
    _host(address.host, f"{path}.host", out)
    if address.port > _PORT_MAX:
        out.append((f"{path}.port", f"{address.port} is outside 0-{_PORT_MAX}"))
    _no_socket_parts(address, path, out)


def _no_socket_parts(address: pb.Address, path: str, out: Violations) -> None:
    for name in ("flowinfo", "scope_id"):
        if address.HasField(name):
            out.append(
                (
                    f"{path}.{name}",
                    "mitmproxy holds this address as a (host, port) pair; leave it unset",
                )
            )


def _timestamp(ts: Timestamp, path: str, out: Violations) -> None:
    if not 0 <= ts.nanos < _NANOS:
        out.append((f"{path}.nanos", f"{ts.nanos} is outside 0-999999999"))
    if not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS:
        out.append((f"{path}.seconds", f"{ts.seconds} is outside 0001-01-01 to 9999-12-31"))


def _duration(d: Duration, path: str, out: Violations) -> None:
    if not -_NANOS < d.nanos < _NANOS or (
        d.seconds and d.nanos and (d.seconds < 0) != (d.nanos < 0)
    ):
        out.append((path, f"not a valid Duration (seconds {d.seconds}, nanos {d.nanos})"))


def _certificate(cert: pb.Certificate, path: str, out: Violations) -> None:
    try:
        certs.described(cert.der)  # cached: the store describes the same DER next
    except ValueError as e:
        out.append((f"{path}.der", str(e)[:200]))


# -- mitmproxy's ProxyMode grammar (mitmproxy/proxy/mode_specs.py) ----------------

_NO_DATA_MODES: Final = frozenset(("regular", "transparent", "socks5", "dns"))
_FREE_DATA_MODES: Final = frozenset(("wireguard", "tun"))
_SERVER_SPEC_RE: Final = re.compile(
    r"(?:(?P<scheme>\w+)://)?(?P<host>[^:/]+|\[.+\])(?::(?P<port>[0-9]+))?/?", re.ASCII
)
_SPEC_SCHEMES: Final = frozenset(
    ("http", "https", "http3", "tls", "dtls", "tcp", "udp", "dns", "quic")
)
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "quic": 443, "http3": 443, "dns": 53}
_LABEL_RE: Final = re.compile(rb"[A-Z\d\-_]{1,63}", re.IGNORECASE)
_LOCAL_ITEM_RE: Final = re.compile(r"!?[^,!\s]+")


@functools.lru_cache(maxsize=256)
def proxy_mode_problem(spec: str) -> str | None:
    """Why mitmproxy's ``ProxyMode.parse(spec)`` would refuse ``spec``, or None.

    A subset of what mitmproxy accepts where its own parser is lax (a port
    must be ASCII digits; ``int()`` would also take " 3" or "٣"), so every
    accepted spec parses there. Cached: a proxy reports a handful of modes.
    """
    if len(spec) > 1024:
        return f"{shown(spec)} is longer than 1024 characters"
    head, _, listen_at = spec.rpartition("@")
    if not head:
        head, listen_at = listen_at, ""
    mode, _, data = head.partition(":")
    if listen_at:
        port_text = listen_at.rpartition(":")[2]
        if not (port_text.isascii() and port_text.isdigit() and int(port_text) <= _PORT_MAX):
            return f"{shown(spec)}: listen port {shown(port_text)} is not 0-{_PORT_MAX}"
    mode = mode.lower()
    if mode in _NO_DATA_MODES:
        return f"{shown(spec)}: mode {mode} takes no arguments" if data else None
    if mode in _FREE_DATA_MODES:
        return None
    if mode == "upstream":
        problem = _server_spec_problem(data, "http")
        if problem is None and not data.startswith(("http://", "https://")) and "://" in data:
            problem = "an upstream proxy is http or https"
        return f"{shown(spec)}: {problem}" if problem else None
    if mode == "reverse":
        problem = _server_spec_problem(data, "https")
        return f"{shown(spec)}: {problem}" if problem else None
    if mode == "local":
        if data and not all(_LOCAL_ITEM_RE.fullmatch(item) for item in data.split(",")):
            return f"{shown(spec)}: not a local redirector spec"
        return None
    return f"{shown(spec)}: unknown mode {shown(mode)}"


def _server_spec_problem(text: str, default_scheme: str) -> str | None:
    """mitmproxy.net.server_spec.parse's checks."""
    m = _SERVER_SPEC_RE.fullmatch(text)
    if not m:
        return f"invalid server specification {shown(text)}"
    scheme = m.group("scheme") or default_scheme
    if scheme not in _SPEC_SCHEMES:
        return f"invalid server scheme {shown(scheme)}"
    host = m.group("host")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not _is_valid_host(host):
        return f"invalid host name {shown(host)}"
    if m.group("port") is None:
        if scheme not in _DEFAULT_PORTS:
            return f"a port is required for {scheme}"
    elif int(m.group("port")) > _PORT_MAX:
        return f"port {m.group('port')} is outside 0-{_PORT_MAX}"
    return None


def _is_valid_host(host: str) -> bool:
    """mitmproxy.net.check.is_valid_host, for str."""
    try:
        encoded = host.encode("idna")
        encoded.decode("idna")
    except (UnicodeError, ValueError):
        return False
    if len(encoded) > 255:
        return False
    if encoded.endswith(b"."):
        encoded = encoded[:-1]
    if all(_LABEL_RE.fullmatch(label) for label in encoded.split(b".")):
        return True
    try:
        ipaddress.ip_address(encoded.decode("idna"))
    except ValueError:
        return False
    return True


# -- changes: UpdateServerConnection and router answers ------------------------------


def _target_host_problem(host: str) -> str | None:
    if not host:
        return "required, a host name or IP address"
    if len(host.encode()) > MAX_UPDATE_HOST_BYTES:
        return f"{shown(host)} is longer than a host name can be ({MAX_UPDATE_HOST_BYTES} bytes)"
    if _UPDATE_HOST_BAD.search(host) or not host.isprintable():
        return f"{shown(host)} is not a host name or IP address (unbracketed for IPv6)"
    return None


def _target(address: pb.Address, path: str, out: Violations) -> None:
    problem = _target_host_problem(address.host)
    if problem:
        out.append((f"{path}.host", problem))
    if not 1 <= address.port <= _PORT_MAX:
        out.append((f"{path}.port", f"{address.port} is outside 1-{_PORT_MAX}"))
    _no_socket_parts(address, path, out)


def change_violations(
    mask: Iterable[str],
    address: pb.Address | None,
    via: pb.ServerSpec | None,
    *,
    mask_required: bool,
    prefix: str = "",
) -> Violations:
    """What is wrong with a change of address/via (an update, or a router's answer).

    Fields not named in ``mask`` are ignored, whatever they hold. A router
    may send an empty mask ("no change"); an update may not.
    """
    out: Violations = []
    paths = list(mask)
    if not paths and mask_required:
        out.append((f"{prefix}update_mask", "required: name 'address', 'via' or both"))
    for i, path in enumerate(paths):
        if path not in UPDATABLE_FIELDS:
            out.append(
                (
                    f"{prefix}update_mask.paths[{i}]",
                    f"{shown(path)} cannot be changed; only 'address' and 'via' can",
                )
            )
    if "address" in paths:
        if address is None:
            out.append((f"{prefix}address", "required when update_mask names 'address'"))
        else:
            _target(address, f"{prefix}address", out)
    if "via" in paths and via is not None:
        if via.scheme not in VIA_SCHEMES:
            label = pb.Scheme.Name(via.scheme) if via.scheme in pb.Scheme.values() else via.scheme
            out.append(
                (
                    f"{prefix}via.scheme",
                    f"{label}: an upstream proxy is spoken to over http or https",
                )
            )
        if not via.HasField("address"):
            out.append((f"{prefix}via.address", "required: where the upstream proxy listens"))
        else:
            _target(via.address, f"{prefix}via.address", out)
    return out


def update_violations(
    id: str,
    address: pb.Address | None,
    via: pb.ServerSpec | None,
    mask: Iterable[str],
    actor: str = "",
) -> Violations:
    """What is wrong with an UpdateServerConnectionRequest."""
    out: Violations = []
    problem = id_problem(id)
    if problem:
        out.append(("id", problem))
    out.extend(change_violations(mask, address, via, mask_required=True))
    problem = actor_problem(actor)
    if problem:
        out.append(("actor", problem))
    return out


def route_deadline_violations(deadline: Duration, path: str) -> Violations:
    """A ResyncStart.route_deadline: a valid Duration of 0 to 60 s."""
    out: Violations = []
    _duration(deadline, path, out)
    if (
        not out
        and not 0 <= deadline.seconds + deadline.nanos / _NANOS <= MAX_ROUTE_DEADLINE_SECONDS
    ):
        out.append((path, f"{deadline.seconds}s is outside 0-{MAX_ROUTE_DEADLINE_SECONDS}s"))
    return out
