"""Reading the sidecar from the e2e tests: list, get and a background watch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from tests.e2e.harness import stub


def conn_of(record: pb.ConnectionRecord) -> pb.Connection:
    return record.server.connection if record.HasField("server") else record.client.connection


async def records(
    channel: grpc.aio.Channel, flt: cs.ConnectionFilter | None = None
) -> dict[str, pb.ConnectionRecord]:
    """Every record matching ``flt``, by id."""
    found: dict[str, pb.ConnectionRecord] = {}
    token = ""
    while True:
        page = await stub(channel).ListConnections(
            cs.ListConnectionsRequest(page_size=1000, page_token=token, filter=flt), timeout=5
        )
        for record in page.connections:
            found[conn_of(record).id] = record
        token = page.next_page_token
        if not token:
            return found


async def get(channel: grpc.aio.Channel, id: str) -> pb.ConnectionRecord:
    response = await stub(channel).GetConnection(cs.GetConnectionRequest(id=id), timeout=5)
    return response.connection


@dataclass
class Watch:
    """Every watch event from now on, collected in the background."""

    channel: grpc.aio.Channel
    events: list[pb.ConnectionRecord] = field(default_factory=list)
    types: list[int] = field(default_factory=list)

    def of(self, id: str) -> list[pb.ConnectionRecord]:
        return [r for r in self.events if conn_of(r).id == id]

    def states(self, id: str) -> list[int]:
        """The state sequence of one connection, repeats collapsed."""
        out: list[int] = []
        for record in self.of(id):
            state = conn_of(record).state
            if not out or out[-1] != state:
                out.append(state)
        return out


@contextlib.asynccontextmanager
async def watching(channel: grpc.aio.Channel) -> AsyncIterator[Watch]:
    watch = Watch(channel)
    call: Any = stub(channel).WatchConnections(cs.WatchConnectionsRequest(send_initial_events=True))
    ready = asyncio.Event()

    async def collect() -> None:
        async for response in call:
            for event in response.events:
                if event.type == cs.WATCH_EVENT_TYPE_INITIAL_EVENTS_END:
                    ready.set()
                elif event.HasField("connection") and ready.is_set():
                    watch.events.append(event.connection)
                    watch.types.append(event.type)

    task = asyncio.create_task(collect())
    await asyncio.wait_for(ready.wait(), 5)
    try:
        yield watch
    finally:
        call.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task
