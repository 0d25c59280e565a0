"""The transport's shared door: decoding and the error boundary of every handler.

One servicer per gRPC service, each in its own module, each translating only:
``connection_service`` (ConnectionService), ``report_service``
(ReportService), ``router_service`` (RouterService). What they share lives
here, so every RPC gets it alike:

- Requests are decoded by :func:`decoder`, which never raises: bytes that are
  not a valid message become an :class:`Undecodable`, which the servicer
  answers with INVALID_ARGUMENT like any other bad input (a deserializer that
  raises makes grpcio answer UNKNOWN).
- :func:`guarded` is the error boundary of a handler: a domain error
  becomes its rich status; anything else is a bug of ours, logged once with
  its traceback and answered INTERNAL. Bidirectional streams keep their own
  boundary (their work runs in tasks).
- Reads answer with bytes the store already holds (each record version is
  serialized once, when written), so their response serializer is the
  identity.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from connmeta.errors import abort, internal, status_for, undecodable
from connmeta.store import StoreError

__all__ = [
    "Context",
    "Undecodable",
    "cancel",
    "decoder",
    "guarded",
    "identity",
]

log = logging.getLogger("connmeta.service")

Context = grpc.aio.ServicerContext[Any, Any]
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class Undecodable:
    """Request bytes that are not a valid ``type_name`` message."""

    __slots__ = ("error", "type_name")

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error

    def status(self) -> grpc.Status:
        """The INVALID_ARGUMENT that answers it."""
        return undecodable(self.type_name, self.error)


def decoder(message_type: type[Message]) -> Callable[[bytes], Any]:
    """A request deserializer that returns an Undecodable instead of raising."""
    name = message_type.DESCRIPTOR.name
    parse = message_type.FromString

    def decode(data: bytes) -> Message | Undecodable:
        try:
            return parse(data)
        except Exception as e:  # DecodeError, or anything the parser raises
            return Undecodable(name, str(e))

    return decode


async def cancel(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until they ended. A task that is only
    cancelled runs its cancellation later; if what it waits on (a router's
    queue, a proxy's feed) is dropped first, the task is garbage collected
    still pending ("Task was destroyed but it is pending!")."""
    for task in tasks:
        task.cancel()
    # return_exceptions: their outcome is of no interest any more, and an
    # exception left unretrieved would be logged as well.
    await asyncio.gather(*tasks, return_exceptions=True)


def identity(data: bytes) -> bytes:
    """The serializer of methods that answer with bytes the store already holds."""
    return data


def guarded(
    method: Callable[[_Request, Context], Awaitable[_Response]],
) -> Callable[[_Request | Undecodable, Context], Awaitable[_Response]]:
    """The error boundary of a handler: a unary one, or a streaming one that
    writes with ``context.write`` (and so can bound how long a write blocks)."""

    async def handle(request: _Request | Undecodable, context: Context) -> _Response:
        if isinstance(request, Undecodable):
            await abort(context, request.status())
        try:
            return await method(request, context)
        except StoreError as error:
            await abort(context, status_for(error))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("%s failed", getattr(method, "__name__", "handler"))
            await abort(context, internal())

    return handle
