"""ConnectionService: Get, List, Watch and UpdateServerConnection over the store.

Protobuf in, a domain call, bytes or a rich error out; no business rule here.
Reads answer with bytes the store already holds (each record version is
serialized once, when it is written) spliced into the response, so a Get, a
List page or a watch batch costs no protobuf encoding.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Final

import grpc

from connmeta import auth
from connmeta.errors import abort, status_for
from connmeta.filters import Filter
from connmeta.records import Compacted, InvalidArgument, NotFound, encode_field, encode_repeated
from connmeta.service import Context, decoder, guarded, identity
from connmeta.store import Store
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.validation import id_problem
from connmeta.watch import Evicted, WatchHub

__all__ = ["CONNECTION_SERVICE", "ConnectionServicer", "handler"]

CONNECTION_SERVICE: Final = cs.DESCRIPTOR.services_by_name["ConnectionService"].full_name
UPDATE_METHOD: Final = f"/{CONNECTION_SERVICE}/UpdateServerConnection"

DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000
MAX_PAGE_BYTES: Final = 1 << 20
"""A page stops before it would pass this (it always holds one record): a
client with the default 4 MiB receive limit reads any page."""
_MAX_TOKEN_CHARS: Final = 1024
_MAC_BYTES: Final = 16


def _view_is_basic(view: int) -> bool:
    if view not in cs.ConnectionView.values():
        raise InvalidArgument([("view", f"unknown ConnectionView value {view}")])
    return view == cs.CONNECTION_VIEW_BASIC


class PageTokens:
    """Opaque, signed page tokens: the snapshot revision, the last id returned
    and a fingerprint of the request's other fields (AIP-158: they must not
    change between pages).

    A token is signed with a key of this store, so one this server did not
    issue (forged, edited, or from before a restart) is refused instead of
    parsed: a listing never continues from somebody else's position. The key
    lives as long as the store: a process's, or the state file's with
    ``--state-dir`` (``key``), so tokens outlive a restart on the same state.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    @staticmethod
    def fingerprint(request: cs.ListConnectionsRequest) -> str:
        material = request.filter.SerializeToString(deterministic=True) + bytes([request.view])
        return hashlib.sha256(material).hexdigest()[:16]

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, revision: int, after_id: str, fingerprint: str) -> str:
        payload = f"{revision}\n{after_id}\n{fingerprint}".encode()
        return base64.urlsafe_b64encode(payload + self._mac(payload)).decode().rstrip("=")

    def decode(self, token: str, fingerprint: str) -> tuple[int, str]:
        """The (revision, after_id) of ``token``; InvalidArgument if it is not ours."""
        bad = InvalidArgument(
            [
                (
                    "page_token",
                    "not a token this sidecar issued (forged, changed, or from before it "
                    "restarted): list again without one",
                )
            ]
        )
        if len(token) > _MAX_TOKEN_CHARS or not token.isascii():
            raise bad
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), b"-_", validate=True)
        except (ValueError, binascii.Error):
            raise bad from None
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, self._mac(payload)):
            raise bad
        # One spelling per token: the same bytes re-encoded (padded, say) are
        # not a token this server issued either.
        if base64.urlsafe_b64encode(raw).decode().rstrip("=") != token:
            raise bad
        revision_text, after_id, expected = payload.decode().split("\n")
        if expected != fingerprint:
            raise InvalidArgument(
                [("page_token", "filter or view changed since the first page; list again")]
            )
        return int(revision_text), after_id


class ConnectionServicer:
    """connmeta.v1.ConnectionService over the store and the watch hub."""

    def __init__(self, store: Store, hub: WatchHub, tokens: PageTokens | None = None) -> None:
        self._store = store
        self._hub = hub
        self._tokens = tokens or PageTokens()
        # Every read names the store it answers from (ResponseHeader); encoded
        # once: the incarnation never changes for a store.
        header = cs.ResponseHeader(incarnation=store.incarnation)
        self._header = header
        self._get_header = encode_field(2, header.SerializeToString())
        self._watch_header = encode_field(2, header.SerializeToString())

    async def GetConnection(self, request: cs.GetConnectionRequest, context: Context) -> bytes:
        problem = id_problem(request.id)
        if problem:
            raise InvalidArgument([("id", problem)])
        basic = _view_is_basic(request.view)
        record = self._store.get(request.id)
        if record is None:
            raise NotFound(request.id)
        return encode_field(1, record.basic() if basic else record.data) + self._get_header

    async def ListConnections(self, request: cs.ListConnectionsRequest, context: Context) -> bytes:
        if request.page_size < 0:
            raise InvalidArgument([("page_size", f"must not be negative, got {request.page_size}")])
        limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        basic = _view_is_basic(request.view)
        flt = Filter.from_proto(request.filter)
        fingerprint = PageTokens.fingerprint(request)
        at_revision: int | None = None
        after_id = ""
        if request.page_token:
            at_revision, after_id = self._tokens.decode(request.page_token, fingerprint)
        records, revision, more = self._store.list(
            flt, after_id=after_id, limit=limit, at_revision=at_revision
        )
        chunks: list[bytes] = []
        size = 0
        for record in records:
            chunk = record.basic() if basic else record.data
            size += len(chunk) + 8  # tag and length
            if chunks and size > MAX_PAGE_BYTES:
                more = True
                break
            chunks.append(chunk)
        tail = cs.ListConnectionsResponse(revision=revision, header=self._header)
        if more and chunks:
            tail.next_page_token = self._tokens.encode(
                revision, records[len(chunks) - 1].id, fingerprint
            )
        return encode_repeated(1, chunks) + tail.SerializeToString()

    async def WatchConnections(self, request: cs.WatchConnectionsRequest, context: Context) -> None:
        store = self._store
        if request.incarnation and request.incarnation != store.incarnation:
            raise Compacted(request.start_after_revision, store.oldest_revision, ahead=True)
        watcher = self._hub.watch(
            start_after_revision=request.start_after_revision,
            send_initial_events=request.send_initial_events,
            allow_bookmarks=request.allow_bookmarks,
            flt=Filter.from_proto(request.filter),
            basic=_view_is_basic(request.view),
        )
        try:
            while True:
                # The header is appended once per shared batch, not copied
                # into a new response for each watcher.
                response = await watcher.next_response(self._watch_header)
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
        principal = auth.principal()
        record = self._store.update_server(
            request.id,
            address=request.address if request.HasField("address") else None,
            via=request.via if request.HasField("via") else None,
            mask=request.update_mask.paths,
            etag=request.etag,
            actor=request.actor or context.peer(),
            principal=principal,
        )
        auth.audit(
            principal,
            UPDATE_METHOD,
            "update accepted",
            connection_id=request.id,
            fields=",".join(request.update_mask.paths),
            actor=request.actor,
        )
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


def handler(
    store: Store, hub: WatchHub, tokens: PageTokens | None = None
) -> grpc.GenericRpcHandler:
    """ConnectionService's handlers, each behind the transport's error boundary."""
    servicer = ConnectionServicer(store, hub, tokens)
    return grpc.method_handlers_generic_handler(
        CONNECTION_SERVICE,
        {
            "GetConnection": grpc.unary_unary_rpc_method_handler(
                guarded(servicer.GetConnection),
                request_deserializer=decoder(cs.GetConnectionRequest),
                response_serializer=identity,
            ),
            "ListConnections": grpc.unary_unary_rpc_method_handler(
                guarded(servicer.ListConnections),
                request_deserializer=decoder(cs.ListConnectionsRequest),
                response_serializer=identity,
            ),
            "WatchConnections": grpc.unary_stream_rpc_method_handler(
                guarded(servicer.WatchConnections),
                request_deserializer=decoder(cs.WatchConnectionsRequest),
                response_serializer=identity,
            ),
            "UpdateServerConnection": grpc.unary_unary_rpc_method_handler(
                guarded(servicer.UpdateServerConnection),
                request_deserializer=decoder(cs.UpdateServerConnectionRequest),
                response_serializer=identity,
            ),
        },
    )
