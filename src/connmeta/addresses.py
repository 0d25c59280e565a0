"""Socket addresses and server specs: between connmeta.v1 messages, tuples and text.

mitmproxy holds addresses as plain tuples: ``(host, port)`` for IPv4 and host
names, ``(host, port, flowinfo, scope_id)`` for IPv6 sockets. The proto's
``Address`` carries the optional parts with presence, so a tuple comes back
with exactly the length it had. This module needs no mitmproxy: the sidecar
and the CLI use it as well as the converters in ``connmeta.mitm``.

Every error is a ``ValueError`` whose message starts with the field path the
caller passes in ``path``, so a bad value deep inside a message can be found.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from connmeta.v1 import connection_pb2 as pb

__all__ = [
    "SCHEME_NAMES",
    "SCHEME_VALUES",
    "AddressTuple",
    "address_to_tuple",
    "enum_label",
    "fill_address",
    "fill_via",
    "format_address",
    "host_port",
    "parse_address",
    "tuple_to_address",
    "via_to_tuple",
]

AddressTuple = tuple[str, int] | tuple[str, int, int] | tuple[str, int, int, int]
"""An address as mitmproxy holds it: 2-tuple, or 3/4-tuple from an IPv6 socket."""

SCHEME_NAMES: Final[dict[pb.Scheme.ValueType, str]] = {
    pb.SCHEME_HTTP: "http",
    pb.SCHEME_HTTPS: "https",
    pb.SCHEME_HTTP3: "http3",
    pb.SCHEME_TLS: "tls",
    pb.SCHEME_DTLS: "dtls",
    pb.SCHEME_TCP: "tcp",
    pb.SCHEME_UDP: "udp",
    pb.SCHEME_DNS: "dns",
    pb.SCHEME_QUIC: "quic",
}
"""Scheme enum value → the literal mitmproxy's ServerSpec uses (all nine)."""

SCHEME_VALUES: Final[dict[str, pb.Scheme.ValueType]] = {
    name: value for value, name in SCHEME_NAMES.items()
}
"""The inverse of SCHEME_NAMES; mitmproxy's schemes are case-sensitive, and so is this."""

_PORT_MAX: Final = 65535
_UINT32_MAX: Final = 0xFFFFFFFF


def address_to_tuple(address: pb.Address, path: str = "Address") -> AddressTuple:
    """The tuple mitmproxy would hold for ``address``: 2-, 3- or 4-long by presence.

    Raises ValueError for a port above 65535, or a scope_id without a flowinfo
    (no tuple has a fourth element without a third).
    """
    port = address.port
    if port > _PORT_MAX:
        raise ValueError(f"{path}.port: {port} is outside 0-{_PORT_MAX}")
    if not address.HasField("flowinfo"):
        if address.HasField("scope_id"):
            raise ValueError(
                f"{path}.scope_id: set without flowinfo; an IPv6 socket address has "
                "both (host, port, flowinfo, scope_id), set flowinfo (0 if unknown)"
            )
        return (address.host, port)
    if not address.HasField("scope_id"):
        return (address.host, port, address.flowinfo)
    return (address.host, port, address.flowinfo, address.scope_id)


def fill_address(msg: pb.Address, t: tuple[object, ...], path: str = "Address") -> None:
    """Write the tuple ``t`` into ``msg`` (in place, so a parent message needs no copy)."""
    n = len(t)
    if not 2 <= n <= 4:
        raise ValueError(f"{path}: {t!r} is not a (host, port[, flowinfo[, scope_id]]) tuple")
    host, port = t[0], t[1]
    if not isinstance(host, str):
        raise ValueError(f"{path}.host: {host!r} is not a str")
    if type(port) is not int or not 0 <= port <= _PORT_MAX:
        raise ValueError(f"{path}.port: {port!r} is outside 0-{_PORT_MAX}")
    msg.host = host
    msg.port = port
    if n > 2:
        msg.flowinfo = _uint32(t[2], path, "flowinfo")
        if n > 3:
            msg.scope_id = _uint32(t[3], path, "scope_id")


def tuple_to_address(t: tuple[object, ...], path: str = "Address") -> pb.Address:
    """The Address message for a mitmproxy address tuple; the inverse of address_to_tuple."""
    msg = pb.Address()
    fill_address(msg, t, path)
    return msg


def via_to_tuple(spec: pb.ServerSpec, path: str = "ServerSpec") -> tuple[str, tuple[str, int]]:
    """mitmproxy's ServerSpec tuple ``(scheme, (host, port))`` for ``spec``.

    Raises ValueError for an unspecified or unknown scheme, a missing address,
    or an address with IPv6 socket parts (a ServerSpec address is a 2-tuple).
    """
    scheme = SCHEME_NAMES.get(spec.scheme)
    if scheme is None:
        raise ValueError(
            f"{path}.scheme: {enum_label(pb.Scheme.Name, spec.scheme)} is not a scheme; "
            f"use one of {', '.join(SCHEME_NAMES.values())}"
        )
    if not spec.HasField("address"):
        raise ValueError(f"{path}.address: required, a ServerSpec names where the server listens")
    return (scheme, host_port(spec.address, f"{path}.address"))


def fill_via(msg: pb.ServerSpec, via: tuple[object, ...], path: str = "ServerSpec") -> None:
    """Write mitmproxy's ``(scheme, (host, port))`` tuple into ``msg``."""
    if len(via) != 2:
        raise ValueError(f"{path}: {via!r} is not a (scheme, (host, port)) tuple")
    scheme, address = via
    value = SCHEME_VALUES.get(scheme) if isinstance(scheme, str) else None
    if value is None:
        raise ValueError(
            f"{path}.scheme: {scheme!r} is not one of {', '.join(SCHEME_NAMES.values())}"
        )
    if not isinstance(address, tuple) or len(address) != 2:
        raise ValueError(f"{path}.address: {address!r} is not a (host, port) tuple")
    msg.scheme = value
    fill_address(msg.address, address, f"{path}.address")


def host_port(address: pb.Address, path: str = "Address") -> tuple[str, int]:
    """The 2-tuple for an address that must not carry IPv6 socket parts."""
    if address.HasField("flowinfo") or address.HasField("scope_id"):
        raise ValueError(
            f"{path}: flowinfo and scope_id belong to socket addresses (peername, "
            "sockname) only; mitmproxy holds this address as a (host, port) pair"
        )
    port = address.port
    if port > _PORT_MAX:
        raise ValueError(f"{path}.port: {port} is outside 0-{_PORT_MAX}")
    return (address.host, port)


def format_address(address: pb.Address) -> str:
    """``host:port``, with IPv6 literals bracketed (``[::1]:8080``).

    The text form has no room for flowinfo and scope_id; they are left out.
    """
    host = address.host
    if ":" in host:
        return f"[{host}]:{address.port}"
    return f"{host}:{address.port}"


def parse_address(text: str) -> pb.Address:
    """Parse ``host:port`` or ``[v6]:port`` (the CLI form) into an Address.

    Raises ValueError when the port is missing or not 0-65535, or when an
    IPv6 literal is not bracketed (``::1:80`` is ambiguous).
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"address {text!r}: expected [v6-host]:port, e.g. [::1]:8080")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"address {text!r}: the port is missing, expected host:port")
        if ":" in host:
            raise ValueError(f"address {text!r}: bracket IPv6 hosts, e.g. [{host}]:{port_text}")
    if not host:
        raise ValueError(f"address {text!r}: the host is empty, expected host:port")
    if not port_text.isdigit() or not port_text.isascii() or int(port_text) > _PORT_MAX:
        raise ValueError(f"address {text!r}: port {port_text!r} is not a number in 0-{_PORT_MAX}")
    return pb.Address(host=host, port=int(port_text))


def _uint32(value: object, path: str, name: str) -> int:
    if type(value) is not int or not 0 <= value <= _UINT32_MAX:
        raise ValueError(f"{path}.{name}: {value!r} is outside 0-{_UINT32_MAX}")
    return value


def enum_label(name_of: Callable[[Any], str], number: int) -> str:
    """``NAME (n)`` for a known value, ``unknown value n`` for a stray (proto3 enums are open)."""
    try:
        return f"{name_of(number)} ({number})"
    except ValueError:
        return f"unknown value {number}"
