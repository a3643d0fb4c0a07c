"""Routes come from annotations: a new annotated RPC gets its HTTP route with no gateway code.

The test defines a service that exists nowhere else (a descriptor built here, a real gRPC
server on port 0 implementing it), hands its descriptor to the unchanged gateway, and calls
the route the annotation names.
"""

from __future__ import annotations

import grpc
import httpx
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass

from audiomesh.config import load_settings
from audiomesh.gateway.app import ORCHESTRATOR, create_app
from audiomesh.gateway.routes import http_routes


def echo_service():
    """audiomesh.test.v1.EchoService.Echo, annotated GET /v1/echo/{name}:shout."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName("audiomesh.test.v1.EchoService")
    except KeyError:
        pass
    f = descriptor_pb2.FileDescriptorProto(
        name="audiomesh/test/v1/echo.proto",
        package="audiomesh.test.v1",
        syntax="proto3",
        dependency=["google/api/annotations.proto"],
    )
    req = f.message_type.add(name="EchoRequest")
    req.field.add(name="name", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING, json_name="name")
    req.field.add(name="times", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32, json_name="times")
    resp = f.message_type.add(name="EchoResponse")
    resp.field.add(name="text", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING, json_name="text")
    service = f.service.add(name="EchoService")
    method = service.method.add(
        name="Echo", input_type=".audiomesh.test.v1.EchoRequest", output_type=".audiomesh.test.v1.EchoResponse"
    )
    method.options.Extensions[annotations_pb2.http].get = "/v1/echo/{name}:shout"
    pool.Add(f)
    return pool.FindServiceByName("audiomesh.test.v1.EchoService")


async def test_new_annotated_rpc_gets_a_route(tmp_path):
    service = echo_service()
    request_class = GetMessageClass(service.methods_by_name["Echo"].input_type)
    response_class = GetMessageClass(service.methods_by_name["Echo"].output_type)

    async def echo(request, context):
        return response_class(text=(request.name.upper() + "!") * max(request.times, 1))

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                service.full_name,
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(
                        echo,
                        request_deserializer=request_class.FromString,
                        response_serializer=response_class.SerializeToString,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        settings = load_settings(store_url=f"file://{tmp_path}", orchestrator_addr=f"127.0.0.1:{port}")
        app = create_app(settings, services=(ORCHESTRATOR, service))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
            resp = await http.get("/v1/echo/hey:shout", params={"times": 2})
            assert resp.status_code == 200, resp.text
            assert resp.json() == {"text": "HEY!HEY!"}
            spec = (await http.get("/openapi.json")).json()
            assert spec["paths"]["/v1/echo/{name}:shout"]["get"]["operationId"] == "Echo"
    finally:
        await server.stop(None)


def test_route_table_covers_every_annotation():
    routes = {(r.verb, r.template): r.method.name for r in http_routes(ORCHESTRATOR)}
    assert routes[("GET", "/v1/jobs/{job_id}:watch")] == "WatchJob"
    assert routes[("POST", "/v1/jobs/{job_id}:cancel")] == "CancelJob"
    assert routes[("DELETE", "/v1/jobs/{job_id}")] == "DeleteJob"
    assert routes[("POST", "/v1/jobs/{job_id}:retry")] == "RetryJob"
    assert len(routes) == 9
