"""ConnectionFilter: which records a List or a Watch selects.

The same Filter serves List and Watch with the same meaning, as
``connection_service.proto`` specifies: every condition that is set must
hold; an empty filter matches everything.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from connmeta.records import InvalidArgument, Kind, Record
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.validation import MAX_HOST_BYTES, id_problem, shown

__all__ = ["Filter", "NameTerm", "Terms"]

_STATES: Final = frozenset(pb.ConnectionState.values())
_KINDS: Final = frozenset(cs.ConnectionKind.values())
_PORT_MAX: Final = 65535


class _Name:
    """A host or SNI pattern: exact (case-insensitive) or ``*.suffix``."""

    __slots__ = ("exact", "suffix")

    def __init__(self, pattern: str, path: str) -> None:
        text = pattern.lower()
        self.exact: str | None = None
        self.suffix: str | None = None
        if text.startswith("*."):
            rest = text[2:]
            if not rest or "*" in rest:
                raise InvalidArgument([(path, _wildcard_help(pattern))])
            self.suffix = "." + rest
        elif "*" in text:
            raise InvalidArgument([(path, _wildcard_help(pattern))])
        else:
            self.exact = text

    def matches(self, name: str) -> bool:
        if self.exact is not None:
            return name == self.exact or name.lower() == self.exact
        assert self.suffix is not None
        return len(name) > len(self.suffix) and name.lower().endswith(self.suffix)

    def key(self) -> tuple[str | None, str | None]:
        return (self.exact, self.suffix)


NameTerm = _Name
"""A host or SNI condition as the index planner reads it: ``exact`` or ``suffix``."""


class Terms(NamedTuple):
    """A filter's conditions, for planning which index a List reads (``connmeta.index``)."""

    kind: Kind | None
    states: frozenset[int]
    host: NameTerm | None
    sni: NameTerm | None
    port: int
    client_id: str


def _wildcard_help(pattern: str) -> str:
    return (
        f"{shown(pattern)} is not a valid pattern: use an exact name or one leading '*.' "
        "wildcard such as '*.example.com'"
    )


class Filter:
    """A validated ConnectionFilter. Construct with ``from_proto``; ``Filter()`` matches all."""

    __slots__ = ("_client_id", "_host", "_kind", "_port", "_sni", "_states")

    def __init__(
        self,
        *,
        kind: Kind | None = None,
        states: frozenset[int] = frozenset(),
        host: str = "",
        port: int = 0,
        sni: str = "",
        client_id: str = "",
        path: str = "filter",
    ) -> None:
        self._kind = kind
        self._states = states
        self._host = _Name(host, f"{path}.host") if host else None
        self._port = port
        self._sni = _Name(sni, f"{path}.sni") if sni else None
        self._client_id = client_id

    @classmethod
    def from_proto(cls, msg: cs.ConnectionFilter, path: str = "filter") -> Filter:
        """Validate ``msg``; InvalidArgument lists every problem with its field path."""
        violations: list[tuple[str, str]] = []
        if msg.kind not in _KINDS:
            violations.append((f"{path}.kind", f"unknown ConnectionKind value {msg.kind}"))
        bad_states = [s for s in msg.states if s not in _STATES]
        if bad_states:
            violations.append(
                (f"{path}.states", f"unknown ConnectionState values {bad_states}; use 0-3")
            )
        if msg.port > _PORT_MAX:
            violations.append((f"{path}.port", f"{msg.port} is outside 0-{_PORT_MAX}"))
        for name in ("host", "sni"):
            pattern = getattr(msg, name)
            if len(pattern) > MAX_HOST_BYTES:
                violations.append(
                    (f"{path}.{name}", f"{shown(pattern)} is longer than {MAX_HOST_BYTES} bytes")
                )
                continue
            try:
                _Name(pattern, f"{path}.{name}")
            except InvalidArgument as e:
                violations.extend(e.violations)
        problem = id_problem(msg.client_id, required=False)
        if problem:
            violations.append((f"{path}.client_id", problem))
        if violations:
            raise InvalidArgument(violations)
        return cls(
            kind=Kind(msg.kind) if msg.kind else None,
            states=frozenset(msg.states),
            host=msg.host,
            port=msg.port,
            sni=msg.sni,
            client_id=msg.client_id,
            path=path,
        )

    @property
    def is_empty(self) -> bool:
        """True when the filter matches every record (watchers skip matching then)."""
        return (
            self._kind is None
            and not self._states
            and self._host is None
            and not self._port
            and self._sni is None
            and not self._client_id
        )

    def matches(self, record: Record) -> bool:
        """Whether ``record`` satisfies every condition that is set."""
        if self._kind is not None and record.kind is not self._kind:
            return False
        if self._states and record.state not in self._states:
            return False
        if self._client_id and self._client_id != record.client_id:
            return False
        if self._port and record.port != self._port:
            return False
        if self._host is not None and not self._host.matches(record.host):
            return False
        return self._sni is None or (bool(record.sni) and self._sni.matches(record.sni))

    def terms(self) -> Terms:
        """The conditions, for the index planner; ``matches`` stays the definition."""
        return Terms(self._kind, self._states, self._host, self._sni, self._port, self._client_id)

    def _key(self) -> tuple[object, ...]:
        return (
            self._kind,
            self._states,
            self._host.key() if self._host else None,
            self._port,
            self._sni.key() if self._sni else None,
            self._client_id,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Filter) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Filter{self._key()!r}"
