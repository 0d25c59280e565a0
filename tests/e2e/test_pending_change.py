"""Update, then resync: a change accepted while the proxy's stream was down
survives the proxy's resync, reaches the proxy on its new stream, and the
connect that was waiting for it goes to the new address (issue 9).

Needs the sidecar to keep the change as metadata.pending_change through a
resync and to send it again on the proxy's new stream.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from tests.e2e.harness import (
    Mitmdump,
    Origin,
    OriginCA,
    RouterClient,
    SidecarProcess,
    async_wait_for,
    get,
    stub,
)
from tests.e2e.sidecar_view import get as get_record

pytestmark = pytest.mark.e2e

CONTROL_HOST = "connmeta-control.invalid"
"""probe_addon's: a request to it sets the proxy's options."""
HOLD_MS = 8_000
"""The route deadline: long enough to hold one connect through the whole
update-and-reconnect sequence."""


@pytest.fixture
def holding_proxy(tmp_path: Path, sidecar: SidecarProcess, ca: OriginCA) -> Iterator[Mitmdump]:
    dump = Mitmdump(
        tmp_path / "proxy",
        [
            "--set", f"connmeta_target={sidecar.target}",
            "--set", f"connmeta_route_deadline={HOLD_MS}",
            "--set", f"ssl_verify_upstream_trusted_ca={ca.ca_pem}",
        ],
    )  # fmt: skip
    dump.start()
    yield dump
    dump.stop()


def set_option(proxy: Mitmdump, **options: str) -> None:
    query = urllib.parse.urlencode(options)
    assert get(proxy.proxy, f"http://{CONTROL_HOST}/?{query}") == "ok"


async def test_update_accepted_while_the_stream_is_down_is_applied_after_the_resync(
    holding_proxy: Mitmdump,
    sidecar: SidecarProcess,
    origin_a: Origin,
    origin_b: Origin,
    channel: grpc.aio.Channel,
    tmp_path: Path,
) -> None:
    proxy = holding_proxy
    async with RouterClient(channel, "e2e-silent", lambda query: None) as router:
        await asyncio.sleep(0.3)  # RoutingState reaches the proxy
        started = time.monotonic()
        pending = asyncio.create_task(asyncio.to_thread(get, proxy.proxy, origin_a.url + "/p"))
        await async_wait_for(lambda: asyncio.sleep(0, router.queries), 5, "the held connect")
        server_id = router.queries[0].server.server.connection.id

        # The proxy's stream goes down (its target moves away) ...
        await asyncio.to_thread(set_option, proxy, connmeta_target=f"unix://{tmp_path}/nobody")
        await asyncio.sleep(0.3)
        # ... the change is accepted meanwhile ...
        request = cs.UpdateServerConnectionRequest(
            id=server_id, address=pb.Address(host="127.0.0.1", port=origin_b.port), actor="e2e-op"
        )
        request.update_mask.paths.append("address")
        updated = await stub(channel).UpdateServerConnection(request, timeout=5)
        assert updated.connection.metadata.pending_change.status == pb.CHANGE_STATUS_PENDING
        assert updated.connection.server.address.port == origin_a.port, "still what the proxy holds"
        # ... and the proxy reconnects and resyncs, the server still held.
        await asyncio.to_thread(set_option, proxy, connmeta_target=sidecar.target)
        body = await pending
        took = time.monotonic() - started

    assert body == "B:/p", "the held connect went to the new address"
    assert took < HOLD_MS / 1000, "applied when it arrived, not after the deadline"
    connected = [
        e for e in proxy.hooks() if e.get("id") == server_id and e["hook"] == "server_connected"
    ]
    assert connected[0]["get_state"]["address"] == ("127.0.0.1", origin_b.port)

    async def settled() -> pb.ConnectionRecord | None:
        record = await get_record(channel, server_id)
        return record if record.metadata.HasField("last_change") else None

    record = await async_wait_for(settled, 5, "the change settled in the sidecar")
    assert not record.metadata.HasField("pending_change")
    assert record.metadata.last_change.status == pb.CHANGE_STATUS_APPLIED
    assert record.metadata.last_change.actor == "e2e-op"
    assert record.server.address.port == origin_b.port
