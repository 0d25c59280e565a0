"""``connmeta serve --state-dir`` as a real process: killed with SIGKILL mid-ingest
and restarted on the same directory, it loses no acknowledged snapshot, its
revisions go on where they stopped, a watcher resumes with no gap and no
duplicate, and a page token from before the restart still works."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest

from connmeta.state_file import FILE_NAME
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import connection_service_pb2_grpc as cs_grpc
from tests import factories
from tests.factories import Reporter


class Serve:
    """``connmeta serve --state-dir DIR`` as a subprocess."""

    def __init__(self, directory: Path) -> None:
        self.state_dir = directory / "state"
        self.socket = directory / "connmeta.sock"
        self.process: asyncio.subprocess.Process | None = None
        self.tcp = ""

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "connmeta", "serve", "--state-dir", str(self.state_dir),
            "--listen", "127.0.0.1:0", "--unix-socket", str(self.socket),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = (await asyncio.wait_for(self.process.stdout.readline(), 30)).decode()
        if not line.startswith("connmeta "):
            assert self.process.stderr is not None
            error = await self.process.stderr.read()
            pytest.fail(f"serve did not start: {line!r} {error.decode()}")
        self.tcp = dict(p.split("=", 1) for p in line.split() if "=" in p)["tcp"]

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no checkpoint, like an OOM kill."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        self.process = None

    def channel(self) -> grpc.aio.Channel:
        # The Unix socket: this is about state, not transport; a plaintext
        # TCP caller may not report.
        return grpc.aio.insecure_channel(f"unix://{self.socket}")


@pytest.fixture
async def serve(tmp_path: Path) -> object:
    server = Serve(tmp_path)
    yield server
    if server.process is not None:
        await server.kill()


async def listed(channel: grpc.aio.Channel) -> tuple[dict[str, bytes], int, str]:
    """Every record (id -> bytes), the revision and the incarnation of one listing."""
    stub = cs_grpc.ConnectionServiceStub(channel)
    records: dict[str, bytes] = {}
    token = ""
    while True:
        page = await stub.ListConnections(
            cs.ListConnectionsRequest(page_size=1000, page_token=token), timeout=10
        )
        for record in page.connections:
            side = record.server if record.HasField("server") else record.client
            records[side.connection.id] = record.SerializeToString()
        token = page.next_page_token
        if not token:
            return records, page.revision, page.header.incarnation


def event_id(event: cs.WatchEvent) -> str:
    record = event.connection
    return (record.server if record.HasField("server") else record.client).connection.id


async def test_kill_9_mid_ingest_loses_no_acked_snapshot_and_a_resumed_watch_has_no_gap(
    serve: Serve,
) -> None:
    await serve.start()
    channel = serve.channel()
    _, start, incarnation = await listed(channel)
    seen: list[cs.WatchEvent] = []
    watch = cs_grpc.ConnectionServiceStub(channel).WatchConnections(
        cs.WatchConnectionsRequest(start_after_revision=start)
    )

    async def follow() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for response in watch:
                seen.extend(response.events)

    watcher = asyncio.create_task(follow())
    acked_open: set[str] = set()
    acked_closed: set[str] = set()
    acked_revision = start
    reporter = Reporter(channel, proxy_id="proxy-1")
    previous: list[str] = []
    enough = asyncio.Event()

    async def ingest() -> None:
        nonlocal acked_revision, previous
        # Each batch adds five clients and closes two of the previous batch's.
        while True:
            ids = [factories.new_id() for _ in range(5)]
            batch = [factories.client(id) for id in ids]
            closing = previous[:2]
            batch += [
                factories.client(id, state=factories.CLOSED, hook=pb.HOOK_CLIENT_DISCONNECTED)
                for id in closing
            ]
            acked_revision = await reporter.report(*batch)
            acked_open.update(ids)
            acked_closed.update(closing)
            previous = ids
            if len(acked_open) >= 400:
                enough.set()  # and go on: the kill lands mid-ingest

    ingesting = asyncio.create_task(ingest())
    await asyncio.wait_for(enough.wait(), 30)
    await serve.kill()
    with contextlib.suppress(grpc.aio.AioRpcError):
        await ingesting
    await watcher
    await channel.close()
    assert seen, "the watcher saw changes before the kill"
    last_seen = seen[-1].revision

    await serve.start()
    channel = serve.channel()
    try:
        records, revision, after = await listed(channel)
        assert after == incarnation, "the same store, not a new one"
        missing = (acked_open | acked_closed) - records.keys()
        assert not missing, f"{len(missing)} acknowledged snapshots lost"
        for id in acked_closed:
            record = pb.ConnectionRecord.FromString(records[id])
            assert record.client.connection.state == pb.CONNECTION_STATE_CLOSED
        # Whatever the killed process wrote beyond the last ack (a batch in
        # flight) is here too; the counter goes on from there, no clock jump.
        assert acked_revision <= revision <= acked_revision + 7
        assert last_seen <= revision

        resumed: list[cs.WatchEvent] = []
        stream = cs_grpc.ConnectionServiceStub(channel).WatchConnections(
            cs.WatchConnectionsRequest(start_after_revision=last_seen, incarnation=incarnation)
        )
        new = factories.client()
        after_restart = await Reporter(channel, proxy_id="proxy-1").report(new)
        assert after_restart == revision + 1, "the next change gets the next revision"
        async for response in stream:
            resumed.extend(response.events)
            if resumed and resumed[-1].revision >= after_restart:
                break
        stream.cancel()

        events = seen + resumed
        revisions = [e.revision for e in events]
        assert revisions == list(range(start + 1, after_restart + 1)), "no gap, no duplicate"
        # Replayed, the events give exactly what the restarted store holds.
        model: dict[str, bytes] = {}
        for event in events:
            if event.type == cs.WATCH_EVENT_TYPE_DELETED:
                model.pop(event_id(event), None)
            else:
                model[event_id(event)] = event.connection.SerializeToString()
        assert model == (await listed(channel))[0]
    finally:
        await channel.close()


async def test_a_page_token_from_before_a_restart_lists_on_from_the_same_snapshot(
    serve: Serve,
) -> None:
    await serve.start()
    async with serve.channel() as channel:
        await Reporter(channel).report(*(factories.client() for _ in range(5)))
        first = await cs_grpc.ConnectionServiceStub(channel).ListConnections(
            cs.ListConnectionsRequest(page_size=2)
        )
        everything, _, _ = await listed(channel)
    assert first.next_page_token
    await serve.kill()
    await serve.start()
    async with serve.channel() as channel:
        stub = cs_grpc.ConnectionServiceStub(channel)
        await Reporter(channel).report(factories.client())  # the snapshot is pinned
        rest = await stub.ListConnections(
            cs.ListConnectionsRequest(page_size=10, page_token=first.next_page_token)
        )
    assert rest.revision == first.revision
    ids = [r.client.connection.id for r in [*first.connections, *rest.connections]]
    assert ids == sorted(everything)


async def test_serve_refuses_a_state_file_that_is_not_its_own_and_leaves_it_alone(
    tmp_path: Path,
) -> None:
    state_file = tmp_path / "state" / FILE_NAME
    state_file.parent.mkdir()
    state_file.write_bytes(b"\x00" * 4096)
    before = state_file.read_bytes()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connmeta", "serve",
        "--listen", "127.0.0.1:0", "--unix-socket", str(tmp_path / "s.sock"),
        env={**os.environ, "CONNMETA_STATE_DIR": str(state_file.parent)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert out == b""
    (line,) = err.decode().splitlines()
    assert line == f"connmeta: {state_file} is not a connmeta state file (not an SQLite database)"
    assert state_file.read_bytes() == before
