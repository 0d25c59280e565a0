"""mitmproxy's open-connection guard, and the values it compares.

``mitmproxy.connection.Server.__setattr__`` refuses a change of ``address`` or
``via`` exactly when the server's state *is* OPEN and the new value differs
from the current one by ``!=``. The sidecar refuses the same changes, so a
change it accepts is one the proxy can make. Values are compared as the
tuples mitmproxy holds, so ``('h', 1)`` and ``('h', 1, 0, 0)`` differ as they
do there.
"""

from __future__ import annotations

from typing import Final

from connmeta import addresses
from connmeta.v1 import connection_pb2 as pb

__all__ = ["address_value", "guard_refuses", "value_text", "via_value"]

_OPEN: Final = pb.CONNECTION_STATE_OPEN


def guard_refuses(state: int, current: object, new: object) -> bool:
    """mitmproxy's ``Server.__setattr__`` for address and via, as a predicate.

    It raises exactly when the state is OPEN (``is ConnectionState.OPEN``: the
    half-closed states and CLOSED allow changes) and the new value differs
    from the current one by ``!=``, so re-assigning the same tuple is fine.
    """
    return state == _OPEN and current != new


def address_value(address: pb.Address | None) -> object:
    """The value mitmproxy holds for a server address (None when unset)."""
    return addresses.address_to_tuple(address) if address is not None else None


def via_value(via: pb.ServerSpec | None) -> object:
    """The value mitmproxy holds for a via: ``(scheme, (host, port))`` or None."""
    if via is None:
        return None
    scheme = addresses.SCHEME_NAMES.get(via.scheme, via.scheme)
    return (scheme, addresses.address_to_tuple(via.address) if via.HasField("address") else None)


def value_text(value: object) -> str:
    """A value of ``address_value``/``via_value`` as text any language reads.

    ``host:port`` (``[v6]:port``; flowinfo and scope_id have no text form),
    ``scheme://host:port`` for a via, ``""`` when unset: what an error's
    ErrorInfo carries instead of a Python tuple repr.
    """
    if value is None:
        return ""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        first, second = value
        if isinstance(second, int):  # an address: (host, port)
            return f"[{first}]:{second}" if ":" in first else f"{first}:{second}"
        return f"{first}://{value_text(second)}"  # a via: (scheme, address | None)
    if isinstance(value, tuple) and len(value) in (3, 4):  # an IPv6 socket address
        return value_text(value[:2])
    return str(value)
