"""Logging and tracing, configured in one place for every process.

Logs are structlog events: JSON lines in containers (or when ``AUDIOMESH_LOG_FORMAT=json``),
coloured console lines on a terminal. Each carries the service name, and ``job_id`` and
``trace_id`` whenever they are known (bound with :func:`bind_job`, taken from the current
OpenTelemetry span). Traces go to an OTLP collector when ``AUDIOMESH_OTLP_ENDPOINT`` is set;
context crosses services in gRPC metadata (W3C traceparent) through the interceptors that
:mod:`audiomesh.rpc` installs.

One job, one trace: the job records the traceparent of the call that created it
(``Job.trace_parent``, in the manifest), and every run of it — on whichever replica, after a
take-over, a hand-off, a restart or a RetryJob — opens its ``job`` span as that call's child
(:func:`job_span`). A log line that names a job this process knows the trace of carries the
job's ``trace_id`` even where no span of that trace is current (a lease keeper, a take-over,
a RetryJob call made in another trace: that call's trace id goes in ``request_trace_id``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator, MutableMapping
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_configured_tracing = False
_W3C = TraceContextTextMapPropagator()
# job id -> trace id of the jobs this process ran or read lately (log lines outside their spans).
# Bounded: a replica that has seen more jobs forgets the oldest, which it learns again on a run.
_JOB_TRACES_MAX = 10_000
_job_traces: dict[str, int] = {}
_job_traces_lock = threading.Lock()  # stdlib log records may be formatted on other threads


def _add_trace_ids(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    job_id = event.get("job_id")
    job_trace = _job_traces.get(job_id) if isinstance(job_id, str) else None
    if job_trace is not None and not (ctx.is_valid and ctx.trace_id == job_trace):
        # A line about a job, written outside the job's trace: the job's trace id, so that every
        # line of a job shares it; the span id belongs to another trace (or none) and is left out.
        event.setdefault("trace_id", format(job_trace, "032x"))
        if ctx.is_valid:
            event.setdefault("request_trace_id", format(ctx.trace_id, "032x"))
        return event
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


def current_traceparent() -> str:
    """The W3C traceparent of the current span; empty when none is (tracing not configured)."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent", "")


def _parent_context(traceparent: str) -> otel_context.Context | None:
    """The remote parent a traceparent names; None when it names none (empty or malformed)."""
    if not traceparent:
        return None
    ctx = _W3C.extract({"traceparent": traceparent})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def remember_job_trace(job_id: str, traceparent: str) -> None:
    """Tag this process's later log lines that name ``job_id`` with the trace of ``traceparent``
    (the job's ``trace_parent``), also where they are written outside the job's spans."""
    parent = _parent_context(traceparent)
    if parent is None:
        return
    trace_id = trace.get_current_span(parent).get_span_context().trace_id
    with _job_traces_lock:
        _job_traces.pop(job_id, None)  # re-inserted last: the newest are kept
        _job_traces[job_id] = trace_id
        while len(_job_traces) > _JOB_TRACES_MAX:
            del _job_traces[next(iter(_job_traces))]


@contextlib.contextmanager
def job_span(job_id: str, trace_parent: str = "") -> Iterator[trace.Span]:
    """One run of a job on this replica: the ``job`` span, with ``job_id`` on every log line.

    The span is the child of ``trace_parent`` (the job's creating call, persisted in the job), not
    of whatever is current: a run after a take-over, a hand-off, a restart (a background scan) or
    a RetryJob (another caller's trace) stays in the job's one trace. A run started from a call
    in another trace links to that call. Without a ``trace_parent``, the current span is the parent.
    """
    parent = _parent_context(trace_parent)
    links = []
    current = trace.get_current_span().get_span_context()
    if parent is not None:
        remember_job_trace(job_id, trace_parent)
        if current.is_valid and current.trace_id != trace.get_current_span(parent).get_span_context().trace_id:
            links.append(trace.Link(current))
    with (
        bind_job(job_id),
        tracer().start_as_current_span("job", context=parent, links=links, attributes={"job.id": job_id}) as span,
    ):
        yield span
