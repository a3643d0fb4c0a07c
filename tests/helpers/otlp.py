"""A real OTLP/gRPC trace collector on 127.0.0.1: the services export their spans to it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []  # (service.name, trace_id hex, span name)
        self.links: list[dict[str, str]] = []  # service, trace_id, span_id, parent_span_id (hex), name
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                service = attrs.get("service.name", "?")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append((service, span.trace_id.hex(), span.name))
                        self.links.append(
                            {
                                "service": service,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "name": span.name,
                            }
                        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def services_in_trace(self, trace_id: str) -> set[str]:
        with self.lock:
            return {service for service, tid, _ in self.spans if tid == trace_id}

    def spans_in_trace(self, trace_id: str) -> list[dict[str, str]]:
        with self.lock:
            return [span for span in self.links if span["trace_id"] == trace_id]

    def traces_named(self, name: str) -> set[str]:
        with self.lock:
            return {tid for _, tid, span in self.spans if span == name}


@pytest.fixture(scope="session")
def otlp_collector() -> Iterator[tuple[Collector, str]]:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collector, f"http://127.0.0.1:{port}"
    finally:
        server.stop(None)
