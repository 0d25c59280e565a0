"""``connmeta watch -o ndjson``: one JSON object per event, in one documented shape.

Every line is an object with these members (``docs/ndjson.schema.json`` is the
JSON Schema, generated from the protos by :func:`schema`)::

    {"type": "WATCH_EVENT_TYPE_MODIFIED",      # a WatchEventType name, or RELISTED
     "revision": "1767225600000042",           # int64 as proto3 JSON: a string
     "time": "2026-01-01T00:00:00.123456Z",    # RFC 3339, UTC
     "incarnation": "…",                       # the store's identity (ResponseHeader)
     "connection": {…}}                        # ADDED, MODIFIED, DELETED only
     "relisted": {…}                           # RELISTED only

``connection`` is the ConnectionRecord in canonical proto3 JSON with the
proto's field names (``metadata.update_time``, as in the .proto and in
``connmeta get``), enum values by name, int64 as strings, bytes as base64, and
every field without presence printed even when it holds its default (0, "",
false, [], the enum's zero name). Fields with presence (``optional`` ones and
messages) appear only when set. Revisions are strings everywhere, the line's
own included, so a consumer never compares a number with a string.

``time`` is when the change happened where the sidecar says so: the record's
``metadata.update_time`` when the line's revision is the record's own (every
ADDED and MODIFIED the sidecar sent, and a DELETED for a record that changed
out of the filter); otherwise (a retention DELETED, whose record is its last
version; BOOKMARK; INITIAL_EVENTS_END; RELISTED and the events of a relist)
the time ``connmeta watch`` received it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from connmeta.v1 import connection_pb2 as pb
from connmeta.v1 import connection_service_pb2 as cs

__all__ = [
    "RELISTED",
    "RELIST_REASONS",
    "SCHEMA_PATH",
    "event_line",
    "record_json",
    "relisted_line",
    "schema",
]

RELISTED: Final = "RELISTED"
"""The type of the line that announces a relist: the CLI's own, not a WatchEventType."""

RELIST_REASONS: Final = ("restarted", "compacted", "interrupted")

SCHEMA_PATH: Final = "docs/ndjson.schema.json"
"""Where the schema is committed, relative to the repository root."""

Clock = Callable[[], str]


def now() -> str:
    """The current time as proto3 JSON writes a Timestamp."""
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp.ToJsonString()


def record_json(record: pb.ConnectionRecord) -> dict[str, Any]:
    """The record in canonical proto3 JSON, defaults included."""
    return json_format.MessageToDict(
        record,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def _dump(line: dict[str, Any]) -> str:
    # ensure_ascii: one line stays one line and plain ASCII whatever a
    # hostile SNI or error text holds; separators: smaller lines.
    return json.dumps(line, ensure_ascii=True, separators=(",", ":"))


def event_line(
    kind: cs.WatchEventType.ValueType,
    revision: int,
    incarnation: str,
    record: pb.ConnectionRecord | None,
    clock: Clock = now,
) -> str:
    """One watch event (or one event of a relist) as a line, without the newline."""
    own = record is not None and record.metadata.revision == revision
    time = (
        record.metadata.update_time.ToJsonString()
        if own and record is not None and record.metadata.HasField("update_time")
        else clock()
    )
    line: dict[str, Any] = {
        "type": cs.WatchEventType.Name(kind),
        "revision": str(revision),
        "time": time,
        "incarnation": incarnation,
    }
    if record is not None:
        line["connection"] = record_json(record)
    return _dump(line)


def relisted_line(
    revision: int,
    incarnation: str,
    reason: str,
    deleted: int,
    added: int,
    modified: int,
    clock: Clock = now,
) -> str:
    """The line that announces a relist; exactly deleted + added + modified events follow."""
    assert reason in RELIST_REASONS, reason
    return _dump(
        {
            "type": RELISTED,
            "revision": str(revision),
            "time": clock(),
            "incarnation": incarnation,
            "relisted": {
                "reason": reason,
                "deleted": deleted,
                "added": added,
                "modified": modified,
            },
        }
    )


# --- the JSON Schema ------------------------------------------------------------------------

_DRAFT: Final = "https://json-schema.org/draft/2020-12/schema"
_INT64: Final = {"type": "string", "pattern": "^-?[0-9]+$"}
_UINT64: Final = {"type": "string", "pattern": "^[0-9]+$"}
# proto3 JSON Timestamp: RFC 3339, always UTC ("Z"), 0, 3, 6 or 9 fractional digits.
_TIMESTAMP: Final = {
    "type": "string",
    "format": "date-time",
    "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(\.[0-9]{3}|\.[0-9]{6}|\.[0-9]{9})?Z$",
}
# Oneofs of which exactly one member is always set, and message fields the
# sidecar always sets (the contract says so): required, so a record without
# them fails the schema instead of a consumer.
_EXACTLY_ONE: Final = frozenset({"connmeta.v1.ConnectionRecord.kind"})
_ALWAYS_SET: Final = frozenset(
    {
        "connmeta.v1.ConnectionRecord.metadata",
        "connmeta.v1.Client.connection",
        "connmeta.v1.Server.connection",
    }
)

_T = FieldDescriptor
_SCALARS: Final[dict[int, dict[str, Any]]] = {
    _T.TYPE_INT64: _INT64,
    _T.TYPE_SINT64: _INT64,
    _T.TYPE_SFIXED64: _INT64,
    _T.TYPE_UINT64: _UINT64,
    _T.TYPE_FIXED64: _UINT64,
    _T.TYPE_INT32: {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
    _T.TYPE_SINT32: {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
    _T.TYPE_SFIXED32: {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
    _T.TYPE_UINT32: {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    _T.TYPE_FIXED32: {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    _T.TYPE_BOOL: {"type": "boolean"},
    _T.TYPE_STRING: {"type": "string"},
    _T.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}


def _enum(enum: EnumDescriptor) -> dict[str, Any]:
    return {"type": "string", "enum": [value.name for value in enum.values]}


def _message(descriptor: Descriptor, defs: dict[str, Any]) -> dict[str, Any]:
    """A $ref to ``descriptor``'s schema, added to ``defs`` with what it refers to."""
    if descriptor.full_name == "google.protobuf.Timestamp":
        return dict(_TIMESTAMP)
    name = descriptor.full_name
    if name not in defs:
        defs[name] = {}  # placed first: a recursive message refers to itself
        defs[name] = _object(descriptor, defs)
    return {"$ref": f"#/$defs/{name}"}


def _field(field: FieldDescriptor, defs: dict[str, Any]) -> dict[str, Any]:
    if field.type == _T.TYPE_MESSAGE:
        assert field.message_type is not None
        if field.message_type.GetOptions().map_entry:
            raise NotImplementedError(f"{field.full_name}: map fields are not in the record")
        item = _message(field.message_type, defs)
    elif field.type == _T.TYPE_ENUM:
        assert field.enum_type is not None
        item = _enum(field.enum_type)
    elif field.type in _SCALARS:
        item = dict(_SCALARS[field.type])
    else:  # float, double, group: not in the record; fail here, not in a consumer
        raise NotImplementedError(f"{field.full_name}: type {field.type}")
    if field.is_repeated:
        return {"type": "array", "items": item}
    return item


def _object(descriptor: Descriptor, defs: dict[str, Any]) -> dict[str, Any]:
    properties = {field.name: _field(field, defs) for field in descriptor.fields}
    required = [
        field.name
        for field in descriptor.fields
        if field.is_repeated or not field.has_presence or field.full_name in _ALWAYS_SET
    ]
    out: dict[str, Any] = {
        "$comment": f"proto message {descriptor.full_name}",
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    oneofs = [o for o in descriptor.oneofs if not _synthetic(o.fields)]
    constraints = []
    for oneof in oneofs:
        members: list[dict[str, Any]] = [{"required": [f.name]} for f in oneof.fields]
        if oneof.full_name not in _EXACTLY_ONE:  # or none of them
            members.append({"not": {"anyOf": list(members)}})
        constraints.append({"oneOf": members})
    if len(constraints) == 1:
        out.update(constraints[0])
    elif constraints:
        out["allOf"] = constraints
    return out


def _synthetic(fields: Any) -> bool:
    """A proto3 ``optional`` field's own oneof, not one the proto declares."""
    return len(fields) == 1 and fields[0].has_presence and fields[0].containing_oneof is not None


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one ``connmeta watch -o ndjson`` line."""
    defs: dict[str, Any] = {}
    connection = _message(pb.ConnectionRecord.DESCRIPTOR, defs)
    change_types = [
        cs.WatchEventType.Name(v)
        for v in (
            cs.WATCH_EVENT_TYPE_ADDED,
            cs.WATCH_EVENT_TYPE_MODIFIED,
            cs.WATCH_EVENT_TYPE_DELETED,
        )
    ]
    position_types = [
        cs.WatchEventType.Name(v)
        for v in (cs.WATCH_EVENT_TYPE_BOOKMARK, cs.WATCH_EVENT_TYPE_INITIAL_EVENTS_END)
    ]
    envelope = ["type", "revision", "time", "incarnation"]

    def variant(types: list[str], extra: str | None, description: str) -> dict[str, Any]:
        return {
            "description": description,
            "properties": {"type": {"enum": types}},
            "required": envelope + ([extra] if extra else []),
            "not": {"anyOf": [{"required": [m]} for m in ("connection", "relisted") if m != extra]},
        }

    return {
        "$schema": _DRAFT,
        "title": "connmeta watch -o ndjson line",
        "description": (
            "One line of `connmeta watch -o ndjson`: one event, as an object with type,"
            " revision, time and incarnation, and a connection (changes) or relisted"
            " (RELISTED). connection is the ConnectionRecord in canonical proto3 JSON with"
            " proto field names and every field without presence printed. Generated from"
            " the protos by connmeta.export.ndjson.schema(); do not edit by hand."
        ),
        "type": "object",
        "properties": {
            "type": {
                "description": "A WatchEventType name as in the proto, or RELISTED (the CLI's"
                " announcement of a relist). BOOKMARK only with --bookmarks.",
                "enum": [*change_types, *position_types, RELISTED],
            },
            "revision": {
                **_INT64,
                "description": "Store revision of the event (int64 as proto3 JSON: a string)."
                " For DELETED after retention it is the deletion's, above"
                " connection.metadata.revision; for BOOKMARK the position reached.",
            },
            "time": {
                **_TIMESTAMP,
                "description": "connection.metadata.update_time when revision is the"
                " record's own revision; else when connmeta watch received the event.",
            },
            "incarnation": {
                "type": "string",
                "description": "The store's identity (ResponseHeader.incarnation): revisions"
                " of one incarnation only are comparable.",
            },
            "connection": connection,
            "relisted": {
                "type": "object",
                "description": "The watch listed again; exactly deleted + added + modified"
                " events at this revision follow.",
                "properties": {
                    "reason": {"enum": list(RELIST_REASONS)},
                    "deleted": {"type": "integer", "minimum": 0},
                    "added": {"type": "integer", "minimum": 0},
                    "modified": {"type": "integer", "minimum": 0},
                },
                "required": ["reason", "deleted", "added", "modified"],
                "additionalProperties": False,
            },
        },
        "required": envelope,
        "additionalProperties": False,
        "oneOf": [
            variant(change_types, "connection", "A change: the record after it."),
            variant(position_types, None, "A position: no record."),
            variant([RELISTED], "relisted", "A relist's announcement."),
        ],
        "$defs": defs,
    }


def main() -> None:
    """``python -m connmeta.export.ndjson``: print the schema (``make gen`` writes it)."""
    print(json.dumps(schema(), indent=2))


if __name__ == "__main__":
    main()
