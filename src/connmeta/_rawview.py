"""A private, wire-compatible view of ReportBatch that keeps each snapshot as bytes.

Protobuf encodes a message field and a bytes field the same way (tag, length,
bytes), so a message type that declares ``ReportBatch.snapshots`` as
``repeated bytes`` parses any ReportRequest and hands over each
ConnectionSnapshot exactly as the proxy encoded it. The store reads those
bytes with ``connmeta._ingest`` (no upb attribute reads) and keeps the
client or server inside them as the record's payload, without re-serializing
a parsed message.

The view is built at import time from a descriptor, in a pool of its own, so it
needs no build step and cannot clash with ``connmeta.v1``. It declares only the
fields it hands over; every other field is skipped by the parser. It never
validates anything: the servicer parses the same request with the public
types too, which is where malformed input (bad UTF-8, wrong wire types) is
refused, exactly as before.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["RawReportRequest"]

_PACKAGE: Final = "connmeta.internal.raw"


def _build() -> Any:
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="connmeta/internal/raw.proto", package=_PACKAGE, syntax="proto3"
    )

    def message(
        name: str, *fields: tuple[str, int, int, int, str]
    ) -> descriptor_pb2.DescriptorProto:
        msg = file.message_type.add(name=name)
        for field_name, number, type_, label, type_name in fields:
            spec = msg.field.add(name=field_name, number=number, type=type_, label=label)
            if type_name:
                spec.type_name = f".{_PACKAGE}.{type_name}"
        return msg

    optional, repeated = field.LABEL_OPTIONAL, field.LABEL_REPEATED
    # Field numbers are ReportBatch's and ReportRequest's.
    message("RawBatch", ("snapshots", 1, field.TYPE_BYTES, repeated, ""))
    message("RawReportRequest", ("batch", 2, field.TYPE_MESSAGE, optional, "RawBatch"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{_PACKAGE}.RawReportRequest")
    )


RawReportRequest: Final[Any] = _build()
"""``RawReportRequest.FromString(data).batch.snapshots[i]`` is the i-th
ConnectionSnapshot as encoded bytes."""
