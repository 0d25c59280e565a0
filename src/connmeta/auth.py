"""The trust boundary: mTLS credentials, who a caller is, and whether it may call.

- :class:`ServerTLS` makes the credentials of every TCP listener: TLS 1.2 or
  newer (C-core's minimum; 1.3 is negotiated when the client offers it), a
  client certificate required and verified against ``--client-ca``. The
  files are read again when they change, at the next handshake, without a
  restart (grpcio's dynamic server credentials).
- :func:`caller_of` names the caller of a call: ``unix`` for the Unix socket,
  the verified client certificate's SPIFFE URI SAN, else its DNS SANs, else
  its subject for mTLS, nobody for plaintext TCP.
- :class:`AuthzInterceptor` is the one door: it decides before any servicer
  runs, for every RPC present and future, like grpc-go's
  ``authz.StaticInterceptor``, and applies the stream limits. The servicer
  learns the caller from :func:`principal`, never from the request.

Who may call what:

- Unix socket: everything, always; filesystem permissions are that boundary.
- With ``--authz-policy``: the policy (:mod:`connmeta.policy`) decides for
  TCP callers, mTLS and plaintext alike.
- Without: mTLS callers everything (their certificate was verified against
  ``--client-ca``), plaintext TCP callers only reads (:data:`READ_METHODS`).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from connmeta.errors import abort, rich_status
from connmeta.policy import Peer, PolicyFile
from connmeta.service import Context, rewrap
from connmeta.validation import escape

__all__ = [
    "READ_METHODS",
    "AuthzInterceptor",
    "Caller",
    "Limits",
    "ServerTLS",
    "TLSError",
    "audit",
    "caller_of",
    "principal",
]

log = logging.getLogger("connmeta.auth")
audit_log = logging.getLogger("connmeta.audit")

WATCH_METHOD: Final = "/connmeta.v1.ConnectionService/WatchConnections"

READ_METHODS: Final = frozenset(
    {
        "/connmeta.v1.ConnectionService/GetConnection",
        "/connmeta.v1.ConnectionService/ListConnections",
        WATCH_METHOD,
    }
)
"""What a plaintext TCP caller may call without a policy, besides health and reflection."""

_READ_SERVICES: Final = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_ENABLE_WRITES: Final = (
    "use the Unix socket, or serve with --tls-cert, --tls-key and --client-ca and call with a "
    "client certificate (connmeta certs init makes a set to try)"
)


# -- who is calling --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of one call.

    ``transport``: "unix", "mtls" or "plaintext". ``principal``: what the
    store records (``Change.principal``) and the stream limit counts by;
    "unix", the certificate's identity, or "" for plaintext. ``names``: what
    policy principals are matched against (gRFC A43: URI SANs, DNS SANs,
    subject).
    """

    transport: str
    principal: str
    names: tuple[str, ...] = ()

    @property
    def peer(self) -> Peer:
        return Peer(tls=self.transport == "mtls", names=self.names)


UNIX: Final = Caller("unix", "unix")
PLAINTEXT: Final = Caller("plaintext", "")


@functools.lru_cache(maxsize=256)
def _certificate_caller(pem: bytes) -> Caller:
    """The caller a verified client certificate names. Cached: a client's
    certificate is the same on every call of its connection."""
    cert = x509.load_pem_x509_certificate(pem)
    uris: list[str] = []
    dns: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        pass
    subject = cert.subject.rfc4514_string()
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    principal = spiffe[0] if spiffe else ",".join(dns) if dns else subject
    return Caller("mtls", principal, (*uris, *dns, subject))


def caller_of(context: Context) -> Caller:
    """Who makes this call, from the transport alone (nothing the caller sends)."""
    if context.peer().startswith("unix:"):
        return UNIX
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return PLAINTEXT
    pem = next(iter(auth.get("x509_pem_cert", ())), b"")
    if not pem:  # TLS without a client certificate: not possible while it is required
        return Caller("mtls", "")
    return _certificate_caller(pem)


_principal: contextvars.ContextVar[str] = contextvars.ContextVar("connmeta_principal", default="")


def principal() -> str:
    """The authenticated principal of the call being handled ("" if none)."""
    return _principal.get()


def audit(principal: str, method: str, what: str, **fields: str | int) -> None:
    """One line per accepted write: who, through which method, on what.

    The text line says it all as ``key=value`` (escaped); the same values go
    along as the record's own fields (``action`` is ``what``), which
    ``--log-format json`` writes as JSON fields.
    """
    extra = "".join(f" {k}={escape(str(v), 256)}" for k, v in fields.items())
    audit_log.info(
        "%s principal=%s method=%s%s",
        what,
        escape(principal or "(none)", 512),
        method,
        extra,
        extra={"action": what, "principal": principal, "method": method, **fields},
    )


# -- credentials -----------------------------------------------------------------------


class TLSError(RuntimeError):
    """The TLS files are unusable; the message names the file and what is wrong."""


def _read_tls(cert: str, key: str, ca: str) -> tuple[bytes, bytes, bytes]:
    """The three files, checked: PEM certificates, and a key that belongs to the
    certificate (a half-replaced pair would fail every handshake)."""
    data: dict[str, bytes] = {}
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--client-ca", ca)):
        try:
            with open(path, "rb") as f:
                data[flag] = f.read()
        except OSError as error:
            raise TLSError(f"{flag} {path}: cannot read it: {error.strerror}") from None
    try:
        chain = x509.load_pem_x509_certificates(data["--tls-cert"])
    except ValueError:
        raise TLSError(f"--tls-cert {cert}: not a PEM certificate") from None
    try:
        x509.load_pem_x509_certificates(data["--client-ca"])
    except ValueError:
        raise TLSError(f"--client-ca {ca}: not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(data["--tls-key"], password=None)
    except (ValueError, TypeError):
        raise TLSError(f"--tls-key {key}: not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if private.public_key().public_bytes(der, public) != chain[0].public_key().public_bytes(
        der, public
    ):
        raise TLSError(f"--tls-key {key} is not the key of the certificate in --tls-cert {cert}")
    return data["--tls-cert"], data["--tls-key"], data["--client-ca"]


class ServerTLS:
    """mTLS credentials for every TCP listener, re-read when the files change.

    Checked at each new connection's handshake (three ``stat`` calls); a
    changed set that is not usable keeps the last good one and is logged.
    """

    def __init__(self, cert: str, key: str, client_ca: str) -> None:
        self._paths = (cert, key, client_ca)
        self._signature = self._stat()
        self._pem = _read_tls(*self._paths)
        self.reloads = 0

    def _stat(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            return tuple(
                (st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, self._paths)
            )
        except OSError:
            return None

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = self._pem
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        # The stubs say the fetcher returns a configuration; grpc documents
        # None as "keep the current one".
        fetch: Callable[[], Any] = self._fetch
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(), fetch, require_client_authentication=True
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc before each handshake; None keeps the current set.
        try:
            signature = self._stat()
            if signature is None or signature == self._signature:
                return None
            self._signature = signature
            try:
                pem = _read_tls(*self._paths)
            except TLSError as error:
                log.warning("TLS files changed but not reloaded, keeping the last good: %s", error)
                return None
            if pem == self._pem:
                return None
            self._pem = pem
            self.reloads += 1
            log.info("TLS certificate, key and client CA reloaded")
            return self._configuration()
        except Exception:  # an exception here would fail the handshake
            log.exception("checking the TLS files failed; keeping the last good")
            return None


# -- the interceptor -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """Stream limits; 0 means no limit."""

    max_watchers: int = 0
    """WatchConnections calls open at once, all callers together."""
    max_streams_per_principal: int = 0
    """Streaming calls (watch, report, route) one principal may hold open."""


def _is_read(method: str) -> bool:
    return method in READ_METHODS or method.startswith(_READ_SERVICES)


class AuthzInterceptor(grpc.aio.ServerInterceptor):
    """Decides every call before its servicer runs; counts open streams.

    Denied → PERMISSION_DENIED, or UNAUTHENTICATED where the policy would
    allow an authenticated caller; over a limit → RESOURCE_EXHAUSTED. Each
    with an ErrorInfo naming the method, never a secret.
    """

    def __init__(self, policy: PolicyFile | None = None, limits: Limits = Limits()) -> None:
        self.policy = policy
        self.limits = limits
        self.watchers = 0
        self.streams: dict[str, int] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        return rewrap(
            handler,
            lambda kind, behavior: self._wrap(
                behavior, method, kind in ("unary_stream", "stream_stream")
            ),
        )

    async def _admit(self, context: Context, method: str) -> Caller:
        """The caller, if it may call ``method``; else the call ends here."""
        caller = caller_of(context)
        if caller.transport == "unix":
            return caller
        if self.policy is not None:
            headers = _headers(context)
            decision = self.policy.policy.decide(caller.peer, method, headers)
            if decision.allowed:
                return caller
            name = self.policy.policy.name
            if decision.needs_identity:
                await abort(
                    context,
                    rich_status(
                        grpc.StatusCode.UNAUTHENTICATED,
                        f"{method} needs a verified client certificate under authorization "
                        f"policy {name!r}: serve with --tls-cert, --tls-key and --client-ca and "
                        "call with a client certificate",
                        "UNAUTHENTICATED",
                        {"method": method},
                    ),
                )
            who = "deny rule " + repr(decision.rule) if decision.rule else "no allow rule"
            await abort(
                context,
                rich_status(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method} is not allowed for {caller.principal or 'a plaintext caller'} "
                    f"by authorization policy {name!r} ({who})",
                    "PERMISSION_DENIED",
                    {"method": method},
                ),
            )
        if caller.transport == "mtls" or _is_read(method):
            return caller
        await abort(
            context,
            rich_status(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is not allowed over plaintext TCP, which may only read: "
                + _ENABLE_WRITES,
                "PERMISSION_DENIED",
                {"method": method},
            ),
        )

    def _acquire(self, method: str, key: str) -> grpc.Status | None:
        limits = self.limits
        if method == WATCH_METHOD and limits.max_watchers and self.watchers >= limits.max_watchers:
            return rich_status(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.watchers} watches are open, the most this sidecar serves "
                "(--max-watchers): retry later with backoff",
                "TOO_MANY_WATCHERS",
                {"method": method, "limit": str(limits.max_watchers)},
            )
        held = self.streams.get(key, 0)
        if limits.max_streams_per_principal and held >= limits.max_streams_per_principal:
            return rich_status(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this caller holds {held} streams open, the most one principal may "
                "(--max-streams-per-principal): close some, or retry later",
                "TOO_MANY_STREAMS",
                {"method": method, "limit": str(limits.max_streams_per_principal)},
            )
        if method == WATCH_METHOD:
            self.watchers += 1
        self.streams[key] = held + 1
        return None

    def _release(self, method: str, key: str) -> None:
        if method == WATCH_METHOD:
            self.watchers -= 1
        held = self.streams[key] - 1
        if held:
            self.streams[key] = held
        else:
            del self.streams[key]

    def _wrap(
        self, behavior: Callable[..., Any], method: str, streaming: bool
    ) -> Callable[..., Any]:
        admit = self._admit

        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                caller = await admit(context, method)
                key = f"{caller.transport}:{caller.principal}"
                refused = self._acquire(method, key)
                if refused is not None:
                    await abort(context, refused)
                _principal.set(caller.principal)
                responses = behavior(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    self._release(method, key)
                    await responses.aclose()

            return stream

        async def call(request: Any, context: Context) -> Any:
            caller = await admit(context, method)
            _principal.set(caller.principal)
            if not streaming:
                return await behavior(request, context)
            key = f"{caller.transport}:{caller.principal}"
            refused = self._acquire(method, key)
            if refused is not None:
                await abort(context, refused)
            try:
                return await behavior(request, context)
            finally:
                self._release(method, key)

        return call


def _headers(context: Context) -> dict[str, str]:
    """Request metadata as A43 matches it: one string per key, values joined by commas."""
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, bytes):
            continue  # binary metadata: no A43 pattern matches it
        out[key] = f"{out[key]},{value}" if key in out else value
    return out
