"""gRPC server reflection, ``grpc.reflection.v1`` and ``v1alpha``, with the proto comments.

grpcio-reflection serves only ``v1alpha`` (grpc/grpc#38576) and answers from
the default descriptor pool, which the generated ``*_pb2`` modules fill
without source info: ``grpcurl describe`` would show no comments. This
servicer answers both versions (grpcurl, buf curl and Postman try ``v1``
first) from FileDescriptorProtos it holds as they are:

- connmeta's files and their imports from the shipped protoset
  (``connmeta/v1/connmeta.protoset``, built by ``scripts/gen`` with
  ``--include_source_info``), so descriptions carry the comments;
- the health and reflection files from the default pool (no comments ship
  with them);
- ``grpc/reflection/v1/reflection.proto``, derived from ``v1alpha``'s: the
  official v1 file is the same messages under another package, so both
  services are one handler with v1alpha's message classes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from importlib import resources
from typing import Any, Final

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as pb

__all__ = ["SERVICE_NAMES", "file_protos", "handlers"]

V1: Final = "grpc.reflection.v1.ServerReflection"
V1ALPHA: Final = "grpc.reflection.v1alpha.ServerReflection"
SERVICE_NAMES: Final = (V1, V1ALPHA)

_PROTOSET: Final = "connmeta.protoset"


def _proto_of(file: Any) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


def _v1_reflection() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto``, built from v1alpha's descriptor.

    The two files differ only in their name, package and options; every
    message and field number is the same, which is why v1alpha's classes
    read and write v1 calls.
    """
    proto = _proto_of(pb.DESCRIPTOR)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"

    def rename(name: str) -> str:
        return new + name[len(old) :] if name.startswith(old) else name

    def walk(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for message in messages:
            for field in message.field:
                if field.HasField("type_name"):  # assigning "" would set it on scalars
                    field.type_name = rename(field.type_name)
            walk(message.nested_type)

    walk(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type = rename(method.input_type)
            method.output_type = rename(method.output_type)
    return proto


def file_protos(extra: Iterable[Any] = ()) -> list[descriptor_pb2.FileDescriptorProto]:
    """Every file reflection serves, dependencies before their dependents.

    ``extra``: files of other services the server exposes (health), taken
    from the default pool. The protoset comes first: its copy of a file
    (with comments) wins over the pool's.
    """
    data = resources.files("connmeta.v1").joinpath(_PROTOSET).read_bytes()
    files = list(descriptor_pb2.FileDescriptorSet.FromString(data).file)
    seen = {f.name for f in files}

    def add(file: Any) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            add(dependency)
        files.append(_proto_of(file))

    for file in (*extra, pb.DESCRIPTOR):
        add(file)
    files.append(_v1_reflection())
    return files


def _symbols(file: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
    """Every fully-qualified name ``file`` defines, methods and fields included.

    protobuf's pool finds no methods by name (``Service.Method``), which
    ``grpcurl describe`` asks for; so the index is built from the protos.
    """
    prefix = f"{file.package}." if file.package else ""

    def enums(scope: str, types: Iterable[descriptor_pb2.EnumDescriptorProto]) -> Iterator[str]:
        for enum in types:
            yield scope + enum.name
            # Enum values are scoped like their enum's siblings (C++ rules).
            yield from (scope + value.name for value in enum.value)

    def messages(scope: str, types: Iterable[descriptor_pb2.DescriptorProto]) -> Iterator[str]:
        for message in types:
            name = scope + message.name
            yield name
            yield from (f"{name}.{f.name}" for f in (*message.field, *message.extension))
            yield from (f"{name}.{o.name}" for o in message.oneof_decl)
            yield from messages(f"{name}.", message.nested_type)
            yield from enums(f"{name}.", message.enum_type)

    yield from messages(prefix, file.message_type)
    yield from enums(prefix, file.enum_type)
    yield from (prefix + extension.name for extension in file.extension)
    for service in file.service:
        yield prefix + service.name
        yield from (f"{prefix}{service.name}.{m.name}" for m in service.method)


class _Index:
    """Lookups by file name and by symbol, answered with serialized files."""

    def __init__(self, files: list[descriptor_pb2.FileDescriptorProto]) -> None:
        self.pool = descriptor_pool.DescriptorPool()  # for the extension lookups
        self.serialized: dict[str, bytes] = {}
        self.dependencies: dict[str, list[str]] = {}
        self.files_by_symbol: dict[str, str] = {}
        for file in files:
            self.pool.Add(file)
            self.serialized[file.name] = file.SerializeToString()
            self.dependencies[file.name] = list(file.dependency)
            for symbol in _symbols(file):
                self.files_by_symbol.setdefault(symbol, file.name)

    def closure(self, name: str) -> list[bytes]:
        """The file first, then every file it depends on, each once."""
        order: list[str] = []
        pending = [name]
        while pending:
            current = pending.pop()
            if current not in order:
                order.append(current)
                pending.extend(reversed(self.dependencies[current]))
        return [self.serialized[n] for n in order]


class ReflectionServicer:
    """``ServerReflectionInfo`` for both versions: one answer per request."""

    def __init__(
        self, service_names: Iterable[str], files: list[descriptor_pb2.FileDescriptorProto]
    ) -> None:
        self._services = sorted(service_names)
        self._index = _Index(files)

    def answer(self, request: Any) -> Any:
        """The response to one ``ServerReflectionRequest``."""
        kind = request.WhichOneof("message_request")
        pool = self._index.pool
        try:
            if kind == "list_services":
                return pb.ServerReflectionResponse(
                    original_request=request,
                    list_services_response=pb.ListServiceResponse(
                        service=[pb.ServiceResponse(name=name) for name in self._services]
                    ),
                )
            index = self._index
            if kind == "file_by_filename":
                name = request.file_by_filename
                if name not in index.serialized:
                    raise KeyError(name)
            elif kind == "file_containing_symbol":
                name = index.files_by_symbol[request.file_containing_symbol]
            elif kind == "file_containing_extension":
                wanted = request.file_containing_extension
                message = pool.FindMessageTypeByName(wanted.containing_type)
                extension = pool.FindExtensionByNumber(message, wanted.extension_number)
                name = index.files_by_symbol[extension.full_name]
            elif kind == "all_extension_numbers_of_type":
                message = pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                return pb.ServerReflectionResponse(
                    original_request=request,
                    all_extension_numbers_response=pb.ExtensionNumberResponse(
                        base_type_name=message.full_name,
                        extension_number=sorted(e.number for e in pool.FindAllExtensions(message)),
                    ),
                )
            else:
                return _error(request, grpc.StatusCode.INVALID_ARGUMENT, "no request set")
        except KeyError:
            return _error(request, grpc.StatusCode.NOT_FOUND, f"{kind} not found")
        return pb.ServerReflectionResponse(
            original_request=request,
            file_descriptor_response=pb.FileDescriptorResponse(
                file_descriptor_proto=self._index.closure(name)
            ),
        )

    async def info(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in requests:
            yield self.answer(request)


def _error(request: Any, code: grpc.StatusCode, message: str) -> Any:
    return pb.ServerReflectionResponse(
        original_request=request,
        error_response=pb.ErrorResponse(error_code=code.value[0], error_message=message),
    )


def handlers(
    service_names: Iterable[str], extra: Iterable[Any] = ()
) -> tuple[grpc.GenericRpcHandler, ...]:
    """Reflection under both service names; ``service_names`` are what ``list`` shows."""
    servicer = ReflectionServicer((*service_names, *SERVICE_NAMES), file_protos(extra))
    method = grpc.stream_stream_rpc_method_handler(
        servicer.info,
        request_deserializer=pb.ServerReflectionRequest.FromString,
        response_serializer=pb.ServerReflectionResponse.SerializeToString,
    )
    return tuple(
        grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method})
        for name in SERVICE_NAMES
    )
