"""The gRPC servicers: protobuf in, a domain call, bytes or a rich error out.

No business rule lives here. Reads answer with bytes the store already holds
(each record version is serialized once, when it is written) spliced into the
response, so a Get, a List page or a watch batch costs no protobuf encoding;
the methods are therefore registered with an identity response serializer
instead of the generated ``add_*_to_server`` helpers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NamedTuple

import grpc

from connmeta._rawview import RawReportRequest
from connmeta.errors import abort, status_for
from connmeta.store import (
    Compacted,
    EncodedSnapshot,
    Filter,
    InvalidArgument,
    NotFound,
    Store,
    StoreError,
    encode_field,
    encode_repeated,
)
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import report_service_pb2 as rs
from connmeta.watch import Evicted, WatchHub

CONNECTION_SERVICE = cs.DESCRIPTOR.services_by_name["ConnectionService"].full_name
REPORT_SERVICE = rs.DESCRIPTOR.services_by_name["ReportService"].full_name
SERVICE_NAMES = (CONNECTION_SERVICE, REPORT_SERVICE)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

Context = grpc.aio.ServicerContext[Any, Any]


def _view_is_basic(view: int) -> bool:
    if view not in cs.ConnectionView.values():
        raise InvalidArgument([("view", f"unknown ConnectionView value {view}")])
    return view == cs.CONNECTION_VIEW_BASIC


class _PageToken:
    """Opaque to clients: the snapshot revision, the last id returned and a
    fingerprint of the request's other fields (AIP-158: they must not change
    between pages)."""

    @staticmethod
    def fingerprint(request: cs.ListConnectionsRequest) -> str:
        material = request.filter.SerializeToString(deterministic=True) + bytes([request.view])
        return hashlib.sha256(material).hexdigest()[:16]

    @staticmethod
    def encode(revision: int, after_id: str, fingerprint: str) -> str:
        raw = f"{revision}\n{after_id}\n{fingerprint}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def decode(token: str, fingerprint: str) -> tuple[int, str]:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            revision_text, after_id, expected = raw.split("\n")
            revision = int(revision_text)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise InvalidArgument(
                [("page_token", "not a token this server issued; start again without one")]
            ) from None
        if expected != fingerprint:
            raise InvalidArgument(
                [("page_token", "filter or view changed since the first page; start again")]
            )
        return revision, after_id


class ConnectionServicer:
    """connmeta.v1.ConnectionService over the store and the watch hub."""

    def __init__(self, store: Store, hub: WatchHub) -> None:
        self._store = store
        self._hub = hub

    async def GetConnection(self, request: cs.GetConnectionRequest, context: Context) -> bytes:
        try:
            if not request.id:
                raise InvalidArgument([("id", "required")])
            basic = _view_is_basic(request.view)
            record = self._store.get(request.id)
            if record is None:
                raise NotFound(request.id)
        except StoreError as error:
            await abort(context, status_for(error))
        return encode_field(1, record.basic() if basic else record.data)

    async def ListConnections(self, request: cs.ListConnectionsRequest, context: Context) -> bytes:
        try:
            if request.page_size < 0:
                raise InvalidArgument(
                    [("page_size", f"must not be negative, got {request.page_size}")]
                )
            limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            basic = _view_is_basic(request.view)
            flt = Filter.from_proto(request.filter)
            fingerprint = _PageToken.fingerprint(request)
            at_revision: int | None = None
            after_id = ""
            if request.page_token:
                at_revision, after_id = _PageToken.decode(request.page_token, fingerprint)
            records, revision, more = self._store.list(
                flt, after_id=after_id, limit=limit, at_revision=at_revision
            )
        except StoreError as error:
            await abort(context, status_for(error))
        tail = cs.ListConnectionsResponse(revision=revision)
        if more and records:
            tail.next_page_token = _PageToken.encode(revision, records[-1].id, fingerprint)
        chunks = [r.basic() for r in records] if basic else [r.data for r in records]
        return encode_repeated(1, chunks) + tail.SerializeToString()

    async def WatchConnections(self, request: cs.WatchConnectionsRequest, context: Context) -> None:
        try:
            watcher = self._hub.watch(
                start_after_revision=request.start_after_revision,
                send_initial_events=request.send_initial_events,
                allow_bookmarks=request.allow_bookmarks,
                flt=Filter.from_proto(request.filter),
                basic=_view_is_basic(request.view),
            )
        except (InvalidArgument, Compacted) as error:
            await abort(context, status_for(error))
        try:
            while True:
                response = await watcher.next_response()
                if not response:  # the hub ended this watch cleanly (shutdown)
                    return
                # context.write rather than yield: the watcher bounds how long
                # a write may stay blocked on a reader that stopped reading.
                await watcher.send(context.write, response)
        except Evicted as error:
            await _end_watch(context, status_for(error))
        finally:
            watcher.close()

    async def UpdateServerConnection(
        self, request: cs.UpdateServerConnectionRequest, context: Context
    ) -> bytes:
        try:
            record = self._store.update_server(
                request.id,
                address=request.address if request.HasField("address") else None,
                via=request.via if request.HasField("via") else None,
                mask=frozenset(request.update_mask.paths),
                etag=request.etag,
                actor=request.actor or context.peer(),
            )
        except StoreError as error:
            await abort(context, status_for(error))
        return encode_field(1, record.data)


async def _end_watch(context: Context, status: grpc.Status) -> None:
    """End a watch with ``status`` without waiting for it to reach the client.

    The status goes out behind the messages already written; to a reader that
    stopped reading, ``abort`` would wait for ever (measured over a Unix
    socket), and the handler with it. Once abort has handed the status to
    grpc, the handler returns: grpc ends the call when the client reads again
    (it gets the rest, then the status) or when the connection ends.
    """
    try:
        async with asyncio.timeout(0):
            await abort(context, status)
    except TimeoutError:
        pass


class DecodedReport(NamedTuple):
    """A ReportRequest as the Report method receives it from ``decode_report``."""

    request: rs.ReportRequest
    """The request, parsed and validated by the public types."""
    encoded: Sequence[EncodedSnapshot] | None
    """For a batch, its snapshots' client and server as the bytes they arrived in."""


def decode_report(data: bytes) -> DecodedReport:
    """The Report method's request deserializer.

    Parses the request twice, both times in C: with the public types, which
    validate it (a malformed request fails here, in the deserializer, as it
    always did), and with the raw view, which hands the store each snapshot's
    payload as bytes so that ingest never serializes a Client or Server again.
    The second parse and its size check cost about a fifth of the first.
    """
    request = rs.ReportRequest.FromString(data)
    if not request.HasField("batch"):
        return DecodedReport(request, None)
    raw = RawReportRequest.FromString(data)
    # A field sent twice is merged by the public types but kept once, as last
    # sent, by the raw view; re-encoding the view then comes out shorter than
    # the request. Such a (never canonical) request takes the old path.
    if raw.ByteSize() != len(data):
        return DecodedReport(request, None)
    return DecodedReport(request, raw.batch.snapshots)


class ReportServicer:
    """connmeta.v1.ReportService: the proxy's batches and resyncs into the store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def handle(self, item: rs.ReportRequest | DecodedReport) -> rs.ReportResponse:
        """Apply one request to the store and return its ack; raises StoreError.

        Separate from ``Report`` so that a servicer wrapping this one (routing)
        applies requests itself and ends the call from its own task.
        """
        if isinstance(item, DecodedReport):
            request, encoded = item
        else:
            request, encoded = item, None
        store = self._store
        closed = 0
        kind = request.WhichOneof("message")
        if kind == "batch":
            store.apply(request.batch.snapshots, encoded)
        elif kind == "resync_start":
            store.begin_resync()
        elif kind == "resync_end":
            closed = store.end_resync()
        else:
            raise InvalidArgument(
                [("message", "one of batch, resync_start or resync_end is required")]
            )
        return rs.ReportResponse(
            ack=rs.ReportAck(
                sequence=request.sequence, revision=store.revision, closed_by_resync=closed
            )
        )

    async def Report(
        self, requests: AsyncIterator[rs.ReportRequest | DecodedReport], context: Context
    ) -> AsyncIterator[rs.ReportResponse]:
        async for item in requests:
            try:
                response = self.handle(item)
            except StoreError as error:
                await abort(context, status_for(error))
            yield response


def identity(data: bytes) -> bytes:
    """The serializer of methods that answer with bytes the store already holds."""
    return data


def add_servicers(server: grpc.aio.Server, store: Store, hub: WatchHub) -> None:
    """Register both services on ``server``."""
    connections = ConnectionServicer(store, hub)
    reads: dict[str, tuple[Callable[..., Any], Any, Callable[..., Any]]] = {
        "GetConnection": (
            connections.GetConnection,
            cs.GetConnectionRequest,
            grpc.unary_unary_rpc_method_handler,
        ),
        "ListConnections": (
            connections.ListConnections,
            cs.ListConnectionsRequest,
            grpc.unary_unary_rpc_method_handler,
        ),
        "WatchConnections": (
            connections.WatchConnections,
            cs.WatchConnectionsRequest,
            grpc.unary_stream_rpc_method_handler,
        ),
        "UpdateServerConnection": (
            connections.UpdateServerConnection,
            cs.UpdateServerConnectionRequest,
            grpc.unary_unary_rpc_method_handler,
        ),
    }
    handlers = {
        name: make(method, request_deserializer=message.FromString, response_serializer=identity)
        for name, (method, message, make) in reads.items()
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(CONNECTION_SERVICE, handlers),)
    )
    report = ReportServicer(store)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                REPORT_SERVICE,
                {
                    "Report": grpc.stream_stream_rpc_method_handler(
                        report.Report,
                        request_deserializer=decode_report,
                        response_serializer=rs.ReportResponse.SerializeToString,
                    )
                },
            ),
        )
    )
