"""Server reflection v1 and v1alpha, with the proto comments; health List."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as pb

from connmeta import reflection
from connmeta.health import HealthServicer
from connmeta.v1 import connection_service_pb2, report_service_pb2, router_service_pb2
from tests.sidecar import channel, start_sidecar, transport

__all__ = ["channel", "start_sidecar", "transport"]

GENERATED = (connection_service_pb2, report_service_pb2, router_service_pb2)
HEALTH: Any = health_pb2  # its typeshed stubs predate List's messages


async def _ask(ch: grpc.aio.Channel, service: str, request: Any) -> Any:
    call = ch.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=pb.ServerReflectionRequest.SerializeToString,
        response_deserializer=pb.ServerReflectionResponse.FromString,
    )()
    await call.write(request)
    await call.done_writing()
    response = await call.read()
    assert response is not grpc.aio.EOF
    return response


@pytest.mark.parametrize("service", reflection.SERVICE_NAMES)
async def test_both_reflection_versions_list_every_service_and_describe_with_comments(
    channel: grpc.aio.Channel, service: str
) -> None:
    listed = await _ask(channel, service, pb.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert names >= {"connmeta.v1.ConnectionService", *reflection.SERVICE_NAMES}
    # A method's name, as grpcurl asks for it: the file first, then its imports.
    method = "connmeta.v1.ConnectionService.UpdateServerConnection"
    found = await _ask(channel, service, pb.ServerReflectionRequest(file_containing_symbol=method))
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in found.file_descriptor_response.file_descriptor_proto
    ]
    assert files[0].name == "connmeta/v1/connection_service.proto"
    assert {"connmeta/v1/connection.proto", "google/protobuf/field_mask.proto"} <= {
        f.name for f in files
    }
    comments = [loc.leading_comments for loc in files[0].source_code_info.location]
    assert any("ConnectionService serves the authoritative" in c for c in comments)


async def test_unknown_symbols_and_files_are_not_found_in_the_stream(
    channel: grpc.aio.Channel,
) -> None:
    for request in (
        pb.ServerReflectionRequest(file_containing_symbol="connmeta.v1.Nope"),
        pb.ServerReflectionRequest(file_by_filename="nope.proto"),
    ):
        answer = await _ask(channel, reflection.V1, request)
        assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        assert answer.original_request == request


def test_the_v1_file_is_v1alpha_under_the_v1_package() -> None:
    files = {f.name: f for f in reflection.file_protos()}
    v1 = files["grpc/reflection/v1/reflection.proto"]
    alpha = files["grpc_reflection/v1alpha/reflection.proto"]  # grpcio-reflection names it so
    assert v1.package == "grpc.reflection.v1"
    assert [m.name for m in v1.message_type] == [m.name for m in alpha.message_type]
    for new, old in zip(v1.message_type, alpha.message_type, strict=True):
        assert [(f.name, f.number, f.type) for f in new.field] == [
            (f.name, f.number, f.type) for f in old.field
        ]
        assert all(
            not f.type_name or f.type_name.startswith(".grpc.reflection.v1.") for f in new.field
        )


def test_the_protoset_describes_exactly_what_the_generated_modules_serve() -> None:
    """A stale protoset would make reflection describe another schema."""
    default = descriptor_pool.Default()
    for file in reflection.file_protos():
        if not file.name.startswith("connmeta/"):
            continue
        assert file.source_code_info.location, f"{file.name} has no comments"
        served = _without_source_info(file)
        generated = descriptor_pb2.FileDescriptorProto()
        default.FindFileByName(file.name).CopyToProto(generated)
        assert served == _without_source_info(generated), file.name
    assert GENERATED  # imported: their files are in the default pool


def _without_source_info(
    file: descriptor_pb2.FileDescriptorProto,
) -> descriptor_pb2.FileDescriptorProto:
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(file)
    copy.ClearField("source_code_info")

    def walk(messages: Any) -> None:
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")  # protoc sets it, the pool does not
            walk(message.nested_type)

    walk(copy.message_type)
    return copy


async def test_health_list_follows_set_and_graceful_shutdown() -> None:
    health = HealthServicer()
    await health.set("connmeta.v1.ConnectionService", health_pb2.HealthCheckResponse.SERVING)
    listed = await health.List(HEALTH.HealthListRequest(), None)
    assert dict(listed.statuses) == {
        "": health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING),
        "connmeta.v1.ConnectionService": health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING
        ),
    }
    await health.enter_graceful_shutdown()
    await health.set("late", health_pb2.HealthCheckResponse.SERVING)  # ignored, as upstream
    listed = await health.List(HEALTH.HealthListRequest(), None)
    assert set(listed.statuses) == {"", "connmeta.v1.ConnectionService"}
    assert {s.status for s in listed.statuses.values()} == {
        health_pb2.HealthCheckResponse.NOT_SERVING
    }


async def test_health_list_over_the_wire(channel: grpc.aio.Channel) -> None:
    stub: Any = health_pb2_grpc.HealthStub(channel)
    listed = await stub.List(HEALTH.HealthListRequest())
    assert listed.statuses["connmeta.v1.ConnectionService"].status == (
        health_pb2.HealthCheckResponse.SERVING
    )
