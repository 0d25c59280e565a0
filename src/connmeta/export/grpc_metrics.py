"""gRPC server metrics from one interceptor, under go-grpc-prometheus's names.

``grpc_server_started_total``, ``grpc_server_handled_total`` and the
``grpc_server_handling_seconds`` histogram, labelled ``grpc_service``,
``grpc_method``, ``grpc_type`` (``unary``, ``client_stream``,
``server_stream``, ``bidi_stream``) and, on handled, ``grpc_code`` spelled
as grpc-go spells codes (``OK``, ``InvalidArgument``, ``PermissionDenied``):
the names and values the existing gRPC dashboards and alerts query.

The interceptor is the outermost one, so a call the authorization
interceptor refuses is counted like any other, with its code. From the same
statuses it counts ``connmeta_updates_total{outcome}``: an update's outcome
is exactly its status (``connmeta.errors.status_for``), so counting it here
also covers what never reaches the store (a refused caller, an undecodable
request).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from connmeta.service import rewrap

__all__ = ["UPDATE_OUTCOMES", "GrpcMetricsInterceptor", "code_name"]

Context = grpc.aio.ServicerContext[Any, Any]

_TYPES: Final = {
    "unary_unary": "unary",
    "unary_stream": "server_stream",
    "stream_unary": "client_stream",
    "stream_stream": "bidi_stream",
}
# grpc-go's codes.Code.String(): what go-grpc-prometheus puts in grpc_code.
_GO_NAMES: Final = {
    code: "".join(part.capitalize() for part in code.name.split("_")) for code in grpc.StatusCode
}
_GO_NAMES[grpc.StatusCode.OK] = "OK"
_GO_NAMES[grpc.StatusCode.CANCELLED] = "Canceled"

UPDATE_METHOD: Final = "/connmeta.v1.ConnectionService/UpdateServerConnection"
_UPDATE_OUTCOME: Final = {
    grpc.StatusCode.OK: "accepted",
    grpc.StatusCode.FAILED_PRECONDITION: "refused_open",  # ConnectionOpen: mitmproxy's guard
    grpc.StatusCode.ABORTED: "etag_mismatch",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.PERMISSION_DENIED: "denied",  # the authorization interceptor (auth.py)
    grpc.StatusCode.UNAUTHENTICATED: "denied",
}
UPDATE_OUTCOMES: Final = (*dict.fromkeys(_UPDATE_OUTCOME.values()), "error")
"""Values of connmeta_updates_total's ``outcome``; "error" is any other status."""

# go-grpc-prometheus's default buckets (prometheus.DefBuckets).
_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def code_name(code: grpc.StatusCode) -> str:
    """``code`` as grpc_code spells it."""
    return _GO_NAMES[code]


def _status(context: Context, error: BaseException | None) -> grpc.StatusCode:
    """The status the call ended with."""
    if error is None or isinstance(error, grpc.aio.AbortError):
        # abort() and set_code() record it on the context; None: OK.
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code
        return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED  # the client went away, or the server stopped
    return grpc.StatusCode.UNKNOWN  # what grpcio answers for an exception


class _Method:
    """The metric children of one method, looked up once."""

    __slots__ = ("_handled", "_metrics", "labels", "seconds", "started", "updates")

    def __init__(self, metrics: GrpcMetricsInterceptor, method: str, kind: str) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        self.labels = (service, name, _TYPES[kind])
        self.started = metrics.started.labels(*self.labels)
        self.seconds = metrics.seconds.labels(*self.labels)
        self.updates = metrics.updates if method == UPDATE_METHOD else None
        self._metrics = metrics
        # labels() takes a lock and builds a key: a few microseconds a call.
        self._handled: dict[grpc.StatusCode, Any] = {}

    def done(self, code: grpc.StatusCode, started: float) -> None:
        self.seconds.observe(time.perf_counter() - started)
        handled = self._handled.get(code)
        if handled is None:
            handled = self._handled[code] = self._metrics.handled.labels(
                *self.labels, _GO_NAMES[code]
            )
        handled.inc()
        if self.updates is not None:
            self.updates.labels(_UPDATE_OUTCOME.get(code, "error")).inc()


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call, unary and streaming; put it first."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("grpc_service", "grpc_method", "grpc_type")
        self.started = Counter(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            labels,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*labels, "grpc_code"),
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            labels,
            buckets=_BUCKETS,
            registry=registry,
        )
        self.updates = Counter(
            "connmeta_updates",
            "UpdateServerConnection calls by outcome: accepted, refused_open (mitmproxy's "
            "open-connection guard), etag_mismatch, invalid, not_found, denied "
            "(authorization), error.",
            ("outcome",),
            registry=registry,
        )
        for outcome in UPDATE_OUTCOMES:
            self.updates.labels(outcome)  # every outcome exported from the start, at 0
        self._methods: dict[str, _Method] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: grpcio answers UNIMPLEMENTED, not a label value
        method = handler_call_details.method

        def wrap(kind: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
            entry = self._methods.get(method)
            if entry is None:
                entry = self._methods[method] = _Method(self, method, kind)
            return _wrap(behavior, entry)

        return rewrap(handler, wrap)


def _wrap(behavior: Callable[..., Any], entry: _Method) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            entry.started.inc()
            error: BaseException | None = None
            responses = behavior(request, context)
            try:
                async for response in responses:
                    yield response
            except BaseException as e:
                error = e
                raise
            finally:
                try:
                    await responses.aclose()  # at once, as IdentityInterceptor does
                finally:
                    entry.done(_status(context, error), started)

        return stream

    async def call(request: Any, context: Context) -> Any:
        started = time.perf_counter()
        entry.started.inc()
        error: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as e:
            error = e
            raise
        finally:
            entry.done(_status(context, error), started)

    return call
