"""Real mTLS for tests: one set of certificates from ``connmeta certs init`` per
test session, server settings that use them, and client channels per role.

Without a policy every role's certificate may call everything; ``writer`` is
the default client.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import grpc

from connmeta import devcerts


@functools.cache
def certs() -> Path:
    """The session's certificate directory (made once, removed at exit)."""
    directory = Path(tempfile.mkdtemp(prefix="connmeta-test-certs-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    devcerts.init(directory / "certs")
    return directory / "certs"


def server_config(directory: Path | None = None) -> dict[str, Any]:
    """Config overrides that make every TCP listener require mTLS."""
    d = directory or certs()
    return {
        "tls_cert": str(d / "server.pem"),
        "tls_key": str(d / "server.key"),
        "client_ca": str(d / "ca.pem"),
    }


def credentials(role: str = "writer", directory: Path | None = None) -> grpc.ChannelCredentials:
    d = directory or certs()
    return grpc.ssl_channel_credentials(
        (d / "ca.pem").read_bytes(),
        (d / f"{role}.key").read_bytes(),
        (d / f"{role}.pem").read_bytes(),
    )


def channel(
    target: str, role: str = "writer", options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A channel like a real client's: plaintext on the Unix socket, mTLS on TCP."""
    if target.startswith("unix:"):
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials(role), options=options)


def cli_env(target: str, role: str = "writer") -> dict[str, str]:
    """The environment that gives a ``connmeta`` client command mTLS for a TCP target."""
    if target.startswith("unix:"):
        return {}
    d = certs()
    return {
        "CONNMETA_TLS_CA": str(d / "ca.pem"),
        "CONNMETA_TLS_CERT": str(d / f"{role}.pem"),
        "CONNMETA_TLS_KEY": str(d / f"{role}.key"),
    }
