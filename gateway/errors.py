"""gRPC status → HTTP, as grpc-gateway maps them, with a google.rpc.Status JSON body."""

from __future__ import annotations

import math
from collections.abc import Mapping

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from starlette.responses import JSONResponse

from audiomesh.rpc.client import error_reason, rich_status

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
# Where the server said more precisely what was wrong (google.rpc.ErrorInfo reason).
REASON_STATUS = {"UNSUPPORTED_AUDIO": 415, "TOO_LARGE": 413}


def status_json(status: status_pb2.Status) -> dict:
    body = json_format.MessageToDict(status)
    body.setdefault("code", status.code)
    body.setdefault("message", status.message)
    body.setdefault("details", [])
    return body


def error_response(
    code: grpc.StatusCode, message: str, *, http_status: int | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    status = status_pb2.Status(code=code.value[0], message=message)
    return JSONResponse(status_json(status), status_code=http_status or HTTP_STATUS[code], headers=headers)


def rpc_error_response(exc: grpc.aio.AioRpcError) -> JSONResponse:
    status = rich_status(exc)
    http = REASON_STATUS.get(error_reason(exc) or "", HTTP_STATUS.get(exc.code(), 500))
    headers = {}
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            headers["Retry-After"] = str(max(1, math.ceil(info.retry_delay.ToMilliseconds() / 1000)))
    if http == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="audiomesh"'
    return JSONResponse(status_json(status), status_code=http, headers=headers)


def rpc_error_json(exc: grpc.aio.AioRpcError) -> dict:
    return status_json(rich_status(exc))
