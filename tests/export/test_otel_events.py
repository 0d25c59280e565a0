"""A store change as an OpenTelemetry Event: names, times and semantic-convention attributes."""

from __future__ import annotations

import datetime
import hashlib
import ssl
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from connmeta.export._ciphers import IANA_CIPHERS, iana_cipher
from connmeta.export.otel_events import (
    ERROR_TYPES,
    EVENT_NAMES,
    SEVERITY_INFO,
    SEVERITY_WARN,
    classify_error,
    to_otel_event,
)
from connmeta.records import Event, EventType
from connmeta.store import Store
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs
from tests import factories
from tests.snapshots import FakeClock

T0 = 1_700_000_000_000_000_000  # the factories' timestamp_start, ns
DELETED_AT = 1_800_000_000_000_000_000


def _record_events(store: Store) -> list[Event]:
    seen: list[Event] = []

    def listener(events: Sequence[Event]) -> None:
        seen.extend(events)

    store.subscribe(listener)
    return seen


def _certificate(cn: str = "origin.example") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example, Inc."),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2027, 6, 30, 12, 0, tzinfo=datetime.UTC))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


def _tls_server(client_id: str, der: bytes) -> rs.ConnectionSnapshot:
    snap = factories.server(client_id=client_id, hook=pb.HOOK_TLS_ESTABLISHED_SERVER)
    conn = snap.server.connection
    conn.tls_version = pb.TLS_VERSION_TLS_V1_2
    conn.cipher = "ECDHE-RSA-AES128-GCM-SHA256"
    conn.alpn = b"h2"
    conn.alpn_offers.extend([b"h2", b"http/1.1"])
    conn.timestamp_tls_setup.FromNanoseconds(T0 + 3_000_000)
    snap.server.timestamp_tcp_setup.FromNanoseconds(T0 + 1_000_000)
    conn.certificate_list.add(der=der)
    return snap


def test_tls_server_event_carries_semantic_convention_attributes() -> None:
    store = Store()
    events = _record_events(store)
    der = _certificate()
    client = factories.client()
    store.apply([client, _tls_server(client.client.connection.id, der)])
    event = to_otel_event(events[-1], DELETED_AT)

    assert event.name == "connmeta.connection.added"
    assert event.severity_number == SEVERITY_INFO
    assert event.body is None
    a = event.attributes
    assert a["server.address"] == "origin.example"
    assert a["server.port"] == 443
    assert a["network.peer.address"] == "192.0.2.10"
    assert a["network.peer.port"] == 443
    assert a["network.local.address"] == "192.0.2.1"
    assert a["network.local.port"] == 40000
    assert a["network.transport"] == "tcp"
    assert a["network.type"] == "ipv4"
    assert a["tls.protocol.name"] == "tls"
    assert a["tls.protocol.version"] == "1.2"
    assert a["tls.cipher"] == "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
    assert a["tls.next_protocol"] == "h2"
    assert a["tls.client.server_name"] == "origin.example"
    assert a["tls.established"] is True
    assert a["tls.server.hash.sha256"] == hashlib.sha256(der).hexdigest().upper()
    assert a["tls.server.not_after"] == "2027-06-30T12:00:00Z"
    assert a["tls.server.not_before"] == "2025-01-01T00:00:00Z"
    assert a["tls.server.subject"] == "CN=origin.example, O=Example\\, Inc., C=CA"
    assert a["connmeta.tls.alpn_offers"] == ["h2", "http/1.1"]
    assert a["connmeta.connection.kind"] == "server"
    assert a["connmeta.connection.state"] == "open"
    assert a["connmeta.hook"] == "tls_established_server"
    assert a["connmeta.client.id"] == client.client.connection.id
    assert a["connmeta.revision"] == store.revision
    # tls_established_server happened when the handshake finished.
    assert event.timestamp_ns == T0 + 3_000_000


def test_client_event_names_its_peer_as_client_and_its_sni_as_server() -> None:
    store = Store()
    events = _record_events(store)
    snap = factories.client()
    snap.client.connection.sni = "api.example"
    snap.client.connection.peername.host = "2001:db8::7"
    store.apply([snap])
    a = to_otel_event(events[-1], DELETED_AT).attributes
    assert a["client.address"] == "2001:db8::7"
    assert a["client.port"] == 51234
    assert a["network.peer.address"] == "2001:db8::7"
    assert a["network.type"] == "ipv6"
    assert a["network.local.address"] == "127.0.0.1"
    assert a["network.local.port"] == 8080
    assert a["server.address"] == "api.example"
    assert a["tls.client.server_name"] == "api.example"
    assert a["connmeta.client.proxy_mode"] == "regular"
    assert a["connmeta.client.id"] == snap.client.connection.id
    assert "tls.protocol.version" not in a
    assert "tls.cipher" not in a


def test_server_behind_upstream_proxy_keeps_its_target_as_server_address() -> None:
    store = Store()
    events = _record_events(store)
    store.apply([factories.server(host="target.example", via=(pb.SCHEME_HTTP, "proxy", 3128))])
    a = to_otel_event(events[-1], DELETED_AT).attributes
    assert a["server.address"] == "target.example"
    assert a["connmeta.server.via"] == "http://proxy:3128"


@pytest.mark.parametrize(
    ("hook", "field", "offset"),
    [
        (pb.HOOK_CLIENT_CONNECTED, "timestamp_start", 0),
        (pb.HOOK_CLIENT_DISCONNECTED, "timestamp_end", 9_000_000),
        (pb.HOOK_TLS_ESTABLISHED_CLIENT, "timestamp_tls_setup", 4_000_000),
    ],
)
def test_event_time_is_the_timestamp_mitmproxy_set_for_the_hook(
    hook: int, field: str, offset: int
) -> None:
    store = Store()
    events = _record_events(store)
    snap = factories.client(hook=hook)
    conn = snap.client.connection
    conn.timestamp_tls_setup.FromNanoseconds(T0 + 4_000_000)
    if hook == pb.HOOK_CLIENT_DISCONNECTED:
        conn.state = pb.CONNECTION_STATE_CLOSED
        conn.timestamp_end.FromNanoseconds(T0 + 9_000_000)
    store.apply([snap])
    assert to_otel_event(events[-1], DELETED_AT).timestamp_ns == T0 + offset


def test_server_connected_is_timed_by_tcp_setup() -> None:
    store = Store()
    events = _record_events(store)
    snap = factories.server()
    snap.server.timestamp_tcp_setup.FromNanoseconds(T0 + 2_000_000)
    store.apply([snap])
    assert to_otel_event(events[-1], DELETED_AT).timestamp_ns == T0 + 2_000_000


def test_sidecar_own_change_and_deletion_use_the_sidecars_times() -> None:
    clock = FakeClock(1_750_000_000.0)
    store = Store(clock=clock, closed_retention_seconds=10)
    events = _record_events(store)
    snap = factories.server(state=pb.CONNECTION_STATE_CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED)
    snap.server.connection.timestamp_end.FromNanoseconds(T0 + 5)
    store.apply([snap])
    id = snap.server.connection.id
    clock.now += 1
    store.update_server(
        id,
        address=pb.Address(host="b.example", port=443),
        via=None,
        mask=["address"],
        actor="ops",
    )
    pending = to_otel_event(events[-1], DELETED_AT)
    assert pending.name == "connmeta.connection.modified"
    # A pending change is the sidecar's: it happened at update_time, not at
    # the disconnect the record still shows.
    assert pending.timestamp_ns == 1_750_000_001_000_000_000
    clock.now += 60
    store.expire()
    deleted = to_otel_event(events[-1], DELETED_AT)
    assert deleted.name == "connmeta.connection.deleted"
    assert deleted.timestamp_ns == DELETED_AT


def test_connection_error_is_a_warning_with_a_low_cardinality_type() -> None:
    store = Store()
    events = _record_events(store)
    snap = factories.server(state=pb.CONNECTION_STATE_CLOSED, hook=pb.HOOK_SERVER_CONNECT_ERROR)
    snap.server.connection.error = "Connect call failed ('192.0.2.10', 443): Connection refused"
    store.apply([snap])
    event = to_otel_event(events[-1], DELETED_AT)
    assert event.severity_number == SEVERITY_WARN
    assert event.severity_text == "WARN"
    assert event.attributes["error.type"] == "connection_refused"
    assert event.body == snap.server.connection.error


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("TimeoutError: timed out", "timeout"),
        ("[Errno -2] Name or service not known", "name_resolution"),
        ("Certificate verify failed: unable to get local issuer", "certificate_verify_failed"),
        ("Connection killed.", "killed"),
        ("TLS handshake failed: no shared cipher", "tls_error"),
        ("something new", "_OTHER"),
    ],
)  # fmt: skip
def test_error_messages_fall_into_fixed_classes(message: str, expected: str) -> None:
    assert classify_error(message) == expected
    assert expected in ERROR_TYPES


def test_event_names_are_fixed_per_change_kind() -> None:
    names = set(EVENT_NAMES.values())
    assert names == {
        "connmeta.connection.added",
        "connmeta.connection.modified",
        "connmeta.connection.deleted",
    }
    assert EventType.BOOKMARK not in EVENT_NAMES


def test_cipher_table_matches_this_openssl_code_points() -> None:
    """Every certificate-based suite OpenSSL offers by default is in the table, under
    the IANA code point OpenSSL gives it: a wrong row would fail here."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("DEFAULT:!PSK:!SRP:!aNULL")
    checked = 0
    for cipher in context.get_ciphers():
        name = cipher["name"]
        if name.startswith("TLS_"):
            assert iana_cipher(name) == name
            continue
        assert name in IANA_CIPHERS, f"{name} missing from the table"
        assert IANA_CIPHERS[name][0] == cipher["id"] & 0xFFFF, name
        checked += 1
    assert checked >= 20
    assert iana_cipher("NO-SUCH-CIPHER") is None
