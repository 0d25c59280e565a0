"""Bare grpcio servers doing the same transport work as connmeta, with no store.

They set the 1.0 of every ratio the benchmarks print: what grpcio itself costs
on this machine for the same messages, in the same run.

- Report: parse each ReportRequest and acknowledge it (with watchers: also
  fan the snapshots out, see Watch).
- Get: answer a GetConnectionResponse with one fixed record (an echo).
- Watch: forward every reported snapshot to every watcher as a WatchEvent,
  each event encoded once and the batch shared, the way connmeta fans out.

Run as ``python -m bench.bare --listen 127.0.0.1:0``; prints
``bare serving tcp=HOST:PORT`` like ``connmeta serve``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import report_service_pb2 as rs

Context = grpc.aio.ServicerContext[Any, Any]


class Bare:
    def __init__(self) -> None:
        self.response = cs.GetConnectionResponse()
        self.revision = 0
        self.watchers: list[asyncio.Queue[bytes]] = []

    async def report(
        self, requests: AsyncIterator[rs.ReportRequest], context: Context
    ) -> AsyncIterator[rs.ReportResponse]:
        async for request in requests:
            events = []
            snapshots = request.batch.snapshots
            if not self.watchers:
                # Pure ingest: what grpcio costs to receive and parse a batch.
                self.revision += len(snapshots)
                if snapshots:
                    self.response = cs.GetConnectionResponse(
                        connection=pb.ConnectionRecord(server=snapshots[-1].server)
                    )
                yield rs.ReportResponse(
                    ack=rs.ReportAck(sequence=request.sequence, revision=self.revision)
                )
                continue
            for snapshot in snapshots:
                self.revision += 1
                record = pb.ConnectionRecord(server=snapshot.server)
                record.metadata.revision = self.revision
                data = record.SerializeToString()
                self.response = cs.GetConnectionResponse(connection=record)
                events.append(
                    cs.WatchEvent(
                        type=cs.WATCH_EVENT_TYPE_MODIFIED,
                        revision=self.revision,
                        connection=pb.ConnectionRecord.FromString(data),
                    )
                )
            if self.watchers and events:
                batch = cs.WatchConnectionsResponse(events=events).SerializeToString()
                for queue in self.watchers:
                    queue.put_nowait(batch)
            yield rs.ReportResponse(
                ack=rs.ReportAck(sequence=request.sequence, revision=self.revision)
            )

    async def get(
        self, request: cs.GetConnectionRequest, context: Context
    ) -> cs.GetConnectionResponse:
        return self.response

    async def watch(
        self, request: cs.WatchConnectionsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.watchers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self.watchers.remove(queue)


def _identity(data: bytes) -> bytes:
    return data


async def main(listen: str) -> None:
    bare = Bare()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "connmeta.v1.ReportService",
                {
                    "Report": grpc.stream_stream_rpc_method_handler(
                        bare.report,
                        request_deserializer=rs.ReportRequest.FromString,
                        response_serializer=rs.ReportResponse.SerializeToString,
                    )
                },
            ),
            grpc.method_handlers_generic_handler(
                "connmeta.v1.ConnectionService",
                {
                    "GetConnection": grpc.unary_unary_rpc_method_handler(
                        bare.get,
                        request_deserializer=cs.GetConnectionRequest.FromString,
                        response_serializer=cs.GetConnectionResponse.SerializeToString,
                    ),
                    "WatchConnections": grpc.unary_stream_rpc_method_handler(
                        bare.watch,
                        request_deserializer=cs.WatchConnectionsRequest.FromString,
                        response_serializer=_identity,
                    ),
                },
            ),
        )
    )
    port = server.add_insecure_port(listen)
    await server.start()
    where = listen if listen.startswith("unix:") else f"tcp={listen.rsplit(':', 1)[0]}:{port}"
    print(f"bare serving {where.replace('unix:', 'unix=', 1)}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:0")
    asyncio.run(main(parser.parse_args().listen))
