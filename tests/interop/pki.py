"""The files of `connmeta certs init --dir DIR`, for the interop harness while that
command is not on main yet: remove this module when it is (the harness then runs the
command). Same layout and contents as the contract says: ca.pem/ca.key, server.pem/.key
for localhost, 127.0.0.1 and ::1, one client certificate per role with URI SAN
spiffe://connmeta.local/<role>, policy.json (the example gRFC A43 policy); keys 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("reader", "writer", "router", "reporter")
SPIFFE = "spiffe://connmeta.local/{}"

_READ = [
    "/connmeta.v1.ConnectionService/GetConnection",
    "/connmeta.v1.ConnectionService/ListConnections",
    "/connmeta.v1.ConnectionService/WatchConnections",
    "/grpc.health.v1.Health/*",
    "/grpc.reflection.v1alpha.ServerReflection/*",
    "/grpc.reflection.v1.ServerReflection/*",
]
EXAMPLE_POLICY = {
    "name": "connmeta",
    "allow_rules": [
        {
            "name": "every_role_reads",
            "source": {"principals": [SPIFFE.format(role) for role in ROLES]},
            "request": {"paths": _READ},
        },
        {
            "name": "writer_updates",
            "source": {"principals": [SPIFFE.format("writer")]},
            "request": {"paths": ["/connmeta.v1.ConnectionService/UpdateServerConnection"]},
        },
        {
            "name": "router_routes",
            "source": {"principals": [SPIFFE.format("router")]},
            "request": {"paths": ["/connmeta.v1.RouterService/*"]},
        },
        {
            "name": "reporter_reports",
            "source": {"principals": [SPIFFE.format("reporter")]},
            "request": {"paths": ["/connmeta.v1.ReportService/*"]},
        },
    ],
}


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _save(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    _write(directory / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(directory / f"{name}.key", key_pem, 0o600)


def write_dev_pki(directory: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "connmeta development CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    _save(directory, "ca", ca, ca_key)

    def leaf(name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _save(directory, name, cert, key)

    leaf(
        "server",
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    for role in ROLES:
        leaf(
            role,
            [x509.UniformResourceIdentifier(SPIFFE.format(role))],
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )
    (directory / "policy.json").write_text(json.dumps(EXAMPLE_POLICY, indent=2) + "\n")
