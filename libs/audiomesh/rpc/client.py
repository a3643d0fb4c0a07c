"""One client factory: channel options, retries, keepalive, tracing — for every caller."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from audiomesh import errors
from audiomesh.auth import SERVICE_TOKEN_HEADER
from audiomesh.metrics import RPC_CLIENT_DURATION

if TYPE_CHECKING:
    from audiomesh.v1 import orchestrator_pb2

# Transparent retries for calls that never reached a healthy server. Idempotent unary calls
# (health, ListModels, Measure) also retry UNAVAILABLE; streaming work is retried by the
# orchestrator, which knows what was written.
_Stub = TypeVar("_Stub")

_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [
                {"service": "grpc.health.v1.Health"},
                {"service": "audiomesh.v1.SeparationService", "method": "ListModels"},
                {"service": "audiomesh.v1.NormalizeService", "method": "Measure"},
                {"service": "audiomesh.v1.OrchestratorService", "method": "GetJob"},
                {"service": "audiomesh.v1.OrchestratorService", "method": "ListJobs"},
                {"service": "audiomesh.v1.OrchestratorService", "method": "GetConfig"},
                {"service": "audiomesh.v1.OrchestratorService", "method": "ListModels"},
            ],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.service_config", json.dumps(_SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    # gRPC's reconnect backoff grows to 120 s by default: a worker back after a two-minute
    # outage would stay unreachable for up to two more, past any UNAVAILABLE budget. Peers
    # here are a few services on a cluster network: retry a lost connection every second.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class _AddMetadata:
    """Adds fixed metadata (service token, API key) to every call. grpc.aio files an
    interceptor under the first call type it implements, so there is one class per type."""

    def __init__(self, pairs: tuple[tuple[str, str], ...]) -> None:
        self.pairs = pairs

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*(details.metadata or ()), *self.pairs),
            details.credentials,
            details.wait_for_ready,
        )


# The continuations and calls are generic over message types; these interceptors pass any through.
class _UnaryUnaryMetadata(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamMetadata(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Awaitable[Any]], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnaryMetadata(_AddMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(details), request_iterator)


def metadata_interceptors(pairs: tuple[tuple[str, str], ...]) -> list:
    return [cls(pairs) for cls in (_UnaryUnaryMetadata, _UnaryStreamMetadata, _StreamUnaryMetadata)]


def rpc_labels(method: str, code: str) -> dict[str, str]:
    """The OpenTelemetry RPC attributes of ``/package.Service/Method`` as metric labels."""
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc_system": "grpc", "rpc_service": service, "rpc_method": name, "rpc_grpc_status_code": code}


_OBSERVING: set[asyncio.Future[None]] = set()


class _TimeCalls:
    """rpc_client_duration_seconds for each call to an audiomesh service, observed when the
    call ends (its status known), however it ends. Health checks are left out."""

    def _timed(self, details: grpc.aio.ClientCallDetails, call: Any, start: float) -> Any:
        """``start``: taken before the call began (a unary call has ended when its call object comes)."""
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.startswith("/grpc."):
            return call

        def observe(elapsed: float, code: str) -> None:
            RPC_CLIENT_DURATION.labels(**rpc_labels(method, code)).observe(elapsed)

        def done(finished: Any) -> None:
            elapsed = time.perf_counter() - start
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # a call collected after its loop closed (grpc cancels it in __del__)
                observe(elapsed, "CANCELLED")
                return
            if finished.cancelled():
                observe(elapsed, "CANCELLED")
                return

            async def observe_status() -> None:
                try:
                    code = (await finished.code()).name
                except Exception:  # noqa: BLE001 - a metric must never fail a call
                    code = "UNKNOWN"
                observe(elapsed, code)

            task = loop.create_task(observe_status())
            _OBSERVING.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(_OBSERVING.discard)

        call.add_done_callback(done)
        return call


class _UnaryUnaryTimer(_TimeCalls, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        start = time.perf_counter()
        return self._timed(details, await continuation(details, request), start)


class _UnaryStreamTimer(_TimeCalls, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Awaitable[Any]], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        start = time.perf_counter()
        return self._timed(details, await continuation(details, request), start)


class _StreamUnaryTimer(_TimeCalls, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        start = time.perf_counter()
        return self._timed(details, await continuation(details, request_iterator), start)


def metrics_interceptors() -> list:
    return [cls() for cls in (_UnaryUnaryTimer, _UnaryStreamTimer, _StreamUnaryTimer)]


class ClientFactory:
    """Channels cached per target; stubs made from them.

    ``stub(orchestrator_pb2_grpc.OrchestratorServiceStub, "127.0.0.1:50051")``. Targets may be
    ``host:port`` or ``dns:///host:port`` (round-robin over a headless Service's pods).
    """

    def __init__(self, *, root_certificates: bytes | None = None, service_token: str = "", api_key: str = "") -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._root_certificates = root_certificates
        self._metadata: tuple[tuple[str, str], ...] = ()
        if service_token:
            self._metadata += ((SERVICE_TOKEN_HEADER, service_token),)
        if api_key:
            self._metadata += (("authorization", f"Bearer {api_key}"),)

    def channel(self, target: str) -> grpc.aio.Channel:
        if target not in self._channels:
            interceptors = [*metrics_interceptors(), *aio_client_interceptors()]
            if self._metadata:
                interceptors += metadata_interceptors(self._metadata)
            if self._root_certificates is not None:
                creds = grpc.ssl_channel_credentials(self._root_certificates)
                chan = grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS, interceptors=interceptors)
            else:
                chan = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)
            self._channels[target] = chan
        return self._channels[target]

    def stub(self, stub_class: Callable[[grpc.aio.Channel], _Stub], target: str) -> _Stub:
        """``stub_class`` on the target's channel: a generated ``*Stub`` class gives its async stub type."""
        return stub_class(self.channel(target))

    async def health(self, target: str, service: str = "", *, timeout: float = 2.0) -> str:  # noqa: ASYNC109 - a gRPC deadline
        """Health status name (SERVING, NOT_SERVING, ...) or UNREACHABLE."""
        stub = health_pb2_grpc.HealthStub(self.channel(target))
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return (
                "UNREACHABLE"
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                else exc.code().name
            )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        for chan in self._channels.values():
            await chan.close()
        self._channels.clear()


class WatchLost(errors.Unavailable):
    """:func:`follow_job` gave up: no watch could be reopened within its ``give_up_after``."""


async def follow_job(
    open_watch: Callable[[], AsyncIterable[orchestrator_pb2.WatchJobResponse]],
    *,
    backoff: float = 0.2,
    max_backoff: float = 2.0,
    give_up_after: float = 60.0,
    on_retry: Callable[[int, float, str], None] | None = None,
) -> AsyncIterator[orchestrator_pb2.WatchJobResponse]:
    """A WatchJob that survives its server: the messages of ``open_watch()`` streams, reopened
    until the job is terminal, each distinct snapshot once.

    A stream that fails UNAVAILABLE (its orchestrator stopped, restarted, or cannot be reached)
    or ends before a terminal state is opened again after ``backoff`` seconds, doubling to
    ``max_backoff``; a new watch starts with a snapshot of the job, which is how it continues
    from where it is, and a snapshot equal to the last one passed on is dropped (no repeated
    line). CANCELLED from the server (a stopping one cuts its calls) is retried the same way.
    ``on_retry(attempt, delay_s, why)`` is told before each wait. Other errors (NOT_FOUND,
    PERMISSION_DENIED, …) are raised as they are; after ``give_up_after`` seconds of failed
    reopenings (a quiet but healthy stream does not count) :class:`WatchLost` is raised,
    naming the last failure.
    """
    from audiomesh.v1 import common_pb2

    terminal = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
    last = b""
    attempt = 0
    delay = backoff
    failing_since: float | None = None  # start of the current run of failed watches
    while True:
        why = "the stream ended before the job did"
        stream = open_watch()
        try:
            async for msg in stream:
                failing_since, attempt, delay = None, 0, backoff
                raw = msg.SerializeToString(deterministic=True)
                if raw != last:
                    last = raw
                    yield msg
                if msg.job.state in terminal:
                    return
        except grpc.aio.AioRpcError as exc:
            # CANCELLED reaches a client whose call was cut by a stopping server (its drain ended),
            # not only one that cancelled itself: that one never gets here (the task is cancelled).
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise
            why = f"{exc.code().name}: {exc.details()}"
        finally:  # a gRPC call is cancelled, a generator closed
            if isinstance(stream, grpc.aio.Call):
                stream.cancel()
            elif (aclose := getattr(stream, "aclose", None)) is not None:
                await aclose()
        failing_since = failing_since or time.monotonic()  # a long quiet stream is not a failure
        if time.monotonic() - failing_since + delay > give_up_after:
            raise WatchLost(f"lost the job's watch and could not reopen it within {give_up_after:.0f} s ({why})")
        attempt += 1
        if on_retry is not None:
            on_retry(attempt, delay, why)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_backoff)


_CODE_TO_ERROR: dict[grpc.StatusCode, type[errors.AudiomeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInput,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
}


def rich_status(exc: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status of a failed call: from the standard trailer, else code + message."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return status_pb2.Status(code=exc.code().value[0], message=exc.details() or "")


def error_reason(exc: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason a server attached (e.g. UNSUPPORTED_AUDIO), if any."""
    for detail in rich_status(exc).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return None


def status_of(exc: grpc.aio.AioRpcError) -> errors.AudiomeshError:
    """Turn a worker's status back into our exception (code, message and reason preserved)."""
    cls = _CODE_TO_ERROR.get(exc.code(), errors.AudiomeshError)
    err = cls(exc.details() or exc.code().name)
    if cls is errors.AudiomeshError:
        err.code = exc.code().name
    err.reason = error_reason(exc)
    return err
