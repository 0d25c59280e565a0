"""Domain errors as gRPC statuses with google.rpc details (AIP-193).

Every status carries an ErrorInfo (domain ``connmeta.v1``, a stable reason,
and every dynamic value of the message in its metadata); the codes that have
a matching detail type also carry it: BadRequest for INVALID_ARGUMENT,
PreconditionFailure for FAILED_PRECONDITION. Clients in any language decode
them from the ``grpc-status-details-bin`` trailer.
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
from connmeta.watch import Evicted

DOMAIN = "connmeta.v1"


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
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata or {})
    status = status_pb2.Status(
        code=code.value[0],
        message=message,
        details=[_pack(info), *(_pack(m) for m in extra)],
    )
    return rpc_status.to_status(status)


def invalid_argument(violations: list[tuple[str, str]]) -> grpc.Status:
    """INVALID_ARGUMENT with one BadRequest field violation per problem."""
    text = "; ".join(f"{field}: {description}" for field, description in violations)
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in violations
        ]
    )
    fields = ",".join(field for field, _ in violations)
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
            f"connection {error.id!r} not found (it never existed or its retention ended)",
            "CONNECTION_NOT_FOUND",
            {"id": error.id},
        )
    if isinstance(error, InvalidArgument):
        return invalid_argument(error.violations)
    if isinstance(error, EtagMismatch):
        return rich_status(
            grpc.StatusCode.ABORTED,
            f"etag {error.expected} does not match the current etag {error.actual} of "
            f"connection {error.id!r}: read it again and retry",
            "ETAG_MISMATCH",
            {"id": error.id, "expected-etag": error.expected, "current-etag": error.actual},
        )
    if isinstance(error, ConnectionOpen):
        precondition = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="CONNECTION_STATE",
                    subject=f"connections/{error.id}",
                    description=(
                        f"server {error.field} cannot change while the connection is OPEN "
                        f"(mitmproxy refuses it); it is {error.current}"
                    ),
                )
            ]
        )
        return rich_status(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"Cannot change server.{error.field} on open connection {error.id!r} "
            f"(current {error.field}: {error.current})",
            "CONNECTION_OPEN",
            {"id": error.id, "state": "OPEN", "field": error.field, "current": error.current},
            precondition,
        )
    if isinstance(error, Compacted):
        return rich_status(
            grpc.StatusCode.OUT_OF_RANGE,
            f"revision {error.requested_revision} is older than the retained history "
            f"(oldest available: {error.oldest_revision}): list again and watch from the "
            "listing's revision",
            "REVISION_COMPACTED",
            {
                "requested_revision": str(error.requested_revision),
                "oldest_revision": str(error.oldest_revision),
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
            {"last_revision": str(error.last_revision)},
        )
    return rich_status(grpc.StatusCode.INTERNAL, str(error), "INTERNAL")


async def abort(context: grpc.aio.ServicerContext[object, object], status: grpc.Status) -> NoReturn:
    """End the call with ``status``, details included.

    ``abort_with_status`` exists on the aio context but not on its ABC
    (grpc/grpc#27970), hence the trailer spelled out: it works everywhere.
    """
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover
