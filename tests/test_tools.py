"""grpcurl and buf curl against a real ``connmeta serve``, as a user types them.

Over mTLS TCP and over the Unix socket: ``list``, ``describe`` (the proto
comments must show), every ConnectionService method, Report and Route, and
health Check/Watch/List. grpcurl gets field masks in the object form it
accepts (``{"paths": [...]}``, fullstorydev/grpcurl#393); buf curl gets the
canonical proto3 JSON of every request (masks as ``"address"``, int64 as
strings, enums by name), made by protobuf's own json_format.

Reflection v1 is what the tools use: buf curl is pinned to it
(``--reflect-protocol grpc-v1``), and the sidecar's policy denies v1alpha over
TCP, so grpcurl (which tries v1 first) could not fall back to it unseen.

grpcurl comes from .tools/bin (scripts/install-api-tools, run by ``make
test``), buf from the venv (buf-bin).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import report_service_pb2 as rs
from connmeta.v1 import router_service_pb2 as rt
from tests import factories, tls

ROOT = Path(__file__).resolve().parent.parent
GRPCURL = ROOT / ".tools" / "bin" / "grpcurl"
BUF = Path(sys.executable).parent / "buf"
PROTOSET = ROOT / "src" / "connmeta" / "v1" / "connmeta.protoset"
TIMEOUT = 20.0
HEALTH: Any = health_pb2  # its typeshed stubs predate List's messages

# Everything for everyone, except reflection v1alpha over TCP: a tool that
# works over TCP here used v1.
POLICY = {
    "name": "tools-v1-only",
    "deny_rules": [
        {
            "name": "no-v1alpha",
            "request": {"paths": ["/grpc.reflection.v1alpha.ServerReflection/*"]},
        }
    ],
    "allow_rules": [{"name": "all", "request": {"paths": ["*"]}}],
}

# The first comment lines of a service, a method and a field in the protos.
COMMENTS = (
    "// ConnectionService serves the authoritative connection records.",
    "// GetConnection returns one connection by id. Unknown id: NOT_FOUND.",
)
FIELD_COMMENT = "// update_mask names the fields to change"


@dataclass
class Sidecar:
    process: subprocess.Popen[str]
    tcp: str
    unix: str
    log: Path


def _drain(stream: Any, first: queue.Queue[str]) -> None:
    first.put(stream.readline())
    for _ in stream:  # keep the pipe empty
        pass


@pytest.fixture(scope="module")
def sidecar() -> Iterator[Sidecar]:
    for tool, fix in ((GRPCURL, "scripts/install-api-tools"), (BUF, "make .venv/.installed")):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} is missing: run {fix}", pytrace=False)
    # Short: a Unix socket path must fit in sun_path (108 bytes).
    directory = Path(tempfile.mkdtemp(prefix="cm-tools-"))
    policy = directory / "policy.json"
    policy.write_text(json.dumps(POLICY))
    log = directory / "server.log"
    certs = tls.server_config()
    argv = [sys.executable, "-m", "connmeta", "serve", "--listen", "127.0.0.1:0"]
    argv += ["--unix-socket", str(directory / "s.sock"), "--authz-policy", str(policy)]
    argv += ["--tls-cert", certs["tls_cert"], "--tls-key", certs["tls_key"]]
    argv += ["--client-ca", certs["client_ca"]]
    with log.open("w") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
    first: queue.Queue[str] = queue.Queue()
    drain = threading.Thread(target=_drain, args=(process.stdout, first), daemon=True)
    drain.start()
    try:
        line = first.get(timeout=30)
    except queue.Empty:
        line = ""
    tcp, unix = re.search(r"\btcp=(\S+)", line), re.search(r"\bunix=(\S+)", line)
    try:
        assert tcp, f"no ready line: {line!r}\n{log.read_text()}"
        assert unix, line
        yield Sidecar(process, tcp.group(1), unix.group(1), log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        drain.join(timeout=5)
        assert process.stdout is not None
        process.stdout.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["tcp", "unix"])
def via(request: pytest.FixtureRequest, sidecar: Sidecar) -> Tools:
    return Tools(sidecar, str(request.param))


class Tools:
    """grpcurl and buf curl aimed at one listener, with its credentials."""

    def __init__(self, sidecar: Sidecar, transport: str) -> None:
        self.transport = transport
        d = tls.certs()
        if transport == "tcp":
            self._grpcurl = ["-cacert", str(d / "ca.pem"), "-cert", str(d / "writer.pem")]
            self._grpcurl += ["-key", str(d / "writer.key")]
            self._address = sidecar.tcp
            self._buf = ["--cacert", str(d / "ca.pem"), "--cert", str(d / "writer.pem")]
            self._buf += ["--key", str(d / "writer.key")]
            self._url = f"https://{sidecar.tcp}"
        else:
            self._grpcurl = ["-plaintext", "-unix"]
            self._address = sidecar.unix
            self._buf = ["--unix-socket", sidecar.unix]
            self._url = "http://localhost"
        self._buf += ["--protocol", "grpc", "--reflect-protocol", "grpc-v1"]

    def grpcurl_argv(self, *args: str, data: str | None = None) -> list[str]:
        flags = [*self._grpcurl, "-max-time", str(TIMEOUT)]
        if data is not None:
            flags += ["-d", data]
        return [str(GRPCURL), *flags, self._address, *args]

    def buf_argv(self, method: str, data: str) -> list[str]:
        return [str(BUF), "curl", *self._buf, "-d", data, f"{self._url}/{method}"]

    def grpcurl(self, *args: str, data: str | None = None, ok: bool = True) -> str:
        return _run(self.grpcurl_argv(*args, data=data), ok)

    def buf(self, method: str, data: str, ok: bool = True) -> str:
        return _run(self.buf_argv(method, data), ok)


def _run(argv: list[str], ok: bool) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT + 10, check=False)
    out = proc.stdout + proc.stderr
    if ok and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}:\n{out}", pytrace=False)
    if not ok and proc.returncode == 0:
        pytest.fail(f"{' '.join(argv)} succeeded, a failure was expected:\n{out}", pytrace=False)
    return out


def _until(argv: list[str], marker: str, env: dict[str, str] | None = None) -> str:
    """Run a streaming call until ``marker`` shows in its output, then stop it."""
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    try:
        for line in process.stdout:
            lines.append(line)
            if marker in line or time.monotonic() > deadline:
                break
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    out = "".join(lines)
    assert marker in out, f"{' '.join(argv)} never printed {marker!r}:\n{out}"
    return out


def _documents(text: str) -> list[dict[str, Any]]:
    """The JSON objects a tool printed one after the other."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (start := text.find("{", at)) != -1:
        value, at = decoder.raw_decode(text, start)
        found.append(value)
    return found


def _canonical(message: Message) -> str:
    return json_format.MessageToJson(message, indent=None)


def _report(*snapshots: rs.ConnectionSnapshot) -> str:
    """A Report stream's canonical JSON: one batch, and a proxy id of its own."""
    request = rs.ReportRequest(
        sequence=1, proxy_id=f"tools-{uuid.uuid4()}", batch=rs.ReportBatch(snapshots=snapshots)
    )
    return _canonical(request)


def _ids() -> tuple[str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4())


def test_list_shows_every_service(via: Tools) -> None:
    services = set(via.grpcurl("list").split())
    assert services == {
        "connmeta.v1.ConnectionService",
        "connmeta.v1.ReportService",
        "connmeta.v1.RouterService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def test_describe_shows_the_proto_comments(via: Tools) -> None:
    service = via.grpcurl("describe", "connmeta.v1.ConnectionService")
    for comment in COMMENTS:
        assert comment in service, service
    request = via.grpcurl("describe", "connmeta.v1.UpdateServerConnectionRequest")
    assert FIELD_COMMENT in request, request
    v1 = via.grpcurl("describe", "grpc.reflection.v1.ServerReflection.ServerReflectionInfo")
    assert "stream .grpc.reflection.v1.ServerReflectionRequest" in v1


def test_the_shipped_protoset_carries_the_comments_too() -> None:
    argv = [str(GRPCURL), "-protoset", str(PROTOSET), "describe", "connmeta.v1.ConnectionService"]
    out = _run(argv, ok=True)
    for comment in COMMENTS:
        assert comment in out, out


def test_reflection_v1alpha_is_denied_over_tcp_so_the_tools_used_v1(sidecar: Sidecar) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.secure_channel(sidecar.tcp, tls.credentials()) as channel:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT)))
    error: Any = refused.value
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_grpcurl_calls_every_connection_service_method(via: Tools) -> None:
    closed, opened = _ids()
    report = _report(
        factories.server(closed, state=factories.CLOSED),
        factories.server(opened, state=factories.OPEN),
    )
    acks = _documents(via.grpcurl("connmeta.v1.ReportService/Report", data=report))
    assert any("ack" in a and not a["ack"].get("rejected") for a in acks), acks

    got = _documents(
        via.grpcurl(
            "connmeta.v1.ConnectionService/GetConnection",
            data=json.dumps({"id": closed, "view": "CONNECTION_VIEW_BASIC"}),
        )
    )[0]
    assert got["connection"]["server"]["connection"]["id"] == closed
    etag = got["connection"]["metadata"]["etag"]

    listed = _documents(
        via.grpcurl(
            "connmeta.v1.ConnectionService/ListConnections",
            data=json.dumps({"page_size": 1000, "filter": {"kind": "CONNECTION_KIND_SERVER"}}),
        )
    )[0]
    assert {closed, opened} <= {c["server"]["connection"]["id"] for c in listed["connections"]}

    watch = via.grpcurl_argv(
        "connmeta.v1.ConnectionService/WatchConnections",
        data=json.dumps({"send_initial_events": True, "filter": {"host": "origin.example"}}),
    )
    assert closed in _until(watch, "INITIAL_EVENTS_END")

    update = {
        "id": closed,
        "address": {"host": "origin-b.example", "port": 8443},
        "update_mask": {"paths": ["address"]},
        "etag": etag,
        "actor": "grpcurl",
    }
    updated = _documents(
        via.grpcurl("connmeta.v1.ConnectionService/UpdateServerConnection", data=json.dumps(update))
    )[0]
    pending = updated["connection"]["metadata"]["pendingChange"]
    assert pending["address"] == {"host": "origin-b.example", "port": 8443}

    # An error prints its ErrorInfo decoded (reflection serves
    # google/rpc/error_details.proto), with language-neutral values.
    refused = via.grpcurl(
        "connmeta.v1.ConnectionService/UpdateServerConnection",
        data=json.dumps({**update, "id": opened, "etag": ""}),
        ok=False,
    )
    assert "FailedPrecondition" in refused
    assert '"reason": "CONNECTION_OPEN"' in refused
    assert '"current": "origin.example:443"' in refused, refused


def test_buf_curl_takes_the_canonical_json_of_every_request(via: Tools) -> None:
    closed, opened = _ids()
    report = _report(
        factories.server(closed, state=factories.CLOSED),
        factories.server(opened, state=factories.OPEN),
    )
    acks = _documents(via.buf("connmeta.v1.ReportService/Report", report))
    assert any("ack" in a and not a["ack"].get("rejected") for a in acks), acks

    get = cs.GetConnectionRequest(id=closed, view=cs.CONNECTION_VIEW_BASIC)
    got = _documents(via.buf("connmeta.v1.ConnectionService/GetConnection", _canonical(get)))[0]
    etag = got["connection"]["metadata"]["etag"]

    listing = cs.ListConnectionsRequest(
        page_size=1000, filter=cs.ConnectionFilter(kind=cs.CONNECTION_KIND_SERVER)
    )
    listed = _documents(
        via.buf("connmeta.v1.ConnectionService/ListConnections", _canonical(listing))
    )[0]
    assert {closed, opened} <= {c["server"]["connection"]["id"] for c in listed["connections"]}

    # int64 as a string: the canonical form of start_after_revision.
    watch = cs.WatchConnectionsRequest(
        start_after_revision=int(listed["revision"]) - 1, allow_bookmarks=True
    )
    assert isinstance(json.loads(_canonical(watch))["startAfterRevision"], str)
    _until(via.buf_argv("connmeta.v1.ConnectionService/WatchConnections", _canonical(watch)), "{")

    update = cs.UpdateServerConnectionRequest(
        id=closed,
        address=pb.Address(host="origin-b.example", port=8443),
        update_mask=field_mask_pb2.FieldMask(paths=["address"]),
        etag=etag,
        actor="buf-curl",
    )
    body = _canonical(update)
    assert json.loads(body)["updateMask"] == "address", "the canonical form of a mask"
    updated = _documents(via.buf("connmeta.v1.ConnectionService/UpdateServerConnection", body))[0]
    assert updated["connection"]["metadata"]["pendingChange"]["address"]["port"] == 8443

    # Route: subscribe, then an answer (to no query: ignored) with a mask.
    route = [
        rt.RouteRequest(subscribe=rt.RouteSubscribe(name=f"buf-curl-{via.transport}")),
        rt.RouteRequest(
            answer=rt.RouteAnswer(query_id="none", update_mask=field_mask_pb2.FieldMask(paths=[]))
        ),
    ]
    routed = via.buf("connmeta.v1.RouterService/Route", "\n".join(map(_canonical, route)))
    assert _documents(routed)[0]["subscribed"]["active"] is True, routed


def test_grpcurl_routes_with_the_object_form_of_the_mask(via: Tools) -> None:
    answer = {"query_id": "none", "address": {"host": "b.example", "port": 443}}
    answer["update_mask"] = {"paths": ["address"]}
    data = json.dumps({"subscribe": {"name": f"grpcurl-{via.transport}"}}) + json.dumps(
        {"answer": answer}
    )
    routed = _documents(via.grpcurl("connmeta.v1.RouterService/Route", data=data))
    assert routed[0]["subscribed"]["active"] is True, routed


def test_health_check_watch_and_list(via: Tools) -> None:
    for service in ("", "connmeta.v1.ConnectionService"):
        data = json.dumps({"service": service})
        assert '"SERVING"' in via.grpcurl("grpc.health.v1.Health/Check", data=data)
        assert '"SERVING"' in via.buf("grpc.health.v1.Health/Check", data)
    watch = via.grpcurl_argv("grpc.health.v1.Health/Watch", data="{}")
    assert '"status": "SERVING"' in _until(watch, "SERVING")
    listed = _documents(via.grpcurl("grpc.health.v1.Health/List", data="{}"))[0]
    assert listed["statuses"]["connmeta.v1.ConnectionService"] == {"status": "SERVING"}
    assert _documents(via.buf("grpc.health.v1.Health/List", "{}"))[0] == listed


def test_an_unimplemented_method_leaves_no_traceback(sidecar: Sidecar) -> None:
    with grpc.insecure_channel(f"unix://{sidecar.unix}") as channel:
        for method in ("/connmeta.v1.ConnectionService/Nope", "/grpc.health.v1.Health/Nope"):
            call: Any = channel.unary_unary(method)
            with pytest.raises(grpc.RpcError) as missing:
                call(b"", timeout=TIMEOUT)
            error: Any = missing.value
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED
        # The library's servicer left List to the generated stub, which raised.
        health: Any = health_pb2_grpc.HealthStub(channel)
        assert health.List(HEALTH.HealthListRequest(), timeout=TIMEOUT).statuses
    # Everything the tests above made the sidecar do, List included, is in its log.
    time.sleep(0.2)
    log = sidecar.log.read_text()
    assert "Traceback" not in log, log


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### grpcurl and buf curl") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README.md's grpcurl section has no sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_examples_run_as_written(sidecar: Sidecar) -> None:
    closed, _ = _ids()
    Tools(sidecar, "unix").grpcurl(
        "connmeta.v1.ReportService/Report",
        data=_report(factories.server(closed, state=factories.CLOSED)),
    )
    setup, *commands = _readme_commands()
    assert setup.startswith("S="), setup
    assert all(c.split()[0] in ("grpcurl", "buf") for c in commands), commands
    env = {**os.environ, "S": sidecar.unix, "PATH": f"{GRPCURL.parent}:{BUF.parent}:"}
    env["PATH"] += os.environ.get("PATH", "")
    port = sidecar.tcp.rsplit(":", 1)[1]
    for command in commands:
        line = command.replace("<id>", closed).replace("localhost:50051", f"localhost:{port}")
        argv = ["bash", "-c", line]
        if "WatchConnections" in line:  # a stream: until the snapshot is complete
            out = _until(argv, "INITIAL_EVENTS_END", env)
        else:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=env,
                cwd=tls.certs().parent,
                timeout=TIMEOUT,
                check=False,
            )
            out = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"README: {command}\n{out}"
        assert "ERROR" not in out, f"README: {command}\n{out}"
