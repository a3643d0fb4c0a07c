"""Option ranges come from one table (audiomesh.ranges); out-of-memory is final, not retried (#14.4, #14.15)."""

from __future__ import annotations

import grpc
import pytest

from audiomesh import errors
from audiomesh.gateway.openapi import openapi_document
from audiomesh.gateway.routes import http_routes
from audiomesh.ranges import RANGES, target_range
from audiomesh.rpc import Registration
from audiomesh.rpc.client import status_of
from audiomesh.rpc.server import start_server
from audiomesh.services.orchestrator.runner import _unreachable_message, retryable
from audiomesh.v1 import hpss_pb2, hpss_pb2_grpc, orchestrator_pb2

_MESSAGES = {"separation": "SeparationOptions", "hpss": "HpssOptions", "normalize": "NormalizeOptions"}


def _property(schemas: dict, key: str) -> dict:
    parent, _, name = key.rpartition(".")
    message = schemas[f"audiomesh.v1.{_MESSAGES.get(parent, 'JobOptions')}"]
    json_name = name.split("_")[0] + "".join(part.title() for part in name.split("_")[1:])
    return message["properties"][json_name]


def test_openapi_carries_the_table_bounds():
    """Every range in the table is in /openapi.json, with the same numbers (none copied)."""
    routes = http_routes(orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"])
    schemas = openapi_document(routes)["components"]["schemas"]
    for key, rule in RANGES.items():
        if key.startswith("normalize.target."):
            key, rule = "normalize.target", target_range("off")
        prop = _property(schemas, key)
        if rule.kind == "items":
            assert prop["type"] == "array" and prop["maxItems"] == rule.maximum, key
            continue
        if rule.kind == "length":
            assert prop["maxLength"] == rule.maximum, key
            continue
        assert prop["maximum"] == rule.maximum, key
        if rule.zero_is_default:
            assert prop["minimum"] == 0 and {"minimum": rule.minimum} in prop["anyOf"], key
        elif rule.exclusive_minimum:
            assert prop["exclusiveMinimum"] == rule.minimum, key
        else:
            assert prop["minimum"] == rule.minimum, key
        if rule.kind == "number":
            assert prop["type"] == "number", key  # no "NaN"/"Infinity" strings for a bounded double
    loud, peak = RANGES["normalize.target.loudness"], RANGES["normalize.target.peak"]
    assert _property(schemas, "normalize.target")["minimum"] == min(loud.minimum, peak.minimum)


def test_memory_errors_are_classified_out_of_memory():
    oom = errors.out_of_memory(MemoryError("Unable to allocate 64.0 GiB for an array"))
    assert isinstance(oom, errors.OutOfMemory)
    assert (oom.code, oom.reason) == ("RESOURCE_EXHAUSTED", "OUT_OF_MEMORY")
    assert "64.0 GiB" in str(oom) and "not retried" in str(oom)
    torch = pytest.importorskip("torch")
    assert isinstance(errors.out_of_memory(torch.OutOfMemoryError("CUDA out of memory")), errors.OutOfMemory)
    assert errors.out_of_memory(ValueError("nope")) is None


def test_retry_decision():
    """The runner retries transient failures, never an out-of-memory one (same request, same memory)."""
    internal = errors.AudiomeshError("boom")
    assert retryable(internal)
    assert retryable(errors.ResourceExhausted("busy"))
    assert not retryable(errors.OutOfMemory("out of memory"))
    assert not retryable(errors.InvalidInput("bad"))


class _AllocatingHpss(hpss_pb2_grpc.HpssServiceServicer):
    """A stand-in worker whose request needs more memory than there is (a real kernel cannot be
    driven there with in-range options, which is the point of the ranges)."""

    async def Decompose(self, request, context):
        raise MemoryError("Unable to allocate 64.0 GiB for an array with shape (8589934592,) and data type float64")
        yield  # an async generator, like the real worker's stream


async def test_worker_memory_error_reaches_the_runner_as_final():
    """A real gRPC server (the shared interceptor) answers RESOURCE_EXHAUSTED/OUT_OF_MEMORY, not
    INTERNAL, and the orchestrator's retry decision on that status is: do not retry."""
    full_name = hpss_pb2.DESCRIPTOR.services_by_name["HpssService"].full_name
    server = await start_server(
        [Registration(hpss_pb2_grpc.add_HpssServiceServicer_to_server, _AllocatingHpss(), full_name)], service="hpss"
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = hpss_pb2_grpc.HpssServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Decompose(hpss_pb2.DecomposeRequest(input_key="a.wav"), timeout=30):
                    pass
    finally:
        await server.stop(0)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of memory" in err.value.details() and "64.0 GiB" in err.value.details()
    failure = status_of(err.value)
    assert failure.reason == "OUT_OF_MEMORY"
    assert not retryable(failure)


def test_unreachable_message_says_how_long_so_far():
    """After the first failed connection the event says 0 s so far and the budget, not "for 120 s"."""
    first = _unreachable_message("hpss", "127.0.0.1:1", 0.02, 120, True, "failed to connect")
    assert "(0 s so far; retrying for up to 120 s)" in first and "for 120 s" not in first
    last = _unreachable_message("hpss", "127.0.0.1:1", 121.4, 120, False, "failed to connect")
    assert "could not be reached for 121 s (the budget is 120 s)" in last
