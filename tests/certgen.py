"""Real X.509 certificates for property tests, signed per example.

Key generation is the slow part (RSA above all), so each key is made once per
session and reused; everything that varies (serial, names, SANs, CA flag,
validity) is drawn by hypothesis and signed fresh for every example.
"""

from __future__ import annotations

import datetime
import functools
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID, ObjectIdentifier
from hypothesis import strategies as st

KeyKind = Literal["rsa", "ec", "ed25519"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

UTC = datetime.UTC


@functools.cache
def key(kind: KeyKind) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


# X.520 caps a CN at 64 (cryptography counts UTF-8 bytes): 16 characters always fit.
_cn = st.text(min_size=1, max_size=16)
_text = st.text(min_size=1, max_size=40)
_attribute = st.one_of(
    st.builds(x509.NameAttribute, st.just(NameOID.ORGANIZATION_NAME), _text),
    st.builds(x509.NameAttribute, st.just(NameOID.ORGANIZATIONAL_UNIT_NAME), _text),
    st.builds(x509.NameAttribute, st.just(NameOID.LOCALITY_NAME), _text),
    st.builds(
        x509.NameAttribute,
        st.just(NameOID.COUNTRY_NAME),
        st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2, max_size=2),
    ),
    # No RFC 4514 short name: both sides must fall back to the dotted OID.
    st.builds(x509.NameAttribute, st.just(ObjectIdentifier("1.3.6.1.4.1.55738.1")), _text),
    st.builds(x509.NameAttribute, st.just(NameOID.COMMON_NAME), _cn),
)
names = st.lists(_attribute, max_size=4).map(x509.Name)
_label = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
dns_names = st.builds(
    lambda wildcard, labels: wildcard + ".".join(labels),
    st.sampled_from(["", "*."]),
    st.lists(_label, min_size=1, max_size=3),
)
general_names = st.lists(
    st.one_of(st.builds(x509.DNSName, dns_names), st.builds(x509.IPAddress, st.ip_addresses())),
    max_size=5,
)
# Both sides of 2^64: serials reach 159 bits and must not pass through int64.
serials = st.one_of(st.integers(1, 2**64 - 1), st.integers(2**64, 2**159 - 1))
_times = st.datetimes(
    min_value=datetime.datetime(1950, 1, 1),
    max_value=datetime.datetime(9998, 12, 31),
    timezones=st.just(UTC),
).map(lambda t: t.replace(microsecond=0))


@st.composite
def certificates(draw: st.DrawFn) -> x509.Certificate:
    kind: KeyKind = draw(st.sampled_from(["rsa", "ec", "ed25519"]))
    signer = key(kind)
    subject = draw(names)
    cn = draw(st.none() | _cn)
    if cn is not None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), *subject])
    issuer = subject if draw(st.booleans()) else draw(names)
    not_before = draw(_times)
    not_after = not_before + draw(st.timedeltas(datetime.timedelta(0), datetime.timedelta(3650)))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(signer.public_key())
        .serial_number(draw(serials))
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, datetime.datetime(9999, 12, 31, tzinfo=UTC)))
    )
    sans = draw(general_names)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    is_ca = draw(st.none() | st.booleans())
    if is_ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=None), critical=True
        )
    algorithm = None if kind == "ed25519" else hashes.SHA256()
    return builder.sign(signer, algorithm)
