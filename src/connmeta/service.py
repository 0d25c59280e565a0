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
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from connmeta.errors import abort, internal, status_for, undecodable
from connmeta.store import StoreError

__all__ = [
    "IDENTITY_KEY",
    "Context",
    "IdentityInterceptor",
    "Undecodable",
    "cancel",
    "decoder",
    "guarded",
    "identity",
    "rewrap",
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


_BEHAVIOR_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def rewrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]],
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its behavior replaced by ``wrap(kind, behavior)``, where
    kind is the handler field that holds it ("unary_unary", ..., "stream_stream"):
    what every interceptor of this server does to a handler."""
    kind = next(k for k in _BEHAVIOR_KINDS if getattr(handler, k) is not None)
    return handler._replace(**{kind: wrap(kind, getattr(handler, kind))})  # type: ignore[attr-defined, no-any-return]


IDENTITY_KEY = "connmeta-incarnation"
"""The response metadata key that names the store on every call."""


class IdentityInterceptor(grpc.aio.ServerInterceptor):
    """Sends the store's incarnation as response metadata on every call, errors
    included, before the handler runs: the one door through which every RPC,
    present and future, says which store's history it answers from."""

    def __init__(self, incarnation: str) -> None:
        self._metadata = ((IDENTITY_KEY, incarnation),)

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
        return rewrap(handler, lambda kind, behavior: self._wrap(behavior))

    def _wrap(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        metadata = self._metadata
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                await context.send_initial_metadata(metadata)
                responses = behavior(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    # At once, also when the call is cancelled: left to the
                    # garbage collector, the handler's cleanup (its tasks)
                    # would run late or not at all.
                    await responses.aclose()

            return stream

        async def call(request: Any, context: Context) -> Any:
            await context.send_initial_metadata(metadata)
            return await behavior(request, context)

        return call
