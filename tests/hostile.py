"""Hostile input for every RPC, and the contract every stored record must keep.

Strategies here build requests from the real message types (huge, empty,
control-character and unicode strings, out-of-range enums and ports, IPv6
4-tuples where pairs are expected, forged page tokens, garbage certificates,
wrong oneofs, kind changes...) and raw bytes that are not a message at all.
They refer to a small seeded store by fixed ids: every example runs against
a fresh sidecar (it starts in a few milliseconds), so ids need not be unique
across examples and a failure replays on its own.

``contract_violations`` is the oracle for records the server accepted: the
rules the comments of ``proto/connmeta/v1/*.proto`` state, checked on the
stored record.
"""

from __future__ import annotations

import datetime
import functools
import re
import unicodedata
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import strategies as st
from mitmproxy.proxy.mode_specs import ProxyMode

from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import report_service_pb2 as rs
from connmeta.v1 import router_service_pb2 as rt

# The seeded store: one open client, one closed client, an OPEN server (its
# address is guarded) and a CLOSED one (updates are accepted), all reported
# by the live proxy SEED_PROXY.
SEED_PROXY = "seed-proxy"
CLIENT = "11111111-1111-4111-8111-111111111111"
CLIENT_CLOSED = "22222222-2222-4222-8222-222222222222"
SERVER_OPEN = "33333333-3333-4333-8333-333333333333"
SERVER_CLOSED = "44444444-4444-4444-8444-444444444444"
SEEDED = (CLIENT, CLIENT_CLOSED, SERVER_OPEN, SERVER_CLOSED)
# Placeholder the test replaces with the target record's current etag.
CURRENT_ETAG = "$current-etag"

MiB = 1024 * 1024
LONG = 300  # a string longer than this must never come back whole in an error

# --- strings -------------------------------------------------------------

_nasty = [
    "", " ", " 3", "٣", "3 ", "+3", "-1", "0x10", "1e3", "\x00", "a\nb", "a\r\nINFO forged",
    "\x1b[31mred", "\u202eevil", "\u2028", "\ufeff", "\x7f", "\x85", "é", "日本", "🙂",
    "*.", "*", "*.example.com", "[::1]", "::1", "a b", "a/b", "a@b", "a?b", "a#b", "%00",
    "..", "../etc/passwd", "${jndi:x}", "'; DROP TABLE x; --", "null", "None",
]  # fmt: skip
_sized = st.sampled_from([1, 63, 64, 128, 129, 253, 254, 255, 256, 257, 1024, 20_000])
texts = st.one_of(
    st.sampled_from(_nasty),
    st.text(max_size=12),
    st.text(alphabet=st.characters(codec="ascii"), max_size=12),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\n", "🙂"]), _sized),
)
# Mostly ordinary-looking ids, so that requests get past the id check.
ids = st.one_of(
    st.sampled_from(SEEDED),
    st.uuids().map(str),
    texts,
    st.builds(lambda n: "i" * n, st.sampled_from([255, 256, 257])),
)
ports = st.one_of(
    st.sampled_from([0, 1, 443, 65535, 65536, 70_000, 2**31, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)
enum_values = st.one_of(st.integers(-3, 12), st.sampled_from([-(2**31), 2**31 - 1, 99]))
hosts = st.one_of(
    st.sampled_from(["example.com", "127.0.0.1", "::1", "2001:db8::1", "fe80::1%eth0"]),
    texts,
)
_u32 = st.one_of(st.sampled_from([0, 1, 2**20, 2**32 - 1]), st.integers(0, 2**32 - 1))


@st.composite
def addresses(draw: st.DrawFn) -> pb.Address:
    """Hostile addresses, IPv6 4-tuples (flowinfo, scope_id) included."""
    msg = pb.Address(host=draw(hosts), port=draw(ports))
    if draw(st.booleans()):
        msg.flowinfo = draw(_u32)
    if draw(st.booleans()):
        msg.scope_id = draw(_u32)
    return msg


@st.composite
def server_specs(draw: st.DrawFn) -> pb.ServerSpec:
    msg = pb.ServerSpec(scheme=draw(st.sampled_from([1, 2]) | enum_values))  # type: ignore[arg-type]
    if draw(st.integers(0, 4)):  # mostly with an address, which is required
        msg.address.CopyFrom(draw(addresses()))
    return msg


@st.composite
def timestamps(draw: st.DrawFn) -> Timestamp:
    seconds = draw(
        st.sampled_from([0, -1, -62_135_596_801, 253_402_300_800, 2**63 - 1, -(2**63)])
        | st.integers(-(2**63), 2**63 - 1)
    )
    nanos = draw(
        st.sampled_from([0, -1, 999_999_999, 1_000_000_000]) | st.integers(-(2**31), 2**31 - 1)
    )
    return Timestamp(seconds=seconds, nanos=nanos)


durations = st.builds(
    Duration,
    seconds=st.sampled_from([0, 1, 60, 61, -1, 315_576_000_001, 2**63 - 1, -(2**63)])
    | st.integers(-(2**63), 2**63 - 1),
    nanos=st.sampled_from([0, 1, 999_999_999, 1_000_000_000, -1])
    | st.integers(-(2**31), 2**31 - 1),
)

# --- certificates --------------------------------------------------------


@functools.cache
def real_der() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile.example")])
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
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


@st.composite
def garbage_ders(draw: st.DrawFn) -> bytes:
    der = real_der()
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return b""
    if choice == 1:
        return draw(st.binary(max_size=64))
    if choice == 2:
        return der[: draw(st.integers(0, len(der) - 1))]
    if choice == 3:
        at = draw(st.integers(0, len(der) - 1))
        return der[:at] + bytes([draw(st.integers(0, 255))]) + der[at + 1 :]
    if choice == 4:
        return draw(
            st.sampled_from([b"0\x80", b"0\x03\x02\x01\x00", b"\x30\x82\xff\xff", b"0\x00"])
        )
    return der + draw(st.binary(min_size=1, max_size=8))


@st.composite
def certificates(draw: st.DrawFn) -> pb.Certificate:
    msg = pb.Certificate(der=draw(garbage_ders() | st.just(real_der())))
    if draw(st.booleans()):  # output-only fields, which input must not be trusted with
        msg.subject_common_name = draw(texts)
        msg.key_size = draw(_u32)
        msg.serial_number = draw(texts)
    return msg


# --- snapshots -----------------------------------------------------------


def base_client(id: str, state: int = pb.CONNECTION_STATE_OPEN) -> rs.ConnectionSnapshot:
    conn = pb.Connection(
        id=id,
        state=state,  # type: ignore[arg-type]
        transport_protocol=pb.TRANSPORT_PROTOCOL_TCP,
        peername=pb.Address(host="198.51.100.7", port=51234),
        sockname=pb.Address(host="127.0.0.1", port=8080),
    )
    conn.timestamp_start.FromNanoseconds(1_700_000_000_000_000_000)
    client = pb.Client(connection=conn, proxy_mode=pb.ProxyMode(full_spec="regular"))
    return rs.ConnectionSnapshot(hook=pb.HOOK_CLIENT_CONNECTED, client=client)


def base_server(
    id: str, state: int = pb.CONNECTION_STATE_OPEN, client_id: str = CLIENT
) -> rs.ConnectionSnapshot:
    conn = pb.Connection(
        id=id,
        state=state,  # type: ignore[arg-type]
        transport_protocol=pb.TRANSPORT_PROTOCOL_TCP,
        tls=True,
        sni="origin.example",
    )
    conn.timestamp_start.FromNanoseconds(1_700_000_000_000_000_000)
    if state == pb.CONNECTION_STATE_OPEN:
        conn.peername.CopyFrom(pb.Address(host="192.0.2.10", port=443))
        conn.sockname.CopyFrom(pb.Address(host="192.0.2.1", port=40000))
    server = pb.Server(connection=conn, address=pb.Address(host="origin.example", port=443))
    hook = pb.HOOK_SERVER_CONNECTED if state else pb.HOOK_SERVER_DISCONNECTED
    return rs.ConnectionSnapshot(hook=hook, client_id=client_id, server=server)


def seed_snapshots() -> list[rs.ConnectionSnapshot]:
    return [
        base_client(CLIENT),
        base_client(CLIENT_CLOSED, pb.CONNECTION_STATE_CLOSED),
        base_server(SERVER_OPEN),
        base_server(SERVER_CLOSED, pb.CONNECTION_STATE_CLOSED),
    ]


_CONN = [
    "id", "state", "peername", "sockname", "transport_protocol", "error", "certificate_list",
    "alpn", "alpn_offers", "cipher", "cipher_list", "tls_version", "sni", "timestamp_start",
    "timestamp_end", "timestamp_tls_setup",
]  # fmt: skip


def _mutation(field: str) -> st.SearchStrategy[tuple[str, Any]]:
    """One hostile value for one field of a snapshot, as (path, value)."""
    leaf = field.rsplit(".", 1)[-1]
    value: st.SearchStrategy[Any]
    if leaf == "id" or leaf == "client_id":
        value = ids
    elif leaf in ("state", "transport_protocol", "tls_version", "hook", "scheme"):
        value = enum_values
    elif leaf in ("peername", "sockname", "address", "via.address"):
        value = st.none() | addresses()
    elif leaf in ("error", "cipher", "sni", "full_spec"):
        value = texts
    elif leaf == "certificate_list":
        value = st.lists(certificates(), min_size=1, max_size=3)
    elif leaf == "mitmcert":
        value = st.none() | certificates()
    elif leaf == "alpn":
        value = st.binary(max_size=300)
    elif leaf == "alpn_offers":
        value = st.lists(st.binary(max_size=8), max_size=3)
    elif leaf == "cipher_list":
        value = st.lists(texts, max_size=3) | st.just(["c" * 1000] * 1100)  # > 1 MiB
    elif leaf.startswith("timestamp"):
        value = st.none() | timestamps()
    elif leaf == "proxy_mode":
        value = st.none() | st.just("cleared")
    elif leaf == "via":
        value = st.none() | server_specs()
    elif leaf == "route_outcome":
        value = st.builds(
            rs.RouteOutcome,
            kind=enum_values,
            query_id=texts,
            actor=texts,
            applied_fields=st.lists(texts, max_size=2),
            waited=durations,
        )
    elif leaf == "oneof":
        value = st.sampled_from(["clear", "swap"])
    else:  # pragma: no cover - a typo in the tables below
        raise AssertionError(field)
    return st.tuples(st.just(field), value)


_CLIENT_FIELDS = [f"client.connection.{f}" for f in _CONN] + [
    "client.mitmcert", "client.proxy_mode", "client.proxy_mode.full_spec", "hook",
    "route_outcome", "oneof",
]  # fmt: skip
_SERVER_FIELDS = [f"server.connection.{f}" for f in _CONN] + [
    "server.address", "server.via", "server.via.scheme", "server.via.address",
    "server.timestamp_tcp_setup", "client_id", "hook", "route_outcome", "oneof",
]  # fmt: skip


def _apply(snap: rs.ConnectionSnapshot, path: str, value: Any) -> None:
    if path == "oneof":
        if value == "clear":
            snap.ClearField("client")
            snap.ClearField("server")
        elif snap.HasField("client"):  # a client's fields sent as a server
            snap.server.connection.CopyFrom(snap.client.connection)
        else:
            snap.client.connection.CopyFrom(snap.server.connection)
        return
    *parents, leaf = path.split(".")
    msg: Message = snap
    for part in parents:
        msg = getattr(msg, part)
    if value is None or leaf == "proxy_mode":
        msg.ClearField(leaf)
    elif isinstance(value, Message):
        getattr(msg, leaf).CopyFrom(value)
    elif isinstance(value, list):
        msg.ClearField(leaf)
        field = getattr(msg, leaf)
        for item in value:
            if isinstance(item, Message):
                field.add().CopyFrom(item)
            else:
                field.append(item)
    else:
        setattr(msg, leaf, value)


@st.composite
def snapshots(draw: st.DrawFn) -> rs.ConnectionSnapshot:
    """A valid snapshot with zero to three hostile fields, or a kind change
    of a seeded id (a client id reported as a server and the other way)."""
    kind = draw(st.sampled_from(["client", "server", "kind-change"]))
    if kind == "kind-change":
        seeded = draw(st.sampled_from(SEEDED))
        snap = base_server(seeded) if seeded in (CLIENT, CLIENT_CLOSED) else base_client(seeded)
    elif kind == "client":
        snap = base_client(draw(st.sampled_from([CLIENT, CLIENT_CLOSED]) | st.uuids().map(str)))
    else:
        state = draw(st.sampled_from([pb.CONNECTION_STATE_OPEN, pb.CONNECTION_STATE_CLOSED]))
        server_id = draw(st.sampled_from([SERVER_OPEN, SERVER_CLOSED]) | st.uuids().map(str))
        snap = base_server(server_id, state)
    fields = _CLIENT_FIELDS if snap.HasField("client") else _SERVER_FIELDS
    for _ in range(draw(st.integers(0, 3))):
        path, value = draw(st.sampled_from(fields).flatmap(_mutation))
        _apply(snap, path, value)
    return snap


# --- report stream messages ---------------------------------------------

proxy_ids = st.one_of(st.just(""), st.just(SEED_PROXY), st.just("proxy-b"), texts)


@st.composite
def report_messages(draw: st.DrawFn) -> rs.ReportRequest | bytes:
    """One message of a Report stream: a ReportRequest, or raw bytes."""
    kind = draw(st.sampled_from(["batch", "batch", "batch", "start", "end", "empty", "raw"]))
    if kind == "raw":
        return draw(raw_bytes(rs.ReportRequest(batch=rs.ReportBatch(snapshots=seed_snapshots()))))
    msg = rs.ReportRequest(proxy_id=draw(st.sampled_from(["", "", "proxy-b"]) | proxy_ids))
    if kind == "batch":
        msg.batch.snapshots.extend(draw(st.lists(snapshots(), min_size=0, max_size=4)))
    elif kind == "start":
        msg.resync_start.SetInParent()
        if draw(st.booleans()):
            msg.resync_start.route_deadline.CopyFrom(draw(durations))
    elif kind == "end":
        msg.resync_end.SetInParent()
    return msg


# --- raw bytes -----------------------------------------------------------


@st.composite
def raw_bytes(draw: st.DrawFn, valid: Message) -> bytes:
    """Bytes that are mostly not ``valid``'s type: truncated, flipped, invalid
    UTF-8 in a string field, wrong wire types, random."""
    data = valid.SerializeToString()
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return draw(st.binary(max_size=64))
    if choice == 1 and data:
        return data[: draw(st.integers(1, len(data)))]
    if choice == 2 and data:
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    if choice == 3:
        # Field 1 .. 6 as a length-delimited invalid UTF-8 string.
        field = draw(st.integers(1, 6))
        return bytes([field << 3 | 2, 2, 0xFF, 0xFE])
    return draw(
        st.sampled_from(
            [
                b"\xff",  # a truncated varint tag
                b"\x08",  # tag without value
                b"\x0a\x05ab",  # length beyond the end
                b"\x0a\xff\xff\xff\xff\x0f",  # a 4 GiB length
                b"\x00",  # field number 0
                b"\x0b\x0c",  # a group
                b"\x0f",  # wire type 7
                b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # an 11-byte varint
            ]
        )
    )


# --- ConnectionService requests -----------------------------------------

states_lists = st.lists(enum_values, max_size=3)


@st.composite
def filters(draw: st.DrawFn) -> cs.ConnectionFilter:
    if not draw(st.integers(0, 2)):
        return cs.ConnectionFilter()
    return cs.ConnectionFilter(
        kind=draw(st.sampled_from([0, 1, 2]) | enum_values),  # type: ignore[arg-type]
        states=draw(st.just([]) | states_lists),  # type: ignore[arg-type]
        host=draw(st.just("") | hosts),
        port=draw(st.just(0) | ports),
        sni=draw(st.just("") | texts),
        client_id=draw(st.just("") | ids),
    )


views = st.sampled_from([0, 1, 2]) | enum_values
page_sizes = st.sampled_from([0, 1, 2, 1000, 1001, -1, 2**31 - 1, -(2**31)]) | st.integers(
    -(2**31), 2**31 - 1
)
forged_tokens = st.one_of(
    st.sampled_from(["", " 3", "٣", "3", "=", "====", "AAAA", "MQ", "MgoKMA", "\n"]),
    st.binary(max_size=48).map(lambda b: __import__("base64").urlsafe_b64encode(b).decode()),
    texts,
)

gets = st.builds(cs.GetConnectionRequest, id=ids, view=views)
lists = st.builds(
    cs.ListConnectionsRequest,
    page_size=page_sizes,
    page_token=st.just("") | forged_tokens,
    filter=filters(),
    view=views,
)

_mask_paths = (
    st.sampled_from(
        ["address", "via", "address.host", "server.address", "Address", "", "*", "state", "id"]
    )
    | texts
)
masks = st.one_of(
    st.sampled_from([["address"], ["via"], ["address", "via"], [], ["address", "address"]]),
    st.lists(_mask_paths, max_size=3),
).map(lambda paths: FieldMask(paths=paths))
actors = st.one_of(
    st.sampled_from(["", "operator", "a\nINFO forged line", "x" * 100_000, "é", "\x00"]),
    texts,
)


@st.composite
def updates(draw: st.DrawFn) -> cs.UpdateServerConnectionRequest:
    """Updates of the seeded servers (and other ids), valid ones among them."""
    msg = cs.UpdateServerConnectionRequest(
        id=draw(st.sampled_from([SERVER_CLOSED, SERVER_CLOSED, SERVER_OPEN]) | ids),
        update_mask=draw(masks),
        etag=draw(st.sampled_from(["", "", CURRENT_ETAG, '"0"']) | texts),
        actor=draw(actors),
    )
    if draw(st.booleans()):
        msg.address.CopyFrom(draw(st.just(pb.Address(host="new.example", port=8443)) | addresses()))
    if draw(st.booleans()):
        msg.via.CopyFrom(
            draw(
                st.just(
                    pb.ServerSpec(scheme=pb.SCHEME_HTTP, address=pb.Address(host="p", port=3128))
                )
                | server_specs()
            )
        )
    return msg


@st.composite
def watches(draw: st.DrawFn) -> cs.WatchConnectionsRequest:
    initial = draw(st.booleans())
    return cs.WatchConnectionsRequest(
        start_after_revision=draw(
            st.sampled_from([0, 0, 1, 2, -1, 10**6, 2**63 - 1, -(2**63)])
            | st.integers(-(2**63), 2**63 - 1)
        ),
        send_initial_events=initial,
        # Bookmarks (every few ms in these tests) make a valid watch answer
        # at once even when nothing it matches changes.
        allow_bookmarks=True,
        filter=draw(filters()),
        view=draw(views),  # type: ignore[arg-type]
    )


# --- RouterService -------------------------------------------------------

router_names = st.one_of(st.sampled_from(["router-a", "router-b", "a" * 128, "a" * 129]), texts)


@st.composite
def route_answers(draw: st.DrawFn) -> rt.RouteAnswer:
    """Answers, for the query the test received (query_id "" is replaced with
    it) or for made-up queries."""
    msg = rt.RouteAnswer(
        query_id=draw(st.sampled_from(["", "", "q-unknown"]) | texts),
        update_mask=draw(masks),
    )
    if draw(st.booleans()):
        msg.address.CopyFrom(
            draw(st.just(pb.Address(host="routed.example", port=443)) | addresses())
        )
    if draw(st.booleans()):
        msg.via.CopyFrom(draw(server_specs()))
    return msg


# --- the contract oracle -------------------------------------------------

_ID = re.compile(r"[\x21-\x7e]{1,256}")
_ACTOR = re.compile(r"[\x20-\x7e]{0,256}")
_UPDATE_HOST_FORBIDDEN = re.compile(r"[\s/\[\]@?#]")
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def _address(path: str, a: pb.Address, *, pair: bool, update: bool = False) -> list[str]:
    out = []
    if len(a.host.encode()) > 255 or _has_control(a.host):
        out.append(f"{path}.host: more than 255 bytes or control characters")
    if a.port > 65535:
        out.append(f"{path}.port: {a.port} > 65535")
    if a.HasField("scope_id") and not a.HasField("flowinfo"):
        out.append(f"{path}.scope_id without flowinfo")
    if pair and (a.HasField("flowinfo") or a.HasField("scope_id")):
        out.append(f"{path}: a (host, port) pair holds no flowinfo/scope_id")
    if update and (
        not 1 <= len(a.host.encode()) <= 253
        or _UPDATE_HOST_FORBIDDEN.search(a.host)
        or not 1 <= a.port <= 65535
    ):
        out.append(f"{path}: not a valid update target {a.host[:40]!r}:{a.port}")
    return out


def _timestamp(path: str, ts: Timestamp) -> list[str]:
    if not 0 <= ts.nanos <= 999_999_999 or not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS:
        return [f"{path}: invalid timestamp {ts.seconds}s {ts.nanos}ns"]
    return []


def _certificate(path: str, cert: pb.Certificate) -> list[str]:
    try:
        x509.load_der_x509_certificate(cert.der)
    except Exception as error:
        return [f"{path}.der: does not parse ({type(error).__name__})"]
    return []


def _change(path: str, change: pb.Change) -> list[str]:
    out = []
    if not _ACTOR.fullmatch(change.actor):
        out.append(f"{path}.actor: more than 256 bytes or not printable ASCII")
    if not set(change.fields) <= {"address", "via"}:
        out.append(f"{path}.fields: {list(change.fields)[:3]}")
    if change.HasField("address"):
        out.extend(_address(f"{path}.address", change.address, pair=True, update=True))
    if change.HasField("via"):
        if change.via.scheme not in (pb.SCHEME_HTTP, pb.SCHEME_HTTPS):
            out.append(f"{path}.via.scheme: {change.via.scheme} is not http or https")
        out.extend(_address(f"{path}.via.address", change.via.address, pair=True, update=True))
    return out


def contract_violations(record: pb.ConnectionRecord) -> list[str]:
    """Every rule of the proto comments that ``record`` breaks."""
    out: list[str] = []
    kind = record.WhichOneof("kind")
    if kind is None:
        return ["kind: neither client nor server"]
    obj: pb.Client | pb.Server = getattr(record, kind)
    if obj.ByteSize() > MiB:
        out.append(f"{kind}: {obj.ByteSize()} bytes encoded, more than 1 MiB")
    conn = obj.connection
    if not _ID.fullmatch(conn.id):
        out.append(f"{kind}.connection.id: not 1-256 bytes of printable ASCII")
    if conn.state not in pb.ConnectionState.values():
        out.append(f"{kind}.connection.state: unknown value {conn.state}")
    if conn.transport_protocol not in (pb.TRANSPORT_PROTOCOL_TCP, pb.TRANSPORT_PROTOCOL_UDP):
        out.append(f"{kind}.connection.transport_protocol: {conn.transport_protocol}")
    if conn.tls_version not in pb.TlsVersion.values():
        out.append(f"{kind}.connection.tls_version: unknown value {conn.tls_version}")
    for name in ("peername", "sockname"):
        if conn.HasField(name):
            out.extend(_address(f"{kind}.connection.{name}", getattr(conn, name), pair=False))
    for name in ("timestamp_start", "timestamp_end", "timestamp_tls_setup"):
        if conn.HasField(name):  # type: ignore[arg-type]
            out.extend(_timestamp(f"{kind}.connection.{name}", getattr(conn, name)))
    for i, cert in enumerate(conn.certificate_list):
        out.extend(_certificate(f"{kind}.connection.certificate_list[{i}]", cert))
    if isinstance(obj, pb.Client):
        for name in ("peername", "sockname", "timestamp_start"):
            if not conn.HasField(name):  # type: ignore[arg-type]
                out.append(f"client.connection.{name}: required for a client")
        if not obj.HasField("proxy_mode"):
            out.append("client.proxy_mode: required")
        else:
            try:
                ProxyMode.parse(obj.proxy_mode.full_spec)
            except Exception as error:
                out.append(f"client.proxy_mode.full_spec: {type(error).__name__}")
        if obj.HasField("mitmcert"):
            out.extend(_certificate("client.mitmcert", obj.mitmcert))
    else:
        if obj.HasField("address"):
            out.extend(_address("server.address", obj.address, pair=True))
        if obj.HasField("via"):
            if obj.via.scheme not in range(1, 10):
                out.append(f"server.via.scheme: {obj.via.scheme}")
            if not obj.via.HasField("address"):
                out.append("server.via.address: required")
            out.extend(_address("server.via.address", obj.via.address, pair=True))
        if obj.HasField("timestamp_tcp_setup"):
            out.extend(_timestamp("server.timestamp_tcp_setup", obj.timestamp_tcp_setup))
        if not _ID.fullmatch(record.metadata.client_id):
            out.append("metadata.client_id: a server's client id is required, in id form")
    meta = record.metadata
    if meta.proxy_id and not _ID.fullmatch(meta.proxy_id):
        out.append("metadata.proxy_id: not 1-256 bytes of printable ASCII")
    for name in ("pending_change", "last_change"):
        if meta.HasField(name):  # type: ignore[arg-type]
            out.extend(_change(f"metadata.{name}", getattr(meta, name)))
    return out


def strings_in(message: Message) -> list[str]:
    """Every string (and bytes) value in ``message``, recursively."""
    out: list[str] = []
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        for item in values:
            if isinstance(item, Message):
                out.extend(strings_in(item))
            elif isinstance(item, str):
                out.append(item)
            elif isinstance(item, bytes):
                out.append(item.decode("latin-1"))
    return out
