"""Desired vs observed: a change of a server's address or via, from accepted to settled.

A record's Server message is always what the proxy last reported. A change
asked for through the sidecar (UpdateServerConnection, a router's decision)
is desired state and waits in ``metadata.pending_change`` until the proxy
reports what became of it; then it moves to ``metadata.last_change`` with
status APPLIED, DEFERRED or NOT_APPLIED. So a record never claims an address
the proxy is not using, and a resync, which reports the observed values,
cannot silently undo a change that is still on its way.

Pure functions over messages; the store decides when to call them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

from connmeta.guard import address_value, via_value
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs

__all__ = ["NOT_HELD", "desired_values", "not_applied", "observed_value", "requested", "settled"]

NOT_HELD: Final = "the proxy no longer holds this server (it was not in the proxy's resync)"

_OUTCOME_DETAIL: Final = {
    rs.ROUTE_OUTCOME_KIND_TIMED_OUT: (
        "no decision reached the proxy within its route deadline; it connected unchanged"
    ),
    rs.ROUTE_OUTCOME_KIND_NO_CHANGE: "the proxy connected with other values (no change applied)",
}


def observed_value(server: pb.Server, field: str) -> object:
    """What mitmproxy holds for ``field`` ("address" or "via") of ``server``."""
    if field == "address":
        return address_value(server.address if server.HasField("address") else None)
    return via_value(server.via if server.HasField("via") else None)


def desired_values(change: pb.Change) -> dict[str, object]:
    """The values a change asks for, by field."""
    out: dict[str, object] = {}
    for field in change.fields:
        if field == "address":
            out[field] = address_value(change.address if change.HasField("address") else None)
        elif field == "via":
            out[field] = via_value(change.via if change.HasField("via") else None)
    return out


def requested(
    server: pb.Server,
    pending: pb.Change | None,
    mask: Iterable[str],
    address: pb.Address | None,
    via: pb.ServerSpec | None,
    *,
    actor: str,
    time: Timestamp,
    revision: int,
    query_id: str = "",
    principal: str = "",
) -> tuple[pb.Change | None, bool]:
    """The pending change after a request for ``mask``; and whether it differs.

    Fields named in ``mask`` take the requested value, or leave the pending
    change when the value is what the proxy already holds (a withdrawal);
    fields pending and not named stay pending. None when nothing is left.
    The guard is the caller's: this only merges.
    """
    wanted: dict[str, tuple[object, pb.Address | pb.ServerSpec | None]] = {}
    if pending is not None:
        for field, value in desired_values(pending).items():
            if field == "address":
                has = pending.HasField("address")
                wanted[field] = (value, pending.address if has else None)
            else:
                wanted[field] = (value, pending.via if pending.HasField("via") else None)
    before = {field: value for field, (value, _) in wanted.items()}
    for field in mask:
        message: pb.Address | pb.ServerSpec | None = address if field == "address" else via
        value = address_value(address) if field == "address" else via_value(via)
        if value == observed_value(server, field):
            wanted.pop(field, None)
        else:
            wanted[field] = (value, message)
    after = {field: value for field, (value, _) in wanted.items()}
    if after == before:
        return pending, False
    if not wanted:
        return None, True
    change = pb.Change(
        actor=actor,
        time=time,
        fields=sorted(wanted),
        revision=revision,
        status=pb.CHANGE_STATUS_PENDING,
        query_id=query_id,
        principal=principal,
    )
    for _, message in wanted.values():
        if isinstance(message, pb.Address):
            change.address.CopyFrom(message)
        elif isinstance(message, pb.ServerSpec):
            change.via.CopyFrom(message)
    return change, True


def settled(
    pending: pb.Change,
    server: pb.Server,
    hook: int,
    outcome: rs.RouteOutcome | None,
) -> pb.Change | None:
    """``pending`` as last_change once this report settles it, or None if it stays pending.

    A route outcome settles it, and so does a connect the proxy made without
    reporting one (server_connected, server_connect_error): the proxy then
    either holds the asked-for values (APPLIED) or connected without them
    (NOT_APPLIED). A via the proxy applies per request (DEFERRED) cannot show
    on this server. Other reports (resync, TLS, disconnect) leave it pending:
    the proxy applies it at the server's next connect.
    """
    if outcome is None and hook not in (pb.HOOK_SERVER_CONNECTED, pb.HOOK_SERVER_CONNECT_ERROR):
        return None
    missing = [
        field
        for field, value in desired_values(pending).items()
        if value != observed_value(server, field)
    ]
    result = pb.Change()
    result.CopyFrom(pending)
    deferred = set(outcome.deferred_fields) if outcome is not None else set()
    if not missing:
        result.status = pb.CHANGE_STATUS_APPLIED
    elif set(missing) <= deferred:
        result.status = pb.CHANGE_STATUS_DEFERRED
    else:
        result.status = pb.CHANGE_STATUS_NOT_APPLIED
        if outcome is None:
            result.status_detail = "the server connected before the change reached the proxy"
        else:
            result.status_detail = _OUTCOME_DETAIL.get(
                outcome.kind, "the proxy connected with other values than the change asked for"
            )
    return result


def not_applied(pending: pb.Change, detail: str) -> pb.Change:
    """``pending`` settled as NOT_APPLIED, ``detail`` saying why."""
    result = pb.Change()
    result.CopyFrom(pending)
    result.status = pb.CHANGE_STATUS_NOT_APPLIED
    result.status_detail = detail
    return result
