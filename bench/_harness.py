"""Servers in their own processes, CPU accounting, and the record the
benchmarks send: a realistic Server snapshot without certificates."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import report_service_pb2 as rs

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Process:
    pid: int
    target: str

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@asynccontextmanager
async def server(kind: str, *args: str) -> AsyncIterator[Process]:
    """``kind`` is ``connmeta`` or ``bare``; yields once it is serving.

    Both serve on a Unix socket, as the sidecar serves its proxy in a pod
    (plaintext TCP is read-only by default since issue 11).
    """
    with tempfile.TemporaryDirectory(prefix="connmeta-bench-") as directory:
        path = os.path.join(directory, "bench.sock")
        module = (
            ["-m", "connmeta", "serve", "--listen", "", "--unix-socket", path]
            if kind == "connmeta"
            else ["-m", "bench.bare", "--listen", f"unix:{path}"]
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, *module, *args, stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        match = re.search(r"unix=(\S+)", line)
        if not match:
            process.kill()
            raise RuntimeError(f"{kind} did not start: {line!r}")
        try:
            yield Process(process.pid, f"unix:{match.group(1)}")
        finally:
            process.terminate()
            await process.wait()


def server_snapshot(index: int, *, stamp_ns: int = 0) -> rs.ConnectionSnapshot:
    """A server connection as mitmproxy reports it after server_connected."""
    conn = pb.Connection(
        id=f"{index:08x}-0000-4000-8000-{index:012x}",
        state=pb.CONNECTION_STATE_OPEN,
        transport_protocol=pb.TRANSPORT_PROTOCOL_TCP,
        peername=pb.Address(host="93.184.216.34", port=443),
        sockname=pb.Address(host="10.0.0.2", port=40000 + index % 20000),
        tls=True,
        alpn=b"h2",
        cipher="TLS_AES_256_GCM_SHA384",
        tls_version=pb.TLS_VERSION_TLS_V1_3,
        sni=f"host{index % 1000}.example.com",
    )
    conn.timestamp_start.FromNanoseconds(stamp_ns or time.time_ns())
    conn.timestamp_tls_setup.FromNanoseconds(stamp_ns or time.time_ns())
    server = pb.Server(
        connection=conn, address=pb.Address(host=f"host{index % 1000}.example.com", port=443)
    )
    server.timestamp_tcp_setup.FromNanoseconds(stamp_ns or time.time_ns())
    return rs.ConnectionSnapshot(
        hook=pb.HOOK_SERVER_CONNECTED, client_id=f"client-{index % 5000}", server=server
    )


def batch(start: int, size: int, *, sequence: int = 0, stamp_ns: int = 0) -> bytes:
    """One serialized ReportRequest with ``size`` snapshots."""
    return rs.ReportRequest(
        sequence=sequence,
        batch=rs.ReportBatch(
            snapshots=[server_snapshot(start + i, stamp_ns=stamp_ns) for i in range(size)]
        ),
    ).SerializeToString()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0
