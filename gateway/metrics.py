"""HTTP request metrics of the gateway (``http_server_request_duration_seconds``).

Labelled as OpenTelemetry's HTTP semantic conventions say: the method, the matched route's
template (``/v1/jobs/{job_id}``, never the path itself: job ids would make one series per job)
and the status code. Served with the other metrics on AUDIOMESH_METRICS_PORT, not on the API port.
"""

from __future__ import annotations

import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from audiomesh.metrics import HTTP_SERVER_DURATION

_CONVERTER = re.compile(r"\{(\w+):\w+\}")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def route_template(scope: Scope) -> str:
    """The matched route's path template without converters; "unmatched" when none matched."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return "unmatched"
    return _CONVERTER.sub(r"{\1}", path) or "/"


class RequestMetrics:
    """Times each HTTP request from its arrival to the end of its response body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "_OTHER"
            HTTP_SERVER_DURATION.labels(
                http_request_method=method,
                http_route=route_template(scope),
                http_response_status_code=str(status[0]),
            ).observe(time.perf_counter() - started)
