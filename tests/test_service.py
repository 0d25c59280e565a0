"""The real gRPC server, over a Unix socket and over TCP: every status with its
details, pagination, watch resume, compaction, slow watchers and resync."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from google.protobuf import field_mask_pb2

from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import connection_service_pb2_grpc as cs_grpc
from tests import factories
from tests.factories import CLOSED, OPEN, Reporter
from tests.sidecar import StartSidecar, channel, details, start_sidecar, stub, transport

__all__ = ["channel", "start_sidecar", "stub", "transport"]  # fixtures used below

ADDRESS = field_mask_pb2.FieldMask(paths=["address"])
VIA = field_mask_pb2.FieldMask(paths=["via"])


def update(
    id: str,
    *,
    host: str = "origin-b.example",
    port: int = 443,
    etag: str = "",
    mask: field_mask_pb2.FieldMask = ADDRESS,
) -> cs.UpdateServerConnectionRequest:
    return cs.UpdateServerConnectionRequest(
        id=id, address=pb.Address(host=host, port=port), update_mask=mask, etag=etag, actor="test"
    )


async def test_get_returns_what_the_proxy_reported(channel: grpc.aio.Channel) -> None:
    reporter = Reporter(channel)
    snapshot = factories.server(host="a.example", port=8443)
    revision = await reporter.report(snapshot)
    got = await cs_grpc.ConnectionServiceStub(channel).GetConnection(
        cs.GetConnectionRequest(id=snapshot.server.connection.id)
    )
    assert got.connection.server == snapshot.server
    assert got.connection.metadata.revision == revision
    assert got.connection.metadata.etag == f'"{revision}"'


async def test_get_unknown_id_is_not_found_with_error_info(
    stub: cs_grpc.ConnectionServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetConnection(cs.GetConnectionRequest(id="no-such-id"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = details(caught.value)["ErrorInfo"]
    assert info.reason == "CONNECTION_NOT_FOUND"
    assert info.metadata["id"] == "no-such-id"


async def test_update_address_on_open_server_is_refused_with_precondition_failure(
    channel: grpc.aio.Channel,
) -> None:
    snapshot = factories.server(state=OPEN)
    await Reporter(channel).report(snapshot)
    stub = cs_grpc.ConnectionServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdateServerConnection(update(snapshot.server.connection.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    found = details(caught.value)
    assert found["ErrorInfo"].reason == "CONNECTION_OPEN"
    assert found["ErrorInfo"].metadata["field"] == "address"
    assert found["ErrorInfo"].metadata["current"] == "origin.example:443", "not a Python repr"
    (violation,) = found["PreconditionFailure"].violations
    assert violation.type == "CONNECTION_STATE"
    assert violation.subject == f"connections/{snapshot.server.connection.id}"
    after = await stub.GetConnection(cs.GetConnectionRequest(id=snapshot.server.connection.id))
    assert after.connection.server.address.host == "origin.example", "nothing changed"


async def test_update_same_address_on_open_server_is_accepted(channel: grpc.aio.Channel) -> None:
    snapshot = factories.server(state=OPEN, host="same.example", port=443)
    revision = await Reporter(channel).report(snapshot)
    stub = cs_grpc.ConnectionServiceStub(channel)
    got = await stub.UpdateServerConnection(
        update(snapshot.server.connection.id, host="same.example", port=443)
    )
    assert got.connection.server.address.host == "same.example"
    assert got.connection.metadata.revision == revision, "no change, no new revision"


async def test_update_closed_server_records_a_pending_change_with_revision_and_etag(
    channel: grpc.aio.Channel,
) -> None:
    snapshot = factories.server(state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)
    revision = await Reporter(channel).report(snapshot)
    stub = cs_grpc.ConnectionServiceStub(channel)
    got = await stub.UpdateServerConnection(
        update(snapshot.server.connection.id, etag=f'"{revision}"')
    )
    record = got.connection
    assert record.server.address == snapshot.server.address, "what the proxy holds"
    assert record.metadata.revision > revision
    assert record.metadata.etag == f'"{record.metadata.revision}"'
    pending = record.metadata.pending_change
    assert (pending.actor, list(pending.fields), pending.status) == (
        "test",
        ["address"],
        pb.CHANGE_STATUS_PENDING,
    )
    assert pending.address == pb.Address(host="origin-b.example", port=443)


async def test_update_with_stale_etag_is_aborted(channel: grpc.aio.Channel) -> None:
    snapshot = factories.server(state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)
    revision = await Reporter(channel).report(snapshot)
    await Reporter(channel).report(factories.server(snapshot.server.connection.id, state=CLOSED))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cs_grpc.ConnectionServiceStub(channel).UpdateServerConnection(
            update(snapshot.server.connection.id, etag=f'"{revision}"')
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert details(caught.value)["ErrorInfo"].reason == "ETAG_MISMATCH"


@pytest.mark.parametrize(
    ("request_overrides", "field"),
    [
        ({"port": 70000}, "address.port"),
        ({"port": 0}, "address.port"),
        ({"host": ""}, "address.host"),
        ({"mask": field_mask_pb2.FieldMask(paths=["sni"])}, "update_mask"),
        ({"mask": field_mask_pb2.FieldMask()}, "update_mask"),
    ],
)
async def test_update_with_invalid_argument_names_the_field(
    channel: grpc.aio.Channel, request_overrides: dict[str, object], field: str
) -> None:
    snapshot = factories.server(state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)
    await Reporter(channel).report(snapshot)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cs_grpc.ConnectionServiceStub(channel).UpdateServerConnection(
            update(snapshot.server.connection.id, **request_overrides)  # type: ignore[arg-type]
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = details(caught.value)["BadRequest"].field_violations
    assert any(v.field.startswith(field) for v in violations), violations


async def test_update_via_with_a_scheme_mitmproxy_cannot_use_upstream_is_invalid(
    channel: grpc.aio.Channel,
) -> None:
    snapshot = factories.server(state=CLOSED, hook=pb.HOOK_SERVER_CONNECT)
    await Reporter(channel).report(snapshot)
    request = cs.UpdateServerConnectionRequest(
        id=snapshot.server.connection.id,
        via=pb.ServerSpec(scheme=pb.SCHEME_TLS, address=pb.Address(host="p.example", port=3128)),
        update_mask=VIA,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cs_grpc.ConnectionServiceStub(channel).UpdateServerConnection(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "via.scheme" in [v.field for v in details(caught.value)["BadRequest"].field_violations]


async def test_update_a_client_is_invalid(channel: grpc.aio.Channel) -> None:
    snapshot = factories.client()
    await Reporter(channel).report(snapshot)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cs_grpc.ConnectionServiceStub(channel).UpdateServerConnection(
            update(snapshot.client.connection.id)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)["BadRequest"].field_violations


async def test_list_pages_are_pinned_to_the_first_pages_revision(
    channel: grpc.aio.Channel,
) -> None:
    reporter = Reporter(channel)
    ids = sorted(s.server.connection.id for s in [factories.server() for _ in range(25)])
    revision = await reporter.report(*(factories.server(i) for i in ids))
    stub = cs_grpc.ConnectionServiceStub(channel)
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListConnections(cs.ListConnectionsRequest(page_size=7, page_token=token))
        assert page.revision == revision
        seen += [r.server.connection.id for r in page.connections]
        # Writes between pages must not show up in this listing.
        await reporter.report(factories.server(), factories.server(ids[-1], state=CLOSED))
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    final = await stub.GetConnection(cs.GetConnectionRequest(id=ids[-1]))
    assert final.connection.server.connection.state == CLOSED


async def test_list_with_negative_page_size_is_invalid(
    stub: cs_grpc.ConnectionServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListConnections(cs.ListConnectionsRequest(page_size=-1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details(caught.value)["BadRequest"].field_violations] == ["page_size"]


async def test_list_filters_by_kind_state_host_and_client(channel: grpc.aio.Channel) -> None:
    c = factories.client()
    client_id = c.client.connection.id
    mine = factories.server(host="api.example.com", client_id=client_id)
    other = factories.server(host="example.org", state=CLOSED)
    await Reporter(channel).report(c, mine, other)
    stub = cs_grpc.ConnectionServiceStub(channel)

    async def ids(flt: cs.ConnectionFilter) -> set[str]:
        page = await stub.ListConnections(cs.ListConnectionsRequest(filter=flt))
        return {r.server.connection.id or r.client.connection.id for r in page.connections}

    mine_id, other_id = mine.server.connection.id, other.server.connection.id
    assert await ids(cs.ConnectionFilter(kind=cs.CONNECTION_KIND_CLIENT)) == {client_id}
    assert await ids(cs.ConnectionFilter(states=[CLOSED])) == {other_id}
    assert await ids(cs.ConnectionFilter(host="*.example.com")) == {mine_id}
    assert await ids(cs.ConnectionFilter(client_id=client_id)) == {client_id, mine_id}


async def _collect(
    stub: cs_grpc.ConnectionServiceAsyncStub, request: cs.WatchConnectionsRequest, until: int
) -> list[cs.WatchEvent]:
    events: list[cs.WatchEvent] = []
    async for response in stub.WatchConnections(request):
        events += response.events
        if events and events[-1].revision >= until:
            return events
    return events


async def test_watch_resumed_under_concurrent_writes_has_no_gap_and_no_duplicate(
    channel: grpc.aio.Channel,
) -> None:
    reporter = Reporter(channel)
    stub = cs_grpc.ConnectionServiceStub(channel)
    start = await reporter.report(factories.server())
    ids = [factories.new_id() for _ in range(10)]
    rng = random.Random(7)

    async def writer() -> int:
        revision = start
        for _ in range(60):
            batch = [
                factories.server(rng.choice(ids), port=rng.randint(1, 65535)) for _ in range(5)
            ]
            revision = await reporter.report(*batch)
            await asyncio.sleep(0)
        return revision

    write = asyncio.create_task(writer())
    received: list[int] = []
    cursor = start
    while not write.done() or cursor < write.result():
        call = stub.WatchConnections(cs.WatchConnectionsRequest(start_after_revision=cursor))
        # Read a few responses, then hang up mid-stream and resume.
        for _ in range(rng.randint(1, 4)):
            try:
                # Bounded: the last events may all be in before the writer's
                # final ack; then nothing more comes and the loop re-checks.
                response = await asyncio.wait_for(call.read(), 0.5)
            except TimeoutError:
                break
            if response is grpc.aio.EOF:
                break
            assert isinstance(response, cs.WatchConnectionsResponse)
            received += [e.revision for e in response.events]
            cursor = received[-1] if received else cursor
            if write.done() and cursor >= write.result():
                break
        call.cancel()
    final = await write
    assert received == list(range(start + 1, final + 1))


async def test_watch_sends_initial_events_then_end_marker(channel: grpc.aio.Channel) -> None:
    snapshots = [factories.server() for _ in range(3)]
    revision = await Reporter(channel).report(*snapshots)
    stub = cs_grpc.ConnectionServiceStub(channel)
    call = stub.WatchConnections(cs.WatchConnectionsRequest(send_initial_events=True))
    events: list[cs.WatchEvent] = []
    while not events or events[-1].type != cs.WATCH_EVENT_TYPE_INITIAL_EVENTS_END:
        response = await call.read()
        assert isinstance(response, cs.WatchConnectionsResponse)
        events += response.events
    call.cancel()
    assert [e.type for e in events[:-1]] == [cs.WATCH_EVENT_TYPE_ADDED] * 3
    assert {e.connection.server.connection.id for e in events[:-1]} == {
        s.server.connection.id for s in snapshots
    }
    assert events[-1].revision == revision


async def test_watch_from_a_compacted_revision_is_out_of_range_naming_the_oldest(
    start_sidecar: StartSidecar,
) -> None:
    _, channel = await start_sidecar(history_size=10)
    reporter = Reporter(channel)
    for _ in range(30):
        await reporter.report(factories.server())
    call = cs_grpc.ConnectionServiceStub(channel).WatchConnections(
        cs.WatchConnectionsRequest(start_after_revision=1)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    info = details(caught.value)["ErrorInfo"]
    assert info.reason == "REVISION_COMPACTED"
    assert info.metadata["requestedRevision"] == "1"
    assert int(info.metadata["oldestRevision"]) > 1


async def test_slow_watcher_is_evicted_and_resumes_without_loss(
    start_sidecar: StartSidecar,
) -> None:
    sidecar, channel = await start_sidecar(watch_max_lag=1000)
    reporter = Reporter(channel)
    stub = cs_grpc.ConnectionServiceStub(channel)
    start = await reporter.report(factories.server())
    slow = stub.WatchConnections(cs.WatchConnectionsRequest(start_after_revision=start))
    total = 30_000
    fast = asyncio.create_task(
        _collect(stub, cs.WatchConnectionsRequest(start_after_revision=start), start + total)
    )
    # Both watches live before the writes; the hub counts, it has no event.
    while sidecar.hub.watcher_count < 2:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    # The slow watcher reads nothing while 30k revisions (~15 MB, far more
    # than HTTP/2 flow control buffers) land; the fast one and the store must
    # not wait for it.
    final = start
    for _ in range(total // 500):
        final = await reporter.report(*(factories.server(sni="x" * 200) for _ in range(500)))
    fast_events = await asyncio.wait_for(fast, 30)
    assert [e.revision for e in fast_events] == list(range(start + 1, final + 1))

    received: list[int] = []

    async def drain_slow() -> None:
        async for response in slow:
            received.extend(e.revision for e in response.events)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await drain_slow()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = details(caught.value)["ErrorInfo"]
    assert info.reason == "WATCHER_TOO_SLOW"
    last = int(info.metadata["lastRevision"])
    assert received == list(range(start + 1, last + 1))
    rest = await _collect(stub, cs.WatchConnectionsRequest(start_after_revision=last), final)
    assert received + [e.revision for e in rest] == list(range(start + 1, final + 1))


async def test_resync_closes_what_the_proxy_no_longer_has(channel: grpc.aio.Channel) -> None:
    kept, gone = factories.server(), factories.server()
    gone_client = factories.client()
    reporter = Reporter(channel)
    await reporter.report(kept, gone, gone_client)
    await reporter.close()
    # A new stream, as after the proxy reconnected: it still holds only `kept`.
    closed = await Reporter(channel).resync(kept)
    assert closed == 2
    stub = cs_grpc.ConnectionServiceStub(channel)
    states = {}
    for snapshot in (kept, gone):
        got = await stub.GetConnection(cs.GetConnectionRequest(id=snapshot.server.connection.id))
        states[snapshot is kept] = got.connection.server.connection.state
    assert states == {True: OPEN, False: CLOSED}
    got = await stub.GetConnection(cs.GetConnectionRequest(id=gone_client.client.connection.id))
    assert got.connection.client.connection.state == CLOSED


async def test_report_refuses_a_malformed_snapshot_alone_and_the_stream_goes_on(
    channel: grpc.aio.Channel,
) -> None:
    good, later = factories.server(), factories.server()
    bad = factories.server()
    bad.server.connection.id = ""
    reporter = Reporter(channel)
    ack = await reporter.batch(good, bad, later)
    (rejection,) = ack.rejected
    assert (rejection.index, rejection.reason) == (1, "INVALID_SNAPSHOT")
    assert rejection.violations[0].field == "batch.snapshots[1].server.connection.id"
    stub = cs_grpc.ConnectionServiceStub(channel)
    for stored in (good, later):
        got = await stub.GetConnection(cs.GetConnectionRequest(id=stored.server.connection.id))
        assert got.connection.server.connection.id == stored.server.connection.id
    await reporter.report(factories.server())  # the stream is still open


async def test_undecodable_request_bytes_are_invalid_argument_on_every_method(
    channel: grpc.aio.Channel,
) -> None:
    garbage = b"\x0a\x05ab"  # field 1 claims 5 bytes, 2 follow: no message parses it
    for method in (
        "/connmeta.v1.ConnectionService/GetConnection",
        "/connmeta.v1.ConnectionService/ListConnections",
        "/connmeta.v1.ConnectionService/UpdateServerConnection",
    ):
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(garbage, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert details(caught.value)["BadRequest"].field_violations[0].field
    watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
        "/connmeta.v1.ConnectionService/WatchConnections"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in watch(garbage, timeout=5):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for method in ("/connmeta.v1.ReportService/Report", "/connmeta.v1.RouterService/Route"):
        bidi: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(method)
        stream = bidi(timeout=5)
        await stream.write(garbage)
        # The Report stream first sends its routing state, then the error.
        responses = [await stream.read()] if "Report" in method else []
        assert all(r is not grpc.aio.EOF for r in responses)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method


async def test_two_proxies_resync_independently_and_keep_their_ids(
    channel: grpc.aio.Channel,
) -> None:
    a_client, b_client = factories.client(), factories.client()
    a, b = Reporter(channel, "proxy-a"), Reporter(channel, "proxy-b")
    await a.report(a_client)
    await b.report(b_client)
    ack = await b.batch(a_client)
    assert [r.reason for r in ack.rejected] == ["CONNECTION_OWNED_BY_OTHER_PROXY"]
    assert await a.resync() == 1
    stub = cs_grpc.ConnectionServiceStub(channel)
    got_a = await stub.GetConnection(cs.GetConnectionRequest(id=a_client.client.connection.id))
    got_b = await stub.GetConnection(cs.GetConnectionRequest(id=b_client.client.connection.id))
    assert got_a.connection.client.connection.state == CLOSED
    assert got_a.connection.metadata.proxy_id == "proxy-a"
    assert got_b.connection.client.connection.state == OPEN
    assert got_b.connection.metadata.proxy_id == "proxy-b"


@pytest.mark.parametrize("ended_by", ["write_timeout", "eviction"])
async def test_frozen_reader_is_ended_within_the_write_timeout_or_at_eviction(
    start_sidecar: StartSidecar, transport: str, ended_by: str
) -> None:
    # Either bound alone must end the watch: the other one is out of reach.
    if ended_by == "write_timeout":
        limits = {"watch_write_timeout": 0.5, "watch_max_lag": 10**6}
    else:
        limits = {"watch_write_timeout": 3600.0, "watch_max_lag": 2000}
    sidecar, channel = await start_sidecar(history_size=10**6, **limits)
    reporter = Reporter(channel)
    stub = cs_grpc.ConnectionServiceStub(channel)
    first = factories.server()
    start = await reporter.report(first)
    request = cs.WatchConnectionsRequest(start_after_revision=start)
    frozen_call = stub.WatchConnections(request)  # opened, then never read until the end
    while sidecar.hub.watcher_count < 1:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    (frozen,) = sidecar.hub.watchers
    received: list[int] = []

    async def keep_reading() -> None:
        async for response in stub.WatchConnections(request):
            received.extend(e.revision for e in response.events)

    reader = asyncio.create_task(keep_reading())
    while sidecar.hub.watcher_count < 2:  # noqa: ASYNC110
        await asyncio.sleep(0.01)

    async def write_until_the_frozen_watch_is_released() -> int:
        # The frozen reader's buffers (HTTP/2 windows, socket) fill, its write
        # blocks; nothing the client does ends the call from now on.
        final = start
        while not frozen.closed:
            final = await reporter.report(*(factories.server(sni="x" * 200) for _ in range(500)))
            await asyncio.sleep(0.02)
        return final

    # A liveness bound far above either limit, not a measurement.
    final = await asyncio.wait_for(write_until_the_frozen_watch_is_released(), 60)
    assert frozen not in sidecar.hub.watchers
    # Everyone else was served throughout, and still is.
    got = await stub.GetConnection(cs.GetConnectionRequest(id=first.server.connection.id))
    assert got.connection.server.connection.id == first.server.connection.id
    while not received or received[-1] < final:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert received == list(range(start + 1, final + 1))
    assert sidecar.hub.watcher_count == 1
    reader.cancel()

    # Reading again, the frozen client gets what was written, then the status.
    delivered: list[int] = []

    async def read_again() -> None:
        async for response in frozen_call:
            delivered.extend(e.revision for e in response.events)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_again()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = details(caught.value)["ErrorInfo"]
    assert info.reason == "WATCHER_TOO_SLOW"
    last = int(info.metadata["lastRevision"])
    assert delivered == list(range(start + 1, last + 1))
    rest = await _collect(stub, cs.WatchConnectionsRequest(start_after_revision=last), final)
    assert delivered + [e.revision for e in rest] == list(range(start + 1, final + 1))


async def test_one_change_larger_than_the_lag_budget_evicts_nobody_who_keeps_up(
    start_sidecar: StartSidecar,
) -> None:
    sidecar, channel = await start_sidecar(watch_max_lag=10)
    reporter = Reporter(channel)
    stub = cs_grpc.ConnectionServiceStub(channel)
    start = await reporter.report(factories.server())
    watches = [
        asyncio.create_task(
            _collect(stub, cs.WatchConnectionsRequest(start_after_revision=start), start + 101)
        ),
        asyncio.create_task(
            _collect(
                stub,
                cs.WatchConnectionsRequest(
                    start_after_revision=start, view=cs.CONNECTION_VIEW_BASIC
                ),
                start + 101,
            )
        ),
    ]
    while sidecar.hub.watcher_count < 2:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    # One batch ten times the lag budget: a single change, like a retention sweep.
    batch = await reporter.report(*(factories.server() for _ in range(100)))
    for watcher in sidecar.hub.watchers:  # both took it, neither was evicted
        while watcher.last_revision < batch:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert sidecar.hub.watcher_count == 2
    final = await reporter.report(factories.server())  # still watching: they get it
    for watch in watches:
        events = await asyncio.wait_for(watch, 30)
        assert [e.revision for e in events] == list(range(start + 1, final + 1))


async def test_pinned_pages_show_a_record_deleted_after_the_first_page_once(
    start_sidecar: StartSidecar,
) -> None:
    _, channel = await start_sidecar(closed_retention=0.0)
    reporter = Reporter(channel)
    stub = cs_grpc.ConnectionServiceStub(channel)
    snapshots = [factories.server() for _ in range(20)]
    await reporter.report(*snapshots)
    ids = sorted(s.server.connection.id for s in snapshots)
    first = await stub.ListConnections(cs.ListConnectionsRequest(page_size=3))
    seen = [r.server.connection.id for r in first.connections]
    victim = next(s for s in snapshots if s.server.connection.id == ids[10])
    victim.server.connection.state = CLOSED
    victim.hook = pb.HOOK_SERVER_DISCONNECTED
    await reporter.report(victim)
    listed = [ids[10]]
    while ids[10] in listed:  # the retention sweep deletes it within a second
        await asyncio.sleep(0.05)
        now = await stub.ListConnections(cs.ListConnectionsRequest(page_size=100))
        listed = [r.server.connection.id for r in now.connections]
    assert len(listed) == 19
    token = first.next_page_token
    while token:
        page = await stub.ListConnections(cs.ListConnectionsRequest(page_size=3, page_token=token))
        assert page.revision == first.revision
        seen.extend(r.server.connection.id for r in page.connections)
        token = page.next_page_token
    assert seen == ids


async def test_every_call_names_the_store_it_answers_from_errors_included(
    start_sidecar: StartSidecar,
) -> None:
    sidecar, channel = await start_sidecar()
    incarnation = sidecar.store.incarnation
    snapshot = factories.server()
    await Reporter(channel).report(snapshot)
    stub = cs_grpc.ConnectionServiceStub(channel)
    call = stub.GetConnection(cs.GetConnectionRequest(id=snapshot.server.connection.id))
    got = await call
    assert got.header.incarnation == incarnation
    assert dict(await call.initial_metadata())["connmeta-incarnation"] == incarnation
    listed = await stub.ListConnections(cs.ListConnectionsRequest())
    assert listed.header.incarnation == incarnation
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetConnection(cs.GetConnectionRequest(id="no-such-id"))
    assert dict(caught.value.initial_metadata() or ())["connmeta-incarnation"] == incarnation
    watch = stub.WatchConnections(cs.WatchConnectionsRequest(send_initial_events=True), timeout=5)
    first = await watch.read()
    assert isinstance(first, cs.WatchConnectionsResponse)
    assert first.header.incarnation == incarnation
    watch.cancel()


@pytest.mark.parametrize("why", ["incarnation", "revision ahead"])
async def test_a_watch_resumed_from_another_incarnation_is_out_of_range(
    channel: grpc.aio.Channel, why: str
) -> None:
    revision = await Reporter(channel).report(factories.server())
    request = cs.WatchConnectionsRequest(start_after_revision=revision)
    if why == "incarnation":
        request.incarnation = "another-store"
    else:
        request.start_after_revision = revision + 1_000_000
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in cs_grpc.ConnectionServiceStub(channel).WatchConnections(request, timeout=5):
            pass
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert details(caught.value)["ErrorInfo"].reason == "REVISION_COMPACTED"
