"""X.509 facts for connmeta.v1.Certificate, derived from the DER alone.

The proxy reports only ``der`` (cheap inside its hooks); the sidecar fills the
derived, output-only fields here. The names and values match mitmproxy's
``certs.Cert`` accessors (``cn``, ``organization``, ``subject``, ``issuer``,
``altnames``, ``serial``, ``keyinfo``, ``fingerprint()``, ``is_ca``,
``notbefore``/``notafter``) without importing mitmproxy.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from google.protobuf.timestamp_pb2 import Timestamp

from connmeta.v1 import connection_pb2 as pb

__all__ = ["CACHE_SIZE", "describe"]

CACHE_SIZE: Final = 1024
"""How many distinct certificates describe() remembers.

Every connection to a site repeats the same chain, so a small cache turns
nearly every call into a copy; 1024 chains of a few KiB each stay in the
low megabytes.
"""

_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def describe(der: bytes) -> pb.Certificate:
    """A Certificate with ``der`` and every derived fact filled.

    The result is a fresh message the caller may change. Raises ValueError
    when ``der`` is not a certificate cryptography can parse, including one
    whose extensions are malformed.
    """
    msg = pb.Certificate()
    msg.CopyFrom(described(der))
    return msg


@functools.lru_cache(maxsize=CACHE_SIZE)
def described(der: bytes) -> pb.Certificate:
    """The cached description of ``der``; shared, so callers must not change it.

    For the converters, which copy it into a parent message anyway
    (``repeated.append`` and ``CopyFrom`` copy), saving a second copy.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        return _describe(der, cert)
    except Exception as e:
        # cryptography raises more than ValueError for DER it cannot take
        # (and a certificate's facts can be out of a Timestamp's range):
        # to a caller they all mean "cannot describe this".
        raise ValueError(f"malformed certificate DER ({len(der)} bytes): {e}"[:300]) from e


def _describe(der: bytes, cert: x509.Certificate) -> pb.Certificate:
    subject = cert.subject
    key_type, key_size = _keyinfo(cert)
    msg = pb.Certificate(
        der=der,
        subject=_name(subject),
        issuer=_name(cert.issuer),
        serial_number=str(cert.serial_number),
        sha256_fingerprint=hashlib.sha256(der).digest(),
        key_type=key_type,
        key_size=key_size,
        not_before=_timestamp(cert.not_valid_before_utc),
        not_after=_timestamp(cert.not_valid_after_utc),
    )
    cn = subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if cn:
        msg.subject_common_name = _text(cn[0].value)
    org = subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
    if org:
        msg.subject_organization = _text(org[0].value)
    extensions = cert.extensions
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        msg.dns_names.extend(san.get_values_for_type(x509.DNSName))
        msg.ip_addresses.extend(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    with contextlib.suppress(x509.ExtensionNotFound):
        msg.is_ca = extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    return msg


def _name(name: x509.Name) -> list[pb.NameAttribute]:
    # The key is what rfc4514_string() puts before "=": the RFC 4514 short
    # name, or the dotted OID where there is none; exactly mitmproxy's
    # _name_to_keyval, so both sides agree on the spelling.
    return [
        pb.NameAttribute(name=attr.rfc4514_string().partition("=")[0], value=_text(attr.value))
        for attr in name
    ]


def _text(value: str | bytes) -> str:
    # Only X500UniqueIdentifier (a BIT STRING) has a bytes value; hex keeps it printable.
    return value if isinstance(value, str) else value.hex()


def _keyinfo(cert: x509.Certificate) -> tuple[str, int]:
    """mitmproxy's Cert.keyinfo, with 0 instead of -1 for "no size" (key_size is unsigned)."""
    try:
        key = cert.public_key()
    except UnsupportedAlgorithm:
        # mitmproxy's keyinfo raises here; the algorithm OID still says what the key is.
        return cert.public_key_algorithm_oid.dotted_string, 0
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA", key.key_size
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA", key.key_size
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC ({key.curve.name})", key.key_size
    size = getattr(key, "key_size", -1)
    return type(key).__name__.replace("PublicKey", "").replace("_", ""), max(size, 0)


def _timestamp(when: datetime.datetime) -> Timestamp:
    # Timedelta arithmetic is exact; going through float seconds would not be
    # for dates far from 1970.
    delta = when - _EPOCH
    return Timestamp(seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000)
