"""Domain errors as gRPC statuses with google.rpc details (AIP-193).

Every status carries an ErrorInfo (domain ``connmeta.v1``, a stable reason,
and every dynamic value of the message in its metadata); the codes that have
a matching detail type also carry it: BadRequest for INVALID_ARGUMENT,
PreconditionFailure for FAILED_PRECONDITION. Clients in any language decode
them from the ``grpc-status-details-bin`` trailer.

Metadata keys are lowerCamelCase (AIP-193: ``currentEtag``, ``oldestRevision``)
and values are language-neutral text: decimal integers, ``host:port``
(``[v6]:port``), ``scheme://host:port`` for a via, RFC 3339 times; never a
Python repr. Keys and reasons are API: renaming one breaks clients.

Every status is bounded, whatever the input: the message, each metadata
value and each violation are clipped and at most a few violations are
listed, so the trailers (the message goes out twice: ``grpc-message`` and
inside the details) stay far below the 8 KiB of metadata a default client
accepts. An error that a client cannot read is an error lost.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from connmeta.store import (
    Compacted,
    ConnectionOpen,
    EtagMismatch,
    InvalidArgument,
    NotFound,
    StoreError,
)
from connmeta.validation import escape, shown
from connmeta.watch import Evicted

DOMAIN = "connmeta.v1"

MAX_MESSAGE_CHARS = 1024
MAX_METADATA_CHARS = 128
MAX_VIOLATIONS = 8
MAX_FIELD_CHARS = 128
MAX_DESCRIPTION_CHARS = 256


def _clip(text: str, limit: int) -> str:
    """Printable, at most ``limit`` characters (escapes count)."""
    text = escape(text, limit)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str] | None = None,
    *extra: Message,
) -> grpc.Status:
    """A status whose details hold an ErrorInfo first, then ``extra``."""
    clipped = {key: _clip(value, MAX_METADATA_CHARS) for key, value in (metadata or {}).items()}
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=clipped)
    status = status_pb2.Status(
        code=code.value[0],
        message=_clip(message, MAX_MESSAGE_CHARS),
        details=[_pack(info), *(_pack(m) for m in extra)],
    )
    return rpc_status.to_status(status)


def invalid_argument(violations: list[tuple[str, str]]) -> grpc.Status:
    """INVALID_ARGUMENT with one BadRequest field violation per problem (the first few)."""
    listed = [
        (_clip(field, MAX_FIELD_CHARS), _clip(description, MAX_DESCRIPTION_CHARS))
        for field, description in violations[:MAX_VIOLATIONS]
    ]
    if len(violations) > MAX_VIOLATIONS:
        rest = len(violations) - MAX_VIOLATIONS
        listed.append((listed[-1][0], f"and {rest} more violations, not listed"))
    text = "; ".join(f"{field}: {description}" for field, description in listed)
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in listed
        ]
    )
    fields = ",".join(dict.fromkeys(field for field, _ in listed))
    return rich_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"invalid argument: {text}",
        "INVALID_ARGUMENT",
        {"fields": fields},
        bad_request,
    )


def status_for(error: StoreError | Evicted) -> grpc.Status:
    """Translate a domain error into its status; the one place that knows the mapping."""
    if isinstance(error, NotFound):
        return rich_status(
            grpc.StatusCode.NOT_FOUND,
            f"connection {shown(error.id)} not found (it never existed or its retention ended)",
            "CONNECTION_NOT_FOUND",
            {"id": error.id},
        )
    if isinstance(error, InvalidArgument):
        return invalid_argument(error.violations)
    if isinstance(error, EtagMismatch):
        return rich_status(
            grpc.StatusCode.ABORTED,
            f"etag {shown(error.expected)} does not match the current etag {error.actual} of "
            f"connection {shown(error.id)}: read it again and retry",
            "ETAG_MISMATCH",
            {"id": error.id, "expectedEtag": error.expected, "currentEtag": error.actual},
        )
    if isinstance(error, ConnectionOpen):
        current = error.current or "unset"
        precondition = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="CONNECTION_STATE",
                    subject=f"connections/{error.id}",
                    description=(
                        f"server {error.field} cannot change while the connection is OPEN "
                        f"(mitmproxy refuses it); it is {current}"
                    ),
                )
            ]
        )
        return rich_status(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"Cannot change server.{error.field} on open connection {shown(error.id)} "
            f"(current {error.field}: {current})",
            "CONNECTION_OPEN",
            {"id": error.id, "state": "OPEN", "field": error.field, "current": error.current},
            precondition,
        )
    if isinstance(error, Compacted):
        where = (
            "is not in this store's history (it is from another incarnation: the sidecar restarted)"
            if error.ahead
            else f"is older than the retained history (oldest available: {error.oldest_revision})"
        )
        return rich_status(
            grpc.StatusCode.OUT_OF_RANGE,
            f"revision {error.requested_revision} {where}: list again and watch from the "
            "listing's revision",
            "REVISION_COMPACTED",
            {
                "requestedRevision": str(error.requested_revision),
                "oldestRevision": str(error.oldest_revision),
            },
        )
    if isinstance(error, Evicted):
        # Evicted during the initial snapshot, nothing is resumable: 0 would
        # mean "from now" and silently skip the rest of the snapshot.
        advice = (
            "resume with start_after_revision set to it"
            if error.last_revision
            else "list again (or watch with send_initial_events) and read faster"
        )
        return rich_status(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"watcher fell too far behind and was ended after revision {error.last_revision}: "
            + advice,
            "WATCHER_TOO_SLOW",
            {"lastRevision": str(error.last_revision)},
        )
    return internal()


def undecodable(type_name: str, error: str) -> grpc.Status:
    """INVALID_ARGUMENT for bytes that are not a valid ``type_name`` message."""
    return invalid_argument([(type_name, f"not a valid connmeta.v1.{type_name} message: {error}")])


def internal() -> grpc.Status:
    """The status of a bug of ours: the details are in the sidecar's log, not here."""
    return rich_status(
        grpc.StatusCode.INTERNAL,
        "internal error in the sidecar; it is logged there",
        "INTERNAL",
    )


async def abort(context: grpc.aio.ServicerContext[object, object], status: grpc.Status) -> NoReturn:
    """End the call with ``status``, details included.

    ``abort_with_status`` exists on the aio context but not on its ABC
    (grpc/grpc#27970), hence the trailer spelled out: it works everywhere.
    """
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover
