"""(d) An update while the server is OPEN is refused and changes nothing on
either side."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from tests.e2e.harness import KeepAlive, Mitmdump, Origin, async_wait_for, stub
from tests.e2e.sidecar_view import get

pytestmark = pytest.mark.e2e


async def test_update_of_an_open_server_is_refused_and_the_proxy_keeps_its_target(
    proxy: Mitmdump, origin_a: Origin, origin_b: Origin, channel: grpc.aio.Channel
) -> None:
    client = KeepAlive(proxy.port)
    try:
        assert await asyncio.to_thread(client.get, origin_a.url + "/1") == "A:/1"
        connected = [
            e
            for e in proxy.hooks()
            if e["hook"] == "server_connected"
            and e["get_state"]["address"] == ("127.0.0.1", origin_a.port)
        ]
        server_id = connected[-1]["id"]

        async def open_in_sidecar() -> pb.ConnectionRecord | None:
            try:
                record = await get(channel, server_id)
            except grpc.aio.AioRpcError as error:
                if error.code() is grpc.StatusCode.NOT_FOUND:
                    return None  # the addon's batch has not arrived yet
                raise
            return record if record.server.connection.state == pb.CONNECTION_STATE_OPEN else None

        before = await async_wait_for(open_in_sidecar, 5, "the server OPEN in the sidecar")
        request = cs.UpdateServerConnectionRequest(
            id=server_id, address=pb.Address(host="127.0.0.1", port=origin_b.port), actor="e2e-op"
        )
        request.update_mask.paths.append("address")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub(channel).UpdateServerConnection(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        after = await get(channel, server_id)
        assert after == before, "nothing changed in the sidecar"
        assert not after.metadata.HasField("last_change")
        # Nothing changed in the proxy: the same connection still goes to A.
        assert await asyncio.to_thread(client.get, origin_a.url + "/2") == "A:/2"
        client_id = connected[-1]["client_id"]
        connects = [
            e
            for e in proxy.hooks()
            if e["hook"] == "server_connect" and e["client_id"] == client_id
        ]
        assert [e["id"] for e in connects] == [server_id], "request 2 reused the connection"
    finally:
        client.close()
    states = [e for e in proxy.hooks() if e.get("id") == server_id]
    assert {e["get_state"]["address"] for e in states} == {("127.0.0.1", origin_a.port)}
