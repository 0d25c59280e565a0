"""The raw view: ingest from request bytes stores exactly what the parsed path stores."""

from __future__ import annotations

from connmeta.report_service import DecodedReport, decode_report
from connmeta.store import Store
from connmeta.v1 import report_service_pb2 as rs
from tests.snapshots import FakeClock, client, next_id, server


def _request(*snapshots: rs.ConnectionSnapshot) -> bytes:
    return rs.ReportRequest(
        sequence=1, batch=rs.ReportBatch(snapshots=snapshots)
    ).SerializeToString()


def test_records_from_request_bytes_equal_records_from_parsed_snapshots() -> None:
    c = next_id()
    snaps = [
        client(c, sni="c.example"),
        server(next_id(), client_id=c, sni="s.example", via=("http", ("p.example", 3128))),
        server(next_id(), addr=None),
    ]
    decoded = decode_report(_request(*snaps))
    assert isinstance(decoded, DecodedReport)
    assert decoded.encoded is not None
    from_bytes, from_messages = Store(clock=FakeClock()), Store(clock=FakeClock())
    from_bytes.apply(decoded.request.batch.snapshots, decoded.encoded)
    from_messages.apply(snaps)
    for snap in snaps:
        id = (snap.server if snap.HasField("server") else snap.client).connection.id
        a, b = from_bytes.get(id), from_messages.get(id)
        assert a is not None
        assert b is not None
        assert a.data == b.data
        assert (a.host, a.port, a.sni) == (b.host, b.port, b.sni)


def test_a_payload_sent_twice_is_merged_like_protobuf_does() -> None:
    first = server(next_id(), sni="first.example")
    second = rs.ConnectionSnapshot(server=first.server)
    second.server.ClearField("address")
    second.server.connection.ClearField("sni")
    # One snapshot whose server field appears twice: protobuf merges the two.
    twice = first.SerializeToString() + second.SerializeToString()
    data = (
        rs.ReportRequest(sequence=1).SerializeToString()
        + b"\x12"
        + bytes((len(twice) + 2, 0x0A, len(twice)))
        + twice
    )
    decoded = decode_report(data)
    assert isinstance(decoded, DecodedReport)
    # The snapshot arrives whole; the scan and payload() see the field twice and
    # leave it to the parsed snapshot, which merged the two.
    assert decoded.encoded is not None
    store = Store()
    store.apply(decoded.request.batch.snapshots, decoded.encoded)
    record = store.get(first.server.connection.id)
    assert record is not None
    assert record.message().server == first.server
    assert record.sni == "first.example"


def test_host_port_and_sni_are_read_from_the_record_when_first_asked() -> None:
    store = Store()
    id = next_id()
    store.apply([server(id, addr=("origin.example", 8443), sni="origin.example")])
    record = store.get(id)
    assert record is not None
    assert (record.host, record.port, record.sni) == ("origin.example", 8443, "origin.example")
