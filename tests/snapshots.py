"""Snapshots for the domain-core tests: the proxy's reports, built small and explicit."""

from __future__ import annotations

import itertools

from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs

OPEN = pb.CONNECTION_STATE_OPEN
CLOSED = pb.CONNECTION_STATE_CLOSED
CAN_READ = pb.CONNECTION_STATE_CAN_READ
CAN_WRITE = pb.CONNECTION_STATE_CAN_WRITE

_ids = itertools.count(1)


def next_id(prefix: str = "conn") -> str:
    """Ids that sort in creation order, so list order is predictable."""
    return f"{prefix}-{next(_ids):08d}"


def address(t: tuple[object, ...]) -> pb.Address:
    msg = pb.Address(host=str(t[0]), port=int(t[1]))  # type: ignore[call-overload]
    if len(t) > 2:
        msg.flowinfo = int(t[2])  # type: ignore[call-overload]
    if len(t) > 3:
        msg.scope_id = int(t[3])  # type: ignore[call-overload]
    return msg


def via_spec(t: tuple[str, tuple[str, int]] | None) -> pb.ServerSpec | None:
    if t is None:
        return None
    scheme = {"http": pb.SCHEME_HTTP, "https": pb.SCHEME_HTTPS}[t[0]]
    return pb.ServerSpec(scheme=scheme, address=address(t[1]))


def server(
    id: str,
    *,
    client_id: str = "client-x",
    state: int = OPEN,
    addr: tuple[object, ...] | None = ("origin.example", 443),
    via: tuple[str, tuple[str, int]] | None = None,
    sni: str | None = None,
    hook: int = pb.HOOK_SERVER_CONNECTED,
    error: str | None = None,
) -> rs.ConnectionSnapshot:
    conn = pb.Connection(id=id, state=state, transport_protocol=pb.TRANSPORT_PROTOCOL_TCP)  # type: ignore[arg-type]
    if sni is not None:
        conn.sni = sni
    if error is not None:
        conn.error = error
    msg = pb.Server(connection=conn)
    if addr is not None:
        msg.address.CopyFrom(address(addr))
    spec = via_spec(via)
    if spec is not None:
        msg.via.CopyFrom(spec)
    return rs.ConnectionSnapshot(hook=hook, client_id=client_id, server=msg)  # type: ignore[arg-type]


def client(
    id: str,
    *,
    state: int = OPEN,
    peer: tuple[str, int] = ("198.51.100.7", 51234),
    sni: str | None = None,
    hook: int = pb.HOOK_CLIENT_CONNECTED,
) -> rs.ConnectionSnapshot:
    conn = pb.Connection(
        id=id,
        state=state,  # type: ignore[arg-type]
        transport_protocol=pb.TRANSPORT_PROTOCOL_TCP,
        peername=address(peer),
        sockname=pb.Address(host="127.0.0.1", port=8080),
    )
    if sni is not None:
        conn.sni = sni
    conn.timestamp_start.FromNanoseconds(1_700_000_000_000_000_000)
    msg = pb.Client(connection=conn, proxy_mode=pb.ProxyMode(full_spec="regular"))
    return rs.ConnectionSnapshot(hook=hook, client=msg)  # type: ignore[arg-type]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
