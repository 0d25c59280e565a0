"""/metrics after real traffic: a real sidecar (gRPC on a Unix socket and on
plaintext TCP, /metrics over HTTP), a proxy's report stream, a subscribed
router, a watcher, lists and updates of every outcome; then every name the
issue lists is scraped and checked with its type and its value against what
the traffic did and what a List shows."""

from __future__ import annotations

import asyncio
import gzip
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from connmeta.server import Config, ListenError, Sidecar
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import connection_service_pb2_grpc as cs_grpc
from connmeta.v1 import report_service_pb2 as rs
from connmeta.v1 import router_service_pb2 as rt
from tests import factories
from tests.factories import CLOSED
from tests.test_router_service import Proxy, Router, waiting_server

CONNECTION_SERVICE = "connmeta.v1.ConnectionService"
STATES = {0: "closed", 1: "can_read", 2: "can_write", 3: "open"}


def scrape(address: str, accept: str = "", encoding: str = "") -> tuple[str, str]:
    """GET /metrics: (content type, body)."""
    headers = {"Accept": accept} if accept else {}
    if encoding:
        headers["Accept-Encoding"] = encoding
    request = urllib.request.Request(f"http://{address}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
        if response.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return response.headers["Content-Type"], body.decode()


async def read(
    watch: grpc.aio.UnaryStreamCall[cs.WatchConnectionsRequest, cs.WatchConnectionsResponse],
) -> cs.WatchConnectionsResponse:
    response = await asyncio.wait_for(watch.read(), 5)
    assert isinstance(response, cs.WatchConnectionsResponse)
    return response


async def families(address: str) -> dict[str, Metric]:
    _, body = await asyncio.to_thread(scrape, address)
    return {family.name: family for family in text_string_to_metric_families(body)}


def value(family: Metric, sample_name: str = "", **labels: str) -> float:
    """The one sample of ``family`` named ``sample_name`` (default: the counter's
    or gauge's own) whose labels include ``labels``."""
    wanted = sample_name or (family.name + "_total" if family.type == "counter" else family.name)
    found = [
        s.value for s in family.samples if s.name == wanted and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, f"{wanted}{labels}: {found} in {family.samples}"
    return found[0]


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[Sidecar]:
    sidecar = Sidecar(
        Config(
            listen="127.0.0.1:0",  # plaintext: reads only, so an update there is denied
            unix_socket=str(tmp_path / "s.sock"),
            metrics_listen="127.0.0.1:0",
        )
    )
    await sidecar.start()
    yield sidecar
    await sidecar.stop(grace=0)


async def update(
    stub: cs_grpc.ConnectionServiceAsyncStub, id: str, *, etag: str = "", mask: str = "address"
) -> grpc.StatusCode:
    try:
        await stub.UpdateServerConnection(
            cs.UpdateServerConnectionRequest(
                id=id,
                address=pb.Address(host="origin-b.example", port=8443),
                update_mask=field_mask_pb2.FieldMask(paths=[mask]),
                etag=etag,
            )
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_metrics_after_real_traffic_name_everything_with_its_type_and_value(
    sidecar: Sidecar,
) -> None:
    unix = grpc.aio.insecure_channel(f"unix://{sidecar.unix_socket}")
    tcp = grpc.aio.insecure_channel(sidecar.tcp_address)
    stub = cs_grpc.ConnectionServiceStub(unix)
    first = await stub.ListConnections(cs.ListConnectionsRequest())
    watch = stub.WatchConnections(cs.WatchConnectionsRequest(send_initial_events=True))
    assert [e.type for e in (await read(watch)).events] == [cs.WATCH_EVENT_TYPE_INITIAL_EVENTS_END]
    router = Router(unix)
    await router.subscribe("r1")

    # A proxy: a resync naming it, carrying its counters, then a batch.
    proxy = Proxy(unix)
    start = rs.ReportRequest(
        proxy_id="proxy-a", proxy_stats=rs.ProxyStats(snapshots_dropped=4, reconnects=2)
    )
    start.resync_start.route_deadline.FromSeconds(5)
    await proxy.send(start)
    c_open, c_closed = (
        factories.client(),
        factories.client(state=CLOSED, hook=pb.HOOK_CLIENT_DISCONNECTED),
    )
    s_open = factories.server(client_id=c_open.client.connection.id)
    s_closed = factories.server(state=CLOSED, hook=pb.HOOK_SERVER_DISCONNECTED)
    s_half = factories.server(state=pb.CONNECTION_STATE_CAN_WRITE)
    await proxy.report(c_open, c_closed, s_open, s_closed, s_half)
    await proxy.send(rs.ReportRequest(resync_end=rs.ResyncEnd()))

    # A server connect, decided by the router.
    connect = waiting_server(client_id=c_open.client.connection.id)
    await proxy.report(connect)
    query = (await router.read()).query
    answer = rt.RouteAnswer(
        query_id=query.query_id, address=pb.Address(host="origin-b.example", port=8443)
    )
    answer.update_mask.paths.append("address")
    await router.call.write(rt.RouteRequest(answer=answer))
    assert (await proxy.read()).route_decision.query_id == query.query_id
    snapshots_sent = 6

    # Updates of every outcome; the last over plaintext TCP, which may only read.
    closed_id = s_closed.server.connection.id
    outcomes = [
        await update(stub, closed_id),
        await update(stub, s_open.server.connection.id),
        await update(stub, closed_id, etag='"1"'),
        await update(stub, closed_id, mask="peername"),
        await update(stub, "no-such-connection"),
        await update(cs_grpc.ConnectionServiceStub(tcp), closed_id),
    ]
    assert outcomes == [
        grpc.StatusCode.OK,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
    ]

    listed = await stub.ListConnections(cs.ListConnectionsRequest(page_size=1000))
    assert not listed.next_page_token
    watched = 0
    seen = 0
    while seen < listed.revision:
        for event in (await read(watch)).events:
            watched += event.type != cs.WATCH_EVENT_TYPE_BOOKMARK
            seen = max(seen, event.revision)

    metrics = await families(sidecar.metrics_address)
    kinds: Counter[tuple[str, str]] = Counter()
    for record in listed.connections:
        kind = str(record.WhichOneof("kind"))
        kinds[kind, STATES[getattr(record, kind).connection.state]] += 1
    connections = metrics["connmeta_connections"]
    assert connections.type == "gauge"
    assert kinds[("server", "open")] == 1
    for kind in ("client", "server"):
        for state in STATES.values():
            assert value(connections, kind=kind, state=state) == kinds[(kind, state)], (kind, state)
    types = {
        "connmeta_store_revision": "gauge",
        "connmeta_history_events": "gauge",
        "connmeta_watchers": "gauge",
        "connmeta_watch_events_sent": "counter",
        "connmeta_watch_evictions": "counter",
        "connmeta_report_snapshots": "counter",
        "connmeta_report_resyncs": "counter",
        "connmeta_updates": "counter",
        "connmeta_route_decisions": "counter",
        "connmeta_route_wait_seconds": "histogram",
        "connmeta_proxy_snapshots_dropped": "counter",
        "connmeta_proxy_reconnects": "counter",
        "grpc_server_started": "counter",
        "grpc_server_handled": "counter",
        "grpc_server_handling_seconds": "histogram",
        "process_cpu_seconds": "counter",
        "process_resident_memory_bytes": "gauge",
        "process_open_fds": "gauge",
        "python_info": "gauge",
        "python_gc_collections": "counter",
    }
    assert {name: metrics[name].type for name in types if name in metrics} == types
    assert value(metrics["connmeta_store_revision"]) == listed.revision
    assert value(metrics["connmeta_history_events"]) == listed.revision - first.revision
    assert value(metrics["connmeta_watchers"]) == 1
    assert value(metrics["connmeta_watch_events_sent"]) == watched > 0
    for reason in ("slow_consumer", "write_timeout"):
        assert value(metrics["connmeta_watch_evictions"], reason=reason) == 0
    assert value(metrics["connmeta_report_snapshots"], proxy="proxy-a") == snapshots_sent
    assert value(metrics["connmeta_report_resyncs"]) == 1
    updates = metrics["connmeta_updates"]
    for outcome in ("accepted", "refused_open", "etag_mismatch", "invalid", "not_found", "denied"):
        assert value(updates, outcome=outcome) == 1, outcome
    assert value(updates, outcome="error") == 0
    decisions = metrics["connmeta_route_decisions"]
    assert {s.labels["outcome"]: s.value for s in decisions.samples} == {
        "changed": 1,
        "no_change": 0,
        "timed_out": 0,
        "pending_change": 0,
        "not_applied": 0,
        "unrouted": 0,
        "error": 0,
    }
    wait = metrics["connmeta_route_wait_seconds"]
    assert value(wait, "connmeta_route_wait_seconds_count") == 1
    assert value(wait, "connmeta_route_wait_seconds_bucket", le="+Inf") == 1
    assert 0 < value(wait, "connmeta_route_wait_seconds_sum") < 5
    assert value(metrics["connmeta_proxy_snapshots_dropped"], proxy="proxy-a") == 4
    assert value(metrics["connmeta_proxy_reconnects"], proxy="proxy-a") == 2

    update_call = {
        "grpc_service": CONNECTION_SERVICE,
        "grpc_method": "UpdateServerConnection",
        "grpc_type": "unary",
    }
    assert value(metrics["grpc_server_started"], **update_call) == 6
    handled = metrics["grpc_server_handled"]
    for code in (
        "OK",
        "FailedPrecondition",
        "Aborted",
        "InvalidArgument",
        "NotFound",
        "PermissionDenied",
    ):
        assert value(handled, **update_call, grpc_code=code) == 1, code
    seconds = metrics["grpc_server_handling_seconds"]
    assert value(seconds, "grpc_server_handling_seconds_count", **update_call) == 6
    assert value(seconds, "grpc_server_handling_seconds_bucket", **update_call, le="+Inf") == 6
    list_call = {"grpc_method": "ListConnections", "grpc_type": "unary"}
    assert value(handled, **list_call, grpc_code="OK") == 2
    streams = {
        ("WatchConnections", "server_stream"),
        ("Report", "bidi_stream"),
        ("Route", "bidi_stream"),
    }
    for method, kind in streams:
        assert value(metrics["grpc_server_started"], grpc_method=method, grpc_type=kind) == 1
    assert value(metrics["process_resident_memory_bytes"]) > 1 << 20
    assert value(metrics["process_cpu_seconds"]) > 0

    # No label names a connection: no id, address or SNI as a label value.
    personal = {c.server.connection.id for c in (s_open, s_closed, s_half, connect)}
    personal |= {c.client.connection.id for c in (c_open, c_closed)}
    personal |= {"origin.example", "origin-b.example", "198.51.100.7", "192.0.2.10"}
    label_values = {v for f in metrics.values() for s in f.samples for v in s.labels.values()}
    assert not label_values & personal

    # Streams that end are counted as handled, with how they ended.
    rest = await proxy.close()  # the accepted update's change, sent on to its proxy
    assert [r.route_decision.server_id for r in rest] == [closed_id]
    await router.leave()
    watch.cancel()
    await unix.close()
    await tcp.close()

    def streams_handled(found: dict[str, Metric]) -> float:
        samples = found["grpc_server_handled"].samples
        return sum(s.value for s in samples if s.labels.get("grpc_type", "unary") != "unary")

    for _ in range(100):
        final = await families(sidecar.metrics_address)
        if streams_handled(final) == 3:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the three streams were not counted as handled")
    handled = final["grpc_server_handled"]
    assert value(handled, grpc_method="Report", grpc_code="OK") == 1
    assert value(handled, grpc_method="Route", grpc_code="OK") == 1
    assert value(handled, grpc_method="WatchConnections", grpc_code="Canceled") == 1
    assert value(final["connmeta_watchers"]) == 0


async def test_openmetrics_when_the_scraper_asks_for_it_and_gzip_when_accepted(
    sidecar: Sidecar,
) -> None:
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    content_type, body = await asyncio.to_thread(scrape, sidecar.metrics_address, accept, "gzip")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("# EOF\n")
    names = {family.name: family.type for family in openmetrics_families(body)}  # type: ignore[no-untyped-call]
    assert names["connmeta_connections"] == "gauge"
    assert names["connmeta_route_wait_seconds"] == "histogram"
    assert names["grpc_server_handled"] == "counter"
    content_type, body = await asyncio.to_thread(scrape, sidecar.metrics_address)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert "_created" not in body, "no *_created series beside each counter"


async def test_only_metrics_is_served(sidecar: Sidecar) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        await asyncio.to_thread(
            urllib.request.urlopen, f"http://{sidecar.metrics_address}/", timeout=5
        )
    caught.value.close()
    assert caught.value.code == 404
    assert "metrics=" + sidecar.metrics_address in sidecar.describe()


@pytest.mark.parametrize("address", ["9464", "localhost:http", "127.0.0.1:70000"])
async def test_a_metrics_address_that_is_not_host_port_stops_serve_naming_it(
    tmp_path: Path, address: str
) -> None:
    sidecar = Sidecar(
        Config(listen="", unix_socket=str(tmp_path / "s.sock"), metrics_listen=address)
    )
    with pytest.raises(ListenError, match="--metrics-listen"):
        await sidecar.start()
    await sidecar.stop(grace=0)


async def test_with_otlp_export_on_its_drops_are_exported_by_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No metrics export to the dead endpoint: its exporter would go on retrying
    # (and logging) in a thread of this process after the test.
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    sidecar = Sidecar(
        Config(
            listen="",
            unix_socket=str(tmp_path / "s.sock"),
            metrics_listen="127.0.0.1:0",
            otlp_endpoint="http://127.0.0.1:9",  # nobody listens: nothing is sent yet
        )
    )
    await sidecar.start()
    try:
        dropped = (await families(sidecar.metrics_address))["connmeta_otlp_dropped"]
        assert dropped.type == "counter"
        assert {s.labels["reason"]: s.value for s in dropped.samples} == {
            "queue_full": 0,
            "export_failed": 0,
        }
    finally:
        await sidecar.stop(grace=0)
    assert sidecar.otlp is not None


async def test_without_otlp_export_there_is_no_otlp_metric(sidecar: Sidecar) -> None:
    assert "connmeta_otlp_dropped" not in await families(sidecar.metrics_address)
