"""Logging and tracing, configured in one place for every process.

Logs are structlog events: JSON lines in containers (or when ``AUDIOMESH_LOG_FORMAT=json``),
coloured console lines on a terminal. Each carries the service name, and ``job_id`` and
``trace_id`` whenever they are known (bound with :func:`bind_job`, taken from the current
OpenTelemetry span). Traces go to an OTLP collector when ``AUDIOMESH_OTLP_ENDPOINT`` is set;
context crosses services in gRPC metadata (W3C traceparent) through the interceptors that
:mod:`audiomesh.rpc` installs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_configured_tracing = False


def _add_trace_ids(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def configure_logging(service: str, *, level: str = "info", fmt: str = "auto") -> None:
    """Route structlog and stdlib logging to stderr as JSON or console lines."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    # Libraries that log through stdlib logging get the same format.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processors=[*shared, renderer], foreign_pre_chain=shared))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if level == "info" else level.upper())


def configure_tracing(service: str, *, otlp_endpoint: str = "") -> None:
    """Install a tracer provider; export over OTLP/gRPC only when an endpoint is given."""
    global _configured_tracing
    if _configured_tracing:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"audiomesh-{service}"}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = otlp_endpoint.startswith("http://")
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=insecure)))
    trace.set_tracer_provider(provider)
    _configured_tracing = True


def shutdown_tracing() -> None:
    """Flush spans still buffered for export (called when a service stops)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer("audiomesh")


def logger(**bound: Any) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger("audiomesh").bind(**bound)


@contextlib.contextmanager
def bind_job(job_id: str) -> Iterator[None]:
    """Carry ``job_id`` on every log line written inside the block (task-local)."""
    with structlog.contextvars.bound_contextvars(job_id=job_id):
        yield
