"""Every ErrorInfo the sidecar sends uses one key style and language-neutral values."""

from __future__ import annotations

import re

import grpc
from google.rpc import error_details_pb2, status_pb2

from connmeta import errors
from connmeta.store import (
    Compacted,
    ConnectionOpen,
    EtagMismatch,
    InvalidArgument,
    NotFound,
    StoreError,
)
from connmeta.watch import Evicted

LOWER_CAMEL = re.compile(r"[a-z][a-zA-Z0-9]*")


def _info(status: grpc.Status) -> error_details_pb2.ErrorInfo:
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    info = error_details_pb2.ErrorInfo()
    assert status_pb2.Status.FromString(raw).details[0].Unpack(info)
    return info


def test_every_domain_error_has_lower_camel_case_keys_and_no_python_reprs() -> None:
    cases: list[StoreError | Evicted] = [
        NotFound("c1"),
        InvalidArgument([("page_size", "negative")]),
        EtagMismatch("c1", '"1"', '"2"'),
        ConnectionOpen("c1", "address", "origin.example:443"),
        Compacted(3, 10),
        Evicted(42),
    ]
    for error in cases:
        info = _info(errors.status_for(error))
        assert info.metadata, info.reason
        for key, value in info.metadata.items():
            assert LOWER_CAMEL.fullmatch(key), (info.reason, key)
            assert not value.startswith("("), (info.reason, value)


def test_revision_and_etag_keys_are_the_documented_ones() -> None:
    assert dict(_info(errors.status_for(Compacted(3, 10))).metadata) == {
        "requestedRevision": "3",
        "oldestRevision": "10",
    }
    assert dict(_info(errors.status_for(Evicted(42))).metadata) == {"lastRevision": "42"}
    etag = _info(errors.status_for(EtagMismatch("c1", '"1"', '"2"'))).metadata
    assert (etag["expectedEtag"], etag["currentEtag"]) == ('"1"', '"2"')
