"""``connmeta watch -o ndjson``: the committed schema is the one the protos give, and
every line of a real session (reports, an update, retention deletes, bookmarks, a
relist) validates against it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc
import jsonschema
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import field_mask_pb2

from connmeta import certs
from connmeta.export import ndjson
from connmeta.server import Config, Sidecar
from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs
from connmeta.v1 import connection_service_pb2_grpc as cs_grpc
from tests import factories, tls
from tests.factories import Reporter

ROOT = Path(__file__).resolve().parent.parent
ADDED, MODIFIED, DELETED = (f"WATCH_EVENT_TYPE_{t}" for t in ("ADDED", "MODIFIED", "DELETED"))
BOOKMARK, END = "WATCH_EVENT_TYPE_BOOKMARK", "WATCH_EVENT_TYPE_INITIAL_EVENTS_END"
Line = dict[str, Any]


def committed_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((ROOT / ndjson.SCHEMA_PATH).read_text())
    return schema


def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        committed_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def test_committed_schema_is_the_one_the_protos_generate() -> None:
    assert committed_schema() == ndjson.schema(), (
        "docs/ndjson.schema.json is stale: python -m connmeta.export.ndjson > it"
    )


def test_committed_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = committed_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_refuses_a_number_revision_an_unknown_field_and_a_missing_default() -> None:
    record = pb.ConnectionRecord(server=factories.server().server)
    record.metadata.revision = 7
    record.metadata.update_time.FromSeconds(1_700_000_000)
    good: Line = json.loads(ndjson.event_line(cs.WATCH_EVENT_TYPE_ADDED, 7, "inc", record))
    assert not list(validator().iter_errors(good))
    for broken in (
        {**good, "revision": 7},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "incarnation"},
        {**good, "type": BOOKMARK},  # a position has no connection
    ):
        assert list(validator().iter_errors(broken)), broken
    del good["connection"]["server"]["connection"]["tls_version"]  # a default, always printed
    assert list(validator().iter_errors(good))


def test_time_is_the_update_time_only_at_the_records_own_revision() -> None:
    record = pb.ConnectionRecord(server=factories.server().server)
    record.metadata.revision = 10
    record.metadata.update_time.FromSeconds(1_700_000_000)
    clock = "2030-01-01T00:00:00Z"

    def time(kind: cs.WatchEventType.ValueType, revision: int) -> str:
        line = ndjson.event_line(kind, revision, "i", record, lambda: clock)
        return str(json.loads(line)["time"])

    assert time(cs.WATCH_EVENT_TYPE_MODIFIED, 10) == "2023-11-14T22:13:20Z"
    # Retention: the event's revision is the deletion's, the record its last version.
    assert time(cs.WATCH_EVENT_TYPE_DELETED, 12) == clock


async def read_line(process: Any) -> Line:
    raw = await asyncio.wait_for(process.stdout.readline(), 20)
    assert raw, "watch ended its output"
    line: Line = json.loads(raw)
    return line


async def read_until(process: Any, done: Any, into: list[Line]) -> None:
    while not done(into):
        into.append(await read_line(process))


def conn(line: Line) -> Line:
    """The mitmproxy connection of a change line."""
    record = line["connection"]
    kind: Line = (record.get("server") or record["client"])["connection"]
    return kind


def with_certificate(snapshot: Any) -> Any:
    """Every kind of field the schema maps: bytes, timestamps, repeated messages."""
    connection = snapshot.server.connection
    connection.tls_version = pb.TLS_VERSION_TLS_V1_3
    connection.alpn = b"h2"
    connection.alpn_offers.extend([b"h2", b"http/1.1"])
    connection.cipher = "TLS_AES_128_GCM_SHA256"
    pem = (tls.certs() / "server.pem").read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    connection.certificate_list.append(certs.described(der))
    connection.timestamp_tls_setup.FromSeconds(1_700_000_001)
    return snapshot


async def test_every_line_of_a_real_session_validates_against_the_committed_schema(
    tmp_path: Path,
) -> None:
    sidecar = Sidecar(
        Config(
            listen="",
            unix_socket=str(tmp_path / "s.sock"),
            closed_retention=0.2,
            bookmark_interval=0.2,
        )
    )
    await sidecar.start()
    target = f"unix://{sidecar.unix_socket}"
    kept, idle = with_certificate(factories.server()), factories.server(state=factories.CLOSED)
    lines: list[Line] = []
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connmeta", "watch", "-o", "ndjson", "--bookmarks",
        "--since", "1", "--target", target,
        stdout=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            reporter = Reporter(channel)
            # Revision 1 is no revision of this store: the watch relists first.
            await read_until(watch, lambda got: got and got[-1]["type"] == "RELISTED", lines)
            client = factories.client()
            await reporter.report(client, kept, idle)
            await cs_grpc.ConnectionServiceStub(channel).UpdateServerConnection(
                cs.UpdateServerConnectionRequest(
                    id=idle.server.connection.id,
                    address=pb.Address(host="b.example", port=8443),
                    update_mask=field_mask_pb2.FieldMask(paths=["address"]),
                    actor="ops",
                )
            )
            client.client.connection.state = factories.CLOSED
            await reporter.report(client)  # closed: deleted after retention

            def deleted_both(got: list[Line]) -> bool:
                gone = {conn(g)["id"] for g in got if g["type"] == DELETED}
                return {client.client.connection.id, idle.server.connection.id} <= gone

            await read_until(watch, deleted_both, lines)
            await read_until(watch, lambda got: got[-1]["type"] == BOOKMARK, lines)
    finally:
        watch.kill()
        await watch.wait()
        await sidecar.stop(grace=0)

    check = validator()
    for line in lines:
        errors = [f"{e.json_path}: {e.message}" for e in check.iter_errors(line)]
        assert not errors, (line, errors)
    types = [line["type"] for line in lines]
    assert {"RELISTED", ADDED, MODIFIED, DELETED, BOOKMARK} <= set(types), types
    assert {line["incarnation"] for line in lines} == {sidecar.store.incarnation}

    changes = [line for line in lines if "connection" in line]
    # The update is in the stream as the record's pending change, its principal included.
    pending = [c["connection"]["metadata"].get("pending_change") for c in changes]
    assert any(p and p["principal"] == "unix" and p["actor"] == "ops" for p in pending)
    # Defaults are printed: an open client's error-free, certificate-less fields.
    opened = next(c for c in changes if "client" in c["connection"])
    assert conn(opened)["certificate_list"] == []
    assert conn(opened)["tls_version"] == "TLS_VERSION_UNSPECIFIED"
    assert conn(opened)["tls"] is False
    for change in changes:
        meta = change["connection"]["metadata"]
        if change["type"] in (ADDED, MODIFIED):
            assert change["time"] == meta["update_time"]
            assert change["revision"] == meta["revision"]
        else:  # retention: the deletion's revision, above the record's own
            assert int(change["revision"]) > int(meta["revision"])
            assert change["time"] > meta["update_time"]
    revisions = [int(line["revision"]) for line in lines if line["type"] != BOOKMARK]
    assert revisions == sorted(revisions)
    described = next(c for c in changes if conn(c)["id"] == kept.server.connection.id)
    (certificate,) = conn(described)["certificate_list"]
    assert certificate["not_after"].endswith("Z")
    assert certificate["is_ca"] is False
