"""A real OpenTelemetry Collector receives one event per change, with mitmproxy's values.

The collector is built here from its own Go modules (``main.go``: the
``otelcol`` command, the OTLP receiver, the contrib file exporter) and runs
on a loopback port; the sidecar exports to it with ``--otlp-endpoint``; a
real mitmdump with the connmeta addon feeds the sidecar one HTTP and one
HTTPS request. The collector's JSON file must then hold exactly one log
record per store change (compared revision by revision with a watch), named
after the change kind, with the semantic-convention attributes holding what
mitmproxy itself had (its own view, written down by the e2e probe addon).

Go is required, as for the interop tests: CI has it, and a silently skipped
collector test proves nothing. The build is cached by Go (a cold build,
modules included, took 2 min 44 s on a busy 2-core machine; a warm one a few
seconds).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from connmeta.export._ciphers import iana_cipher
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from tests.e2e.harness import (
    Mitmdump,
    Origin,
    OriginCA,
    SidecarProcess,
    async_wait_for,
    get,
    origin,
    origin_ca,
    wait_for,
)
from tests.e2e.sidecar_view import conn_of, records, watching

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BINARY = ROOT / ".tools" / "bin" / "otelcol-connmeta"
BUILD_TIMEOUT = 900  # seconds; cold (modules downloaded) about 3 minutes on 2 cores

EVENT_NAMES: dict[int, str] = {
    cs.WATCH_EVENT_TYPE_ADDED: "connmeta.connection.added",
    cs.WATCH_EVENT_TYPE_MODIFIED: "connmeta.connection.modified",
    cs.WATCH_EVENT_TYPE_DELETED: "connmeta.connection.deleted",
}

CONFIG = """\
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{port}
exporters:
  file:
    path: {path}
    flush_interval: 100ms
  file/metrics:
    path: {metrics_path}
    flush_interval: 100ms
service:
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
  pipelines:
    logs:
      receivers: [otlp]
      exporters: [file]
    metrics:
      receivers: [otlp]
      exporters: [file/metrics]
"""


@pytest.fixture(scope="session")
def otelcol() -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.fail("the collector test needs Go on the PATH to build tests/otelcol")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    build = subprocess.run(
        [go, "build", "-o", str(BINARY), "."],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert build.returncode == 0, f"go build of tests/otelcol failed:\n{build.stderr}"
    print(f"otelcol build: {time.monotonic() - started:.1f} s")
    return BINARY


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Collector:
    """The collector process, its port and the file its exporter writes."""

    def __init__(self, binary: Path, directory: Path) -> None:
        self.port = _free_port()
        self.output = directory / "logs.json"
        self.metrics_output = directory / "metrics.json"
        config = directory / "config.yaml"
        config.write_text(
            CONFIG.format(port=self.port, path=self.output, metrics_path=self.metrics_output)
        )
        self._log = (directory / "collector.log").open("wb")
        self.proc = subprocess.Popen(
            [str(binary), "--config", str(config)], stdout=self._log, stderr=self._log
        )
        wait_for(self._listening, 30, "the collector's OTLP port")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, "the collector exited; see collector.log"
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def log_records(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(resource attributes, log record) for every record written so far."""
        if not self.output.exists():
            return []
        out: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for line in self.output.read_text().splitlines():
            if not line.strip():
                continue
            for resource_logs in json.loads(line)["resourceLogs"]:
                resource = _attributes(resource_logs["resource"].get("attributes", []))
                for scope_logs in resource_logs["scopeLogs"]:
                    out.extend((resource, r) for r in scope_logs["logRecords"])
        return out

    def metrics(self) -> dict[str, tuple[dict[str, Any], dict[str, Any], list[Point]]]:
        """name -> (resource attributes, metric, its points in the last export received)."""
        if not self.metrics_output.exists():
            return {}
        out: dict[str, tuple[dict[str, Any], dict[str, Any], list[Point]]] = {}
        for line in self.metrics_output.read_text().splitlines():
            if not line.strip():
                continue
            for resource_metrics in json.loads(line)["resourceMetrics"]:
                resource = _attributes(resource_metrics["resource"].get("attributes", []))
                for scope_metrics in resource_metrics["scopeMetrics"]:
                    for metric in scope_metrics["metrics"]:
                        data = metric.get("gauge") or metric.get("sum") or {}
                        points = [
                            (_attributes(p.get("attributes", [])), _number(p))
                            for p in data.get("dataPoints", [])
                        ]
                        out[metric["name"]] = (resource, metric, points)  # later lines win
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def _value(value: dict[str, Any]) -> Any:
    """An OTLP/JSON AnyValue as Python (int64 travels as a string in OTLP/JSON)."""
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "boolValue" in value:
        return value["boolValue"]
    if "arrayValue" in value:
        return [_value(v) for v in value["arrayValue"].get("values", [])]
    raise AssertionError(f"unexpected attribute value {value}")


Point = tuple[dict[str, Any], float]


def _number(point: dict[str, Any]) -> float:
    """An OTLP/JSON NumberDataPoint's value (int64 travels as a string)."""
    return float(point["asDouble"]) if "asDouble" in point else float(point["asInt"])


def _attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {item["key"]: _value(item["value"]) for item in items}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> OriginCA:
    return origin_ca(tmp_path_factory.mktemp("originca"))


@pytest.fixture(scope="module")
def origin_plain() -> Iterator[Origin]:
    with origin("A") as o:
        yield o


@pytest.fixture(scope="module")
def origin_tls(ca: OriginCA) -> Iterator[Origin]:
    with origin("S", ca.context) as o:
        yield o


def _mitmproxy_views(proxy: Mitmdump) -> dict[str, dict[str, Any]]:
    """The last get_state() mitmproxy showed for each connection, by id."""
    return {e["id"]: e for e in proxy.hooks() if "get_state" in e}


def _ns(seconds: float) -> int:
    return round(seconds * 1_000_000_000)


async def test_collector_receives_one_event_per_change_with_mitmproxys_values(
    otelcol: Path,
    tmp_path: Path,
    ca: OriginCA,
    origin_plain: Origin,
    origin_tls: Origin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collector = Collector(otelcol, tmp_path)
    # Inherited by the sidecar: batches every 100 ms, and the standard variables.
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "300")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "connmeta-e2e")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=ci")
    sidecar = SidecarProcess(
        tmp_path / "connmeta.sock", ["--otlp-endpoint", f"http://127.0.0.1:{collector.port}"]
    )
    sidecar.start()
    proxy = Mitmdump(
        tmp_path / "proxy",
        [
            "--set", f"connmeta_target={sidecar.target}",
            "--set", f"ssl_verify_upstream_trusted_ca={ca.ca_pem}",
        ],
    )  # fmt: skip
    proxy.start()
    channel = sidecar.channel()
    try:
        async with watching(channel) as watch:
            assert await asyncio.to_thread(get, proxy.proxy, origin_plain.url + "/p") == "A:/p"
            body = await asyncio.to_thread(get, proxy.proxy, origin_tls.url + "/t", proxy.ca)
            assert body == "S:/t"

            def settled() -> bool:
                hooks = [e["hook"] for e in proxy.hooks()]
                return hooks.count("client_disconnected") == 2

            await async_wait_for(lambda: asyncio.sleep(0, settled()), 10, "both clients closed")
            views = _mitmproxy_views(proxy)

            async def caught_up() -> bool:
                held = await records(channel)
                return set(views) <= set(held) and all(
                    conn_of(held[i]).state == pb.CONNECTION_STATE_CLOSED for i in views
                )

            await async_wait_for(caught_up, 10, "the sidecar to hold every final state")
            inventory = await records(channel)
            await asyncio.sleep(0.3)  # the watch's last events
            changes = {
                record.metadata.revision: (kind, record)
                for kind, record in zip(watch.types, watch.events, strict=True)
            }

        def all_exported() -> bool:
            exported = collector.log_records()
            return set(changes) <= {
                _attributes(r["attributes"])["connmeta.revision"] for _, r in exported
            }

        await async_wait_for(lambda: asyncio.sleep(0, all_exported()), 15, "the collector")

        # The metrics, bridged from the Prometheus registry: the census of a List.
        census: dict[tuple[str, str], float] = {}
        for entry in inventory.values():
            side = "server" if entry.HasField("server") else "client"
            state = pb.ConnectionState.Name(conn_of(entry).state)
            key = (side, state.removeprefix("CONNECTION_STATE_").lower())
            census[key] = census.get(key, 0) + 1
        last_revision = max(changes)

        def metrics_exported() -> bool:
            metrics = collector.metrics()
            if "connmeta_connections" not in metrics or "connmeta_store_revision" not in metrics:
                return False
            points = metrics["connmeta_connections"][2]
            exported = {(a["kind"], a["state"]): v for a, v in points if v}
            [(_, revision)] = metrics["connmeta_store_revision"][2]
            # This test's ListConnections calls, once a refresh after them was exported.
            handled = metrics.get("grpc_server_handled", ({}, {}, []))[2]
            listed = any(
                (a["grpc_method"], a["grpc_code"]) == ("ListConnections", "OK") and v >= 1
                for a, v in handled
            )
            return exported == census and revision == last_revision and listed

        await async_wait_for(lambda: asyncio.sleep(0, metrics_exported()), 15, "the metrics")
    finally:
        await channel.close(None)
        proxy.stop()
        sidecar.stop()
        collector.stop()

    exported = collector.log_records()
    by_revision: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    for resource, record in exported:
        attrs = _attributes(record["attributes"])
        revision = attrs["connmeta.revision"]
        assert revision not in by_revision, f"revision {revision} exported twice"
        by_revision[revision] = (resource, {**record, "attrs": attrs})
    # One record per change: every revision the store made, and no other.
    assert set(by_revision) == set(changes)

    for revision, (kind, stored) in changes.items():
        resource, record = by_revision[revision]
        attrs = record["attrs"]
        conn = conn_of(stored)
        assert record["eventName"] == EVENT_NAMES[kind]
        assert attrs["connmeta.connection.id"] == conn.id
        assert attrs["connmeta.connection.kind"] == (
            "server" if stored.HasField("server") else "client"
        )
        assert resource["service.name"] == "connmeta-e2e"
        assert resource["deployment.environment.name"] == "ci"

    metrics = collector.metrics()
    resource, _, _ = metrics["connmeta_connections"]
    assert resource["service.name"] == "connmeta-e2e"
    assert "gauge" in metrics["connmeta_store_revision"][1]
    # A counter: OpenTelemetry's name (no _total), a cumulative monotonic sum.
    _, snapshots, points = metrics["connmeta_report_snapshots"]
    assert snapshots["sum"]["isMonotonic"] is True
    assert snapshots["sum"]["aggregationTemporality"] == 2  # CUMULATIVE
    assert [a for a, _ in points] == [{"proxy": points[0][0]["proxy"]}]
    assert points[0][1] >= len(views)  # at least one snapshot per connection
    assert "connmeta_report_snapshots_total" not in metrics
    assert metrics["grpc_server_handled"][1]["sum"]["isMonotonic"] is True
    assert "connmeta_route_wait_seconds" not in metrics  # histograms: /metrics only

    # The values mitmproxy had, from its own objects (the probe's get_state()).
    def last_record(id: str) -> dict[str, Any]:
        mine = [by_revision[r][1] for r in sorted(by_revision)]
        return [r for r in mine if r["attrs"]["connmeta.connection.id"] == id][-1]

    def first_with(id: str, hook: str) -> dict[str, Any]:
        return next(
            by_revision[r][1]
            for r in sorted(by_revision)
            if by_revision[r][1]["attrs"]["connmeta.connection.id"] == id
            and by_revision[r][1]["attrs"].get("connmeta.hook") == hook
        )

    servers = {i: v for i, v in views.items() if v["kind"] == "server"}
    clients = {i: v for i, v in views.items() if v["kind"] == "client"}
    assert len(servers) == 2
    assert len(clients) == 2
    tls_server = next(i for i, v in servers.items() if v["get_state"]["tls_version"])
    plain_server = next(i for i in servers if i != tls_server)

    state = servers[tls_server]["get_state"]
    attrs = last_record(tls_server)["attrs"]
    assert attrs["server.address"] == state["address"][0] == "localhost"
    assert attrs["server.port"] == state["address"][1] == origin_tls.port
    assert (attrs["network.peer.address"], attrs["network.peer.port"]) == tuple(
        state["peername"][:2]
    )
    assert (attrs["network.local.address"], attrs["network.local.port"]) == tuple(
        state["sockname"][:2]
    )
    assert attrs["network.transport"] == "tcp"
    assert attrs["network.type"] == "ipv4"
    assert attrs["tls.protocol.name"] == "tls"
    assert f"TLSv{attrs['tls.protocol.version']}" == state["tls_version"] == "TLSv1.3"
    assert attrs["tls.cipher"] == iana_cipher(state["cipher"])
    assert attrs["tls.client.server_name"] == state["sni"] == "localhost"
    # The origin offers no ALPN: mitmproxy holds b"", and no protocol is named.
    assert attrs.get("tls.next_protocol") == (state["alpn"].decode() or None)
    leaf = x509.load_pem_x509_certificate(state["certificate_list"][0])
    der = leaf.public_bytes(Encoding.DER)
    assert attrs["tls.server.hash.sha256"] == hashlib.sha256(der).hexdigest().upper()
    assert attrs["tls.server.not_after"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert attrs["connmeta.connection.state"] == "closed"
    assert attrs["connmeta.client.id"] == servers[tls_server]["client_id"]
    # Timestamps are mitmproxy's: server_connected happened at TCP setup.
    connected = first_with(tls_server, "server_connected")
    assert abs(int(connected["timeUnixNano"]) - _ns(state["timestamp_tcp_setup"])) < 1000

    plain = last_record(plain_server)["attrs"]
    plain_state = servers[plain_server]["get_state"]
    assert (plain["server.address"], plain["server.port"]) == tuple(plain_state["address"])
    assert "tls.protocol.version" not in plain

    tls_client = servers[tls_server]["client_id"]
    client_state = clients[tls_client]["get_state"]
    client_attrs = last_record(tls_client)["attrs"]
    assert (client_attrs["client.address"], client_attrs["client.port"]) == tuple(
        client_state["peername"][:2]
    )
    assert client_attrs["network.local.port"] == proxy.port
    assert f"TLSv{client_attrs['tls.protocol.version']}" == client_state["tls_version"]
    assert client_attrs["server.address"] == client_state["sni"] == "localhost"
    assert client_attrs["connmeta.client.proxy_mode"] == "regular"
    opened = first_with(tls_client, "client_connected")
    assert abs(int(opened["timeUnixNano"]) - _ns(client_state["timestamp_start"])) < 1000


def test_example_gateway_config_is_valid_for_the_collector(otelcol: Path) -> None:
    """deploy/otel-collector/config.yaml, checked by the collector's own `validate`
    (the same components and release as the image the example runs)."""
    config = ROOT / "deploy" / "otel-collector" / "config.yaml"
    result = subprocess.run(
        [str(otelcol), "validate", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
