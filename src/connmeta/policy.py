"""gRFC A43 authorization policies: parse, validate, match, reload from a file.

The policy format is gRPC's own SDK authorization policy (gRFC A43, the
``authz`` package of grpc-go, ``FileWatcherAuthorizationPolicyProvider`` of
C++), so the same file can guard a Go or C++ gRPC server:

    {"name": "...", "deny_rules": [RULE...], "allow_rules": [RULE...]}
    RULE = {"name": "...", "source": {"principals": [PATTERN...]},
            "request": {"paths": [PATTERN...],
                        "headers": [{"key": "...", "values": [PATTERN...]}]}}

A request is denied if a deny rule matches, else allowed if an allow rule
matches, else denied. A rule matches if its source and its request match;
an absent source or request matches anything. PATTERN is exact ``abc``,
prefix ``abc*``, suffix ``*abc`` or presence ``*`` (any non-empty value).
A principal pattern matches only callers authenticated by TLS, against any of
the certificate's URI SANs, any DNS SAN, or its subject; ``""`` matches a TLS
caller without a certificate. Unknown fields are errors, as in grpc-go: a
typo must not silently widen a policy.

No gRPC here: :mod:`connmeta.auth` feeds it the caller and the method.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "Decision",
    "Pattern",
    "Peer",
    "Policy",
    "PolicyError",
    "PolicyFile",
]

log = logging.getLogger("connmeta.policy")

# Headers A43 does not let a rule match: hop-by-hop, Host, pseudo-headers and grpc-*.
_UNSUPPORTED_HEADERS: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


class PolicyError(ValueError):
    """A policy that is not valid; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class Pattern:
    """One A43 string matcher."""

    text: str

    def matches(self, value: str) -> bool:
        text = self.text
        if text == "*":
            return value != ""
        if text.endswith("*"):
            return value.startswith(text[:-1])
        if text.startswith("*"):
            return value.endswith(text[1:])
        return value == text


@dataclass(frozen=True, slots=True)
class Peer:
    """What a rule's source is matched against.

    ``tls`` False: not authenticated by TLS, so no principal pattern
    matches. ``names``: the certificate's URI SANs, DNS SANs and subject, in
    A43's order; empty for a TLS caller without a certificate.
    """

    tls: bool
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """Allowed or not, and why (the rule's name, for the log and the error)."""

    allowed: bool
    rule: str
    needs_identity: bool = False
    """Denied, and an allow rule for this request would match an authenticated
    caller: the answer is UNAUTHENTICATED rather than PERMISSION_DENIED."""


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    principals: tuple[Pattern, ...] | None
    paths: tuple[Pattern, ...] | None
    headers: tuple[tuple[str, tuple[Pattern, ...]], ...]

    def request_matches(self, path: str, headers: Mapping[str, str]) -> bool:
        if self.paths is not None and not any(p.matches(path) for p in self.paths):
            return False
        for key, values in self.headers:
            value = headers.get(key)
            if value is None or not any(p.matches(value) for p in values):
                return False
        return True

    def source_matches(self, peer: Peer) -> bool:
        if self.principals is None:
            return True
        if not peer.tls:
            return False
        names = peer.names or ("",)
        return any(p.matches(name) for p in self.principals for name in names)


class Policy:
    """A parsed, valid A43 policy."""

    def __init__(self, name: str, deny: Sequence[_Rule], allow: Sequence[_Rule]) -> None:
        self.name = name
        self._deny = tuple(deny)
        self._allow = tuple(allow)

    @classmethod
    def parse(cls, text: str | bytes, source: str = "policy") -> Policy:
        """PolicyError naming ``source`` and the offending field if invalid."""
        try:
            data = json.loads(text)
        except ValueError as error:
            raise PolicyError(f"{source}: not valid JSON: {error}") from None
        return cls._from_json(data, source)

    @classmethod
    def _from_json(cls, data: Any, source: str) -> Policy:
        def fail(where: str, problem: str) -> PolicyError:
            return PolicyError(f"{source}: {where}: {problem}")

        obj = _object(data, "policy", {"name", "deny_rules", "allow_rules"}, fail)
        name = _string(obj.get("name"), "name", fail, required=True)
        if "allow_rules" not in obj:
            raise fail("allow_rules", "is required (an A43 policy without one denies everything)")
        rules: dict[str, list[_Rule]] = {}
        for key in ("deny_rules", "allow_rules"):
            raw = obj.get(key, [])
            if not isinstance(raw, list):
                raise fail(key, "must be a list of rules")
            rules[key] = [_rule(r, f"{key}[{i}]", fail) for i, r in enumerate(raw)]
        return cls(name, rules["deny_rules"], rules["allow_rules"])

    def decide(self, peer: Peer, path: str, headers: Mapping[str, str]) -> Decision:
        """A43's order: any matching deny rule denies, then any matching allow
        rule allows, else denied."""
        for rule in self._deny:
            if rule.request_matches(path, headers) and rule.source_matches(peer):
                return Decision(False, rule.name)
        needs_identity = False
        for rule in self._allow:
            if not rule.request_matches(path, headers):
                continue
            if rule.source_matches(peer):
                return Decision(True, rule.name)
            needs_identity = needs_identity or not peer.tls
        return Decision(False, "", needs_identity=needs_identity)


def _object(
    data: Any, where: str, allowed: set[str], fail: Callable[[str, str], PolicyError]
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise fail(where, "must be an object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise fail(where, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    return data


def _string(
    value: Any, where: str, fail: Callable[[str, str], PolicyError], *, required: bool = False
) -> str:
    if value is None:
        if required:
            raise fail(where, "is required")
        return ""
    if not isinstance(value, str):
        raise fail(where, "must be a string")
    if required and not value:
        raise fail(where, "is required")
    return value


def _patterns(
    value: Any, where: str, fail: Callable[[str, str], PolicyError]
) -> tuple[Pattern, ...]:
    if not isinstance(value, list):
        raise fail(where, "must be a list of strings")
    return tuple(Pattern(_string(v, f"{where}[{i}]", fail)) for i, v in enumerate(value))


def _rule(data: Any, where: str, fail: Callable[[str, str], PolicyError]) -> _Rule:
    obj = _object(data, where, {"name", "source", "request"}, fail)
    name = _string(obj.get("name"), f"{where}.name", fail, required=True)
    principals: tuple[Pattern, ...] | None = None
    if "source" in obj:
        source = _object(obj["source"], f"{where}.source", {"principals"}, fail)
        if source.get("principals"):
            principals = _patterns(source["principals"], f"{where}.source.principals", fail)
    paths: tuple[Pattern, ...] | None = None
    headers: list[tuple[str, tuple[Pattern, ...]]] = []
    if "request" in obj:
        request = _object(obj["request"], f"{where}.request", {"paths", "headers"}, fail)
        if request.get("paths"):
            paths = _patterns(request["paths"], f"{where}.request.paths", fail)
        raw_headers = request.get("headers", [])
        if not isinstance(raw_headers, list):
            raise fail(f"{where}.request.headers", "must be a list")
        for i, header in enumerate(raw_headers):
            at = f"{where}.request.headers[{i}]"
            h = _object(header, at, {"key", "values"}, fail)
            key = _string(h.get("key"), f"{at}.key", fail, required=True).lower()
            if key.startswith((":", "grpc-")) or key in _UNSUPPORTED_HEADERS:
                raise fail(f"{at}.key", f"{key!r} cannot be matched (A43)")
            if "values" not in h or not h["values"]:
                raise fail(f"{at}.values", "is required")
            headers.append((key, _patterns(h["values"], f"{at}.values", fail)))
    return _Rule(name, principals, paths, tuple(headers))


def _signature(path: str) -> tuple[int, int, int, int]:
    # stat follows symlinks: a Kubernetes ConfigMap swaps a symlink, which
    # changes the inode even when size and mtime happen to repeat.
    st = os.stat(path)
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


class PolicyFile:
    """A policy read from a file and read again when the file changes.

    Reading at start raises PolicyError (a clear message naming the file):
    a sidecar must not come up unguarded or locked by a typo. Later, a file
    that does not parse, or is missing, keeps the last good policy and is
    logged once per change of the file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.generation = 0
        """How many times a policy was loaded (1 after start)."""
        try:
            signature = _signature(path)
            with open(path, "rb") as f:
                text = f.read()
        except OSError as error:
            raise PolicyError(f"--authz-policy {path}: cannot read it: {error.strerror}") from None
        self.policy = Policy.parse(text, f"--authz-policy {path}")
        self._signature: tuple[int, int, int, int] | None = signature
        self.generation = 1

    def check(self) -> bool:
        """Reload if the file changed; True if a new policy is in effect."""
        try:
            signature = _signature(self.path)
        except OSError as error:
            if self._signature is not None:
                log.warning(
                    "authorization policy %s unreadable (%s): keeping policy %r",
                    self.path,
                    error.strerror,
                    self.policy.name,
                )
                self._signature = None
            return False
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            with open(self.path, "rb") as f:
                policy = Policy.parse(f.read(), self.path)
        except (OSError, PolicyError) as error:
            log.warning(
                "authorization policy not reloaded, keeping policy %r: %s", self.policy.name, error
            )
            return False
        self.policy = policy
        self.generation += 1
        log.info("authorization policy %r loaded from %s", policy.name, self.path)
        return True
