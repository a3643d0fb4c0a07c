"""Server reflection under both names: ``grpc.reflection.v1`` (what grpcurl, Postman and buf curl
ask first) and ``grpc.reflection.v1alpha`` (older clients).

grpcio-reflection ships only v1alpha. The v1 proto is the same file with another package (same
messages, same field numbers), so the v1 service is the v1alpha implementation registered under
the v1 name, and the v1 file descriptor is derived from the v1alpha one so that reflection can
describe itself under both names.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_ALPHA = ".grpc.reflection.v1alpha."
_V1 = ".grpc.reflection.v1."


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """grpc/reflection/v1/reflection.proto in ``pool``, built from the v1alpha file (once)."""
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"
    for message in proto.message_type:
        for fld in message.field:
            if fld.HasField("type_name"):
                fld.type_name = fld.type_name.replace(_ALPHA, _V1)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(_ALPHA, _V1)
            method.output_type = method.output_type.replace(_ALPHA, _V1)
    proto.options.Clear()  # v1alpha's file is marked deprecated; v1 is not
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_multiple_files = True
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    pool.AddSerializedFile(proto.SerializeToString())


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection for ``service_names`` (plus both reflection services) on ``server``."""
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    names = sorted({*service_names, *SERVICE_NAMES})
    reflection.enable_server_reflection(names, server)
    servicer = reflection.aio.ReflectionServicer(names)
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            # Wire-identical messages: v1 requests parse as v1alpha ones and vice versa.
            request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE_NAME, handlers),))
