"""``connmeta certs init``: a development CA, a server certificate and one client
certificate per role, plus the example authorization policy, in one directory.

Enough to try mTLS in one command; not a PKI. Production certificates come
from elsewhere (cert-manager in deploy/, or your own CA): the sidecar only
needs PEM files.

Keys are ECDSA P-256: fast to make (a test session makes a whole set), and
every gRPC implementation (C-core, Go, rustls) accepts them.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "ROLES",
    "SPIFFE_TRUST_DOMAIN",
    "example_policy",
    "init",
    "role_principal",
]

SPIFFE_TRUST_DOMAIN: Final = "connmeta.local"
ROLES: Final = ("reader", "writer", "router", "reporter")
"""One client certificate each; what each may call is in :func:`example_policy`."""

_VALIDITY: Final = datetime.timedelta(days=365)
_SERVER_NAMES: Final = ("localhost",)
_SERVER_IPS: Final = ("127.0.0.1", "::1")

_CS: Final = "/connmeta.v1.ConnectionService/"
_READS: Final = (
    _CS + "GetConnection",
    _CS + "ListConnections",
    _CS + "WatchConnections",
    "/grpc.health.v1.Health/*",
    "/grpc.reflection.v1alpha.ServerReflection/*",
    "/grpc.reflection.v1.ServerReflection/*",
)
# role -> (rule name, the paths it may call beyond the reads)
_EXTRA: Final = {
    "writer": ("writer-updates", (_CS + "UpdateServerConnection",)),
    "router": ("router-routes", ("/connmeta.v1.RouterService/Route",)),
    "reporter": ("reporter-reports", ("/connmeta.v1.ReportService/Report",)),
}


def role_principal(role: str) -> str:
    """The SPIFFE ID a role's certificate carries, and the policy names."""
    return f"spiffe://{SPIFFE_TRUST_DOMAIN}/{role}"


def example_policy() -> dict[str, Any]:
    """The example gRFC A43 policy: every role reads (and may use health and
    reflection); writer, router and reporter may each also do their one write."""
    rules: list[dict[str, Any]] = [
        {
            "name": "every-role-reads",
            "source": {"principals": [role_principal(r) for r in ROLES]},
            "request": {"paths": list(_READS)},
        }
    ]
    for role, (rule, paths) in _EXTRA.items():
        rules.append(
            {
                "name": rule,
                "source": {"principals": [role_principal(role)]},
                "request": {"paths": list(paths)},
            }
        )
    return {"name": "connmeta-example", "allow_rules": rules}


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "connmeta development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A little in the past: clocks of the machines involved differ.
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


class _CA:
    def __init__(self, common_name: str) -> None:
        self.key = _key()
        self.name = _name(common_name)
        self.cert = (
            _builder(self.name, self.name, self.key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        common_name: str,
        sans: Sequence[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = _key()
        cert = (
            _builder(_name(common_name), self.name, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert, key


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode: a key is never readable by others, not
    # even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def _save(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    _write(directory / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(
        directory / f"{stem}.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )


def init(directory: str | os.PathLike[str], dns: Iterable[str] = ()) -> list[Path]:
    """Write the CA, the server and the role certificates and ``policy.json``
    to ``directory`` (created 0700 if missing); returns the files written.

    The server certificate is for localhost, 127.0.0.1, ::1 and ``dns``.
    """
    out = Path(directory)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = _CA("connmeta development CA")
    _save(out, "ca", ca.cert, ca.key)
    names = list(dict.fromkeys([*_SERVER_NAMES, *dns]))
    server_sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    server_sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in _SERVER_IPS]
    cert, key = ca.issue("connmeta server", server_sans, ExtendedKeyUsageOID.SERVER_AUTH)
    _save(out, "server", cert, key)
    for role in ROLES:
        sans = [x509.UniformResourceIdentifier(role_principal(role))]
        cert, key = ca.issue(f"connmeta {role}", sans, ExtendedKeyUsageOID.CLIENT_AUTH)
        _save(out, role, cert, key)
    policy = json.dumps(example_policy(), indent=2) + "\n"
    _write(out / "policy.json", policy.encode(), 0o644)
    written = ["ca", "server", *ROLES]
    return [out / f"{s}.{e}" for s in written for e in ("pem", "key")] + [out / "policy.json"]
