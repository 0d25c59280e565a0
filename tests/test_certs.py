"""connmeta.certs.describe against mitmproxy's certs.Cert accessors as the oracle."""

from __future__ import annotations

import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from mitmproxy import certs

from connmeta.certs import describe
from tests.certgen import certificates, der, key

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def seconds(when: datetime.datetime) -> Timestamp:
    delta = when - EPOCH
    return Timestamp(seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000)


@given(cert=certificates())
def test_describe_matches_every_mitmproxy_cert_accessor(cert: x509.Certificate) -> None:
    oracle = certs.Cert(cert)
    msg = describe(der(cert))

    assert msg.der == der(cert)
    assert (msg.subject_common_name if msg.HasField("subject_common_name") else None) == oracle.cn
    assert (
        msg.subject_organization if msg.HasField("subject_organization") else None
    ) == oracle.organization
    assert [(a.name, a.value) for a in msg.subject] == oracle.subject
    assert [(a.name, a.value) for a in msg.issuer] == oracle.issuer
    altnames = oracle.altnames
    assert list(msg.dns_names) == altnames.get_values_for_type(x509.DNSName)
    assert list(msg.ip_addresses) == [
        str(ip) for ip in altnames.get_values_for_type(x509.IPAddress)
    ]
    assert msg.serial_number == str(oracle.serial)
    # key_size is unsigned: mitmproxy's -1 ("no size", Ed25519) is 0 here.
    assert (msg.key_type, msg.key_size) == (oracle.keyinfo[0], max(oracle.keyinfo[1], 0))
    assert msg.sha256_fingerprint == oracle.fingerprint()
    assert msg.is_ca == oracle.is_ca
    assert msg.not_before == seconds(oracle.notbefore)
    assert msg.not_after == seconds(oracle.notafter)


def _leaf(**names: str) -> x509.Certificate:
    signer = key("ec")
    subject = x509.Name(
        [x509.NameAttribute(getattr(NameOID, oid), value) for oid, value in names.items()]
    )
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(signer.public_key())
        .serial_number(2**150 + 7)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(signer, hashes.SHA256())
    )


def test_describe_without_cn_org_sans_or_basic_constraints_leaves_them_absent() -> None:
    msg = describe(der(_leaf(LOCALITY_NAME="Zürich")))
    assert not msg.HasField("subject_common_name")
    assert not msg.HasField("subject_organization")
    assert [(a.name, a.value) for a in msg.subject] == [("L", "Zürich")]
    assert not msg.dns_names
    assert not msg.ip_addresses
    assert msg.is_ca is False
    assert msg.serial_number == str(2**150 + 7)
    assert msg.key_type == "EC (secp256r1)"
    assert msg.key_size == 256


def test_describe_names_key_types_exactly_as_mitmproxy_keyinfo() -> None:
    for kind, expected in (("rsa", ("RSA", 2048)), ("ec", ("EC (secp256r1)", 256))):
        signer = key(kind)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, kind)])
        now = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(signer.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now)
            .sign(signer, hashes.SHA256())
        )
        msg = describe(der(cert))
        assert (msg.key_type, msg.key_size) == expected == certs.Cert(cert).keyinfo


def test_describe_reports_ed25519_with_key_size_zero_where_mitmproxy_says_minus_one() -> None:
    signer = key("ed25519")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed")])
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now)
        .sign(signer, None)
    )
    msg = describe(der(cert))
    assert (msg.key_type, msg.key_size) == ("Ed25519", 0)
    assert certs.Cert(cert).keyinfo == ("Ed25519", -1)


def test_describe_fingerprint_is_sha256_of_der() -> None:
    data = der(_leaf(COMMON_NAME="example.com"))
    assert describe(data).sha256_fingerprint == hashlib.sha256(data).digest()


@pytest.mark.parametrize(
    "data",
    [b"", b"not a certificate", b"\x30\x03\x02\x01\x01"],
    ids=["empty", "garbage", "truncated-sequence"],
)
def test_describe_malformed_der_raises_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"malformed certificate DER"):
        describe(data)


def test_describe_der_with_trailing_bytes_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"malformed certificate DER"):
        describe(der(_leaf(COMMON_NAME="x")) + b"\x00")


def test_describe_returns_a_fresh_message_the_cache_does_not_share() -> None:
    data = der(_leaf(COMMON_NAME="cached.example"))
    first = describe(data)
    first.subject_common_name = "changed"
    first.dns_names.append("evil.example")
    again = describe(data)
    assert again.subject_common_name == "cached.example"
    assert not again.dns_names
