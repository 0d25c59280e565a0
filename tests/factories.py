"""Connection snapshots as the proxy would report them, for transport tests."""

from __future__ import annotations

import uuid

import grpc

from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs
from connmeta.v1 import report_service_pb2_grpc as rs_grpc

OPEN = pb.CONNECTION_STATE_OPEN
CLOSED = pb.CONNECTION_STATE_CLOSED


def new_id() -> str:
    return str(uuid.uuid4())


def server(
    id: str | None = None,
    *,
    state: int = OPEN,
    host: str = "origin.example",
    port: int = 443,
    sni: str | None = "origin.example",
    via: tuple[int, str, int] | None = None,
    client_id: str | None = None,
    hook: int = pb.HOOK_SERVER_CONNECTED,
) -> rs.ConnectionSnapshot:
    conn = pb.Connection(
        id=id or new_id(),
        state=state,  # type: ignore[arg-type]
        transport_protocol=pb.TRANSPORT_PROTOCOL_TCP,
        tls=sni is not None,
    )
    if sni is not None:
        conn.sni = sni
    conn.timestamp_start.FromNanoseconds(1_700_000_000_000_000_000)
    if state != CLOSED:
        conn.peername.CopyFrom(pb.Address(host="192.0.2.10", port=port))
        conn.sockname.CopyFrom(pb.Address(host="192.0.2.1", port=40000))
    message = pb.Server(connection=conn, address=pb.Address(host=host, port=port))
    if via is not None:
        scheme, via_host, via_port = via
        message.via.CopyFrom(
            pb.ServerSpec(scheme=scheme, address=pb.Address(host=via_host, port=via_port))  # type: ignore[arg-type]
        )
    return rs.ConnectionSnapshot(hook=hook, client_id=client_id or new_id(), server=message)  # type: ignore[arg-type]


def client(
    id: str | None = None, *, state: int = OPEN, hook: int = pb.HOOK_CLIENT_CONNECTED
) -> rs.ConnectionSnapshot:
    conn = pb.Connection(
        id=id or new_id(),
        state=state,  # type: ignore[arg-type]
        transport_protocol=pb.TRANSPORT_PROTOCOL_TCP,
        peername=pb.Address(host="198.51.100.7", port=51234),
        sockname=pb.Address(host="127.0.0.1", port=8080),
    )
    conn.timestamp_start.FromNanoseconds(1_700_000_000_000_000_000)
    message = pb.Client(connection=conn, proxy_mode=pb.ProxyMode(full_spec="regular"))
    return rs.ConnectionSnapshot(hook=hook, client=message)  # type: ignore[arg-type]


class Reporter:
    """The proxy's side of one Report stream: send, then wait for the ack."""

    def __init__(self, channel: grpc.aio.Channel, proxy_id: str = "") -> None:
        self._call = rs_grpc.ReportServiceStub(channel).Report()
        self._sequence = 0
        self._proxy_id = proxy_id

    async def _send(self, request: rs.ReportRequest) -> rs.ReportAck:
        self._sequence += 1
        request.sequence = self._sequence
        if self._sequence == 1:
            request.proxy_id = self._proxy_id
        await self._call.write(request)
        while True:
            response = await self._call.read()
            assert isinstance(response, rs.ReportResponse), response
            # The sidecar also writes routing state and decisions here.
            if response.WhichOneof("message") == "ack":
                assert response.ack.sequence == self._sequence
                return response.ack

    async def batch(self, *snapshots: rs.ConnectionSnapshot) -> rs.ReportAck:
        """Send one batch; its ack, rejections included."""
        return await self._send(rs.ReportRequest(batch=rs.ReportBatch(snapshots=snapshots)))

    async def report(self, *snapshots: rs.ConnectionSnapshot) -> int:
        """Send one batch that must be accepted whole; the revision the store reached."""
        ack = await self.batch(*snapshots)
        assert not ack.rejected, f"snapshots refused: {ack.rejected}"
        return ack.revision

    async def resync(self, *snapshots: rs.ConnectionSnapshot) -> int:
        """A whole resync; how many connections it closed."""
        await self._send(rs.ReportRequest(resync_start=rs.ResyncStart()))
        if snapshots:
            await self.report(*snapshots)
        ack = await self._send(rs.ReportRequest(resync_end=rs.ResyncEnd()))
        return ack.closed_by_resync

    async def close(self) -> None:
        await self._call.done_writing()
        while await self._call.read() is not grpc.aio.EOF:
            pass
