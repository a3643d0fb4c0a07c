"""One server bootstrap for every service.

``start_server`` builds a ``grpc.aio`` server with the standard health service (NOT_SERVING
until warm-up finishes), reflection (v1 and v1alpha), OpenTelemetry propagation, and one interceptor that
logs each call, maps :class:`~audiomesh.errors.AudiomeshError` to its status code and
bounds concurrency (RESOURCE_EXHAUSTED beyond the limit). ``RunningServer.serve_until_signal``
drains on SIGTERM: health flips to NOT_SERVING, in-flight calls get ``grace`` seconds.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from audiomesh import errors
from audiomesh.auth import ANONYMOUS, SERVICE_TOKEN_HEADER, KeyRing, RateLimiter, current_principal
from audiomesh.metrics import RPC_SERVER_DURATION, WORKER_REFUSALS, WORKER_SLOTS, WORKER_SLOTS_BUSY
from audiomesh.rpc import reflection
from audiomesh.rpc.client import rpc_labels
from audiomesh.telemetry import logger

T = TypeVar("T")
_EXEMPT_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
_MAX_MESSAGE = 64 * 1024 * 1024
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Longest a failed client-streaming call keeps reading (and dropping) the caller's messages.
_DRAIN_SECONDS = 10.0
# Server keepalive, (ping every, ack within) in ms. Workers: a caller (an orchestrator) that does
# not ack a ping is gone and its calls are cancelled within ~4 s, well inside the 2/3 of a job
# lease's TTL after which a new owner may run the same node. The orchestrator faces users, whose
# acks may queue behind a large upload on a slow link: it waits longer (a gone watcher costs little).
WORKER_KEEPALIVE_MS = (2_000, 2_000)
USER_KEEPALIVE_MS = (10_000, 20_000)


def status_details(exc: errors.AudiomeshError) -> tuple[tuple[str, bytes], ...]:
    """google.rpc.Status with an ErrorInfo (reason, domain) in the standard trailer, when the
    error has a reason; read back by :func:`audiomesh.rpc.client.error_reason`."""
    details = []
    if exc.reason:
        details.append(any_pb2.Any())
        details[-1].Pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain="audiomesh"))
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromMilliseconds(max(1, int(retry_after * 1000)))
        details.append(any_pb2.Any())
        details[-1].Pack(info)
    if not details:
        return ()
    status = status_pb2.Status(code=grpc.StatusCode[exc.code].value[0], message=str(exc), details=details)
    return ((_STATUS_DETAILS_KEY, status.SerializeToString()),)


@dataclass
class Registration:
    """One servicer to host: ``add`` is the generated ``add_XServicer_to_server``."""

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str  # from the descriptor: pb.DESCRIPTOR.services_by_name["X"].full_name


@dataclass
class AuthPolicy:
    """Who may call. ``key_ring`` (orchestrator): API keys → principals, plus a per-principal
    rate limit; ``service_token`` (workers): the shared secret the orchestrator sends."""

    key_ring: KeyRing | None = None
    service_token: str = ""
    rate_limiter: RateLimiter | None = None

    def admit(self, context: grpc.aio.ServicerContext) -> str:
        # Only "-bin" keys carry bytes values; neither header read here is one.
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        if self.service_token:
            given = metadata.get(SERVICE_TOKEN_HEADER, "")
            if not hmac.compare_digest(given.encode(), self.service_token.encode()):
                raise errors.Unauthenticated("missing or wrong service token")
        principal = ANONYMOUS
        if self.key_ring is not None:
            principal = self.key_ring.principal(metadata.get("authorization"))
        if self.rate_limiter is not None:
            self.rate_limiter.check(principal)
        return principal


async def _drain_requests(requests: Any, seconds: float = _DRAIN_SECONDS) -> None:
    """Read and drop what a client-streaming caller is still sending before an error ends the call.

    A grpc-python asyncio client whose message write is in flight when the status arrives
    reports ``INTERNAL: Internal error from Core`` instead of the server's status
    (grpc/grpc#36066): ``audiomesh process --model nosuchmodel`` saw it in 2 of 9 runs. Once
    the client has sent everything and half-closed, no write can race the status. Bounded by
    ``seconds`` so a client that keeps sending cannot hold the call open.
    """
    if requests is None:
        return

    async def consume() -> None:
        async for _ in requests:
            pass

    try:
        await asyncio.wait_for(consume(), seconds)
    except Exception:  # noqa: BLE001 - timed out or the stream broke: end the call either way
        pass


#: Metadata the orchestrator sends with every node call: "<job id>/<node>" and "<replica>@<epoch>".
NODE_HEADER, LEASE_HEADER = "x-audiomesh-node", "x-audiomesh-lease"


def _caller(context: grpc.aio.ServicerContext) -> dict[str, str]:
    found = {}
    for key, value in context.invocation_metadata() or ():
        if key == NODE_HEADER and isinstance(value, str):
            found["node"] = value[:200]
        elif key == LEASE_HEADER and isinstance(value, str):
            found["lease"] = value[:200]
    return found


class _ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Access log, authentication, error mapping and the concurrency bound, around every method."""

    def __init__(
        self, service: str, concurrency: int | None, auth: AuthPolicy | None = None, light: Iterable[str] = ()
    ) -> None:
        self._light = frozenset(light)
        self._log = logger(component="rpc")
        self._limit = concurrency
        self._in_flight = 0
        self._service = service
        self._auth = auth
        if concurrency is not None:  # a bounded service: its slots, busy and total, are metrics
            WORKER_SLOTS.labels(service=service).set(concurrency)
            self._busy = WORKER_SLOTS_BUSY.labels(service=service)
            self._busy.set(0)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        limited = self._limit is not None and not method.startswith(_EXEMPT_PREFIXES) and method not in self._light
        client_streaming = bool(handler.stream_unary or handler.stream_stream)
        # The aio server's handlers are coroutine / async-generator functions; the stubs declare the sync ones.
        inner: Any
        wrapped: Callable[[Any, grpc.aio.ServicerContext], Any]
        if handler.unary_unary or handler.stream_unary:
            kind = "unary_unary" if handler.unary_unary else "stream_unary"
            inner = handler.unary_unary or handler.stream_unary
        else:
            kind = "unary_stream" if handler.unary_stream else "stream_stream"
            inner = handler.unary_stream or handler.stream_stream
        if kind in ("unary_unary", "stream_unary"):

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with self._call(method, context, limited, request if client_streaming else None):
                    self._admit(method, context)
                    return await inner(request, context)

            wrapped = unary
        else:

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with self._call(method, context, limited, request if client_streaming else None):
                    self._admit(method, context)
                    responses = inner(request, context)
                    if inspect.isawaitable(responses):
                        # A coroutine handler writes through context.write (grpc_health's Watch);
                        # stays a generator so outer interceptors (OpenTelemetry) can iterate it.
                        await responses
                        return
                    async for response in responses:
                        yield response

            wrapped = streaming
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _admit(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Authenticate (health and reflection stay open for probes); the principal is
        visible to the handler through ``audiomesh.auth.current_principal``."""
        if self._auth is None or method.startswith(_EXEMPT_PREFIXES):
            return
        current_principal.set(self._auth.admit(context))

    def _call(
        self, method: str, context: grpc.aio.ServicerContext, limited: bool, requests: Any = None
    ) -> AbstractAsyncContextManager[Any]:
        """``requests``: a client-streaming call's request iterator, drained before an error ends
        the call (see :func:`_drain_requests`)."""
        interceptor = self

        class _Scope:
            async def __aenter__(self) -> _Scope:
                self.start = time.perf_counter()
                self.code = "OK"
                # Which job node and which lease holder this call is for (the orchestrator says so):
                # on every log line of the call, so a node run twice at once would show in the logs.
                caller = _caller(context)
                if caller:
                    structlog.contextvars.bind_contextvars(**caller)
                if limited and interceptor._limit is not None:
                    if interceptor._in_flight >= interceptor._limit:
                        self.code = "RESOURCE_EXHAUSTED"
                        WORKER_REFUSALS.labels(service=interceptor._service).inc()
                        interceptor._log_call(method, self.code, self.start)
                        await _drain_requests(requests)
                        await context.abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{interceptor._service} is busy: {interceptor._in_flight} requests in flight "
                            f"(limit {interceptor._limit}); retry later",
                        )
                    interceptor._in_flight += 1
                    interceptor._busy.set(interceptor._in_flight)
                self.counted = limited
                return self

            async def __aexit__(
                self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
            ) -> bool:
                if self.counted:
                    interceptor._in_flight -= 1
                    interceptor._busy.set(interceptor._in_flight)
                if exc is None:
                    interceptor._log_call(method, self.code, self.start)
                    return False
                # An allocation failure is not an internal error to retry: RESOURCE_EXHAUSTED + OUT_OF_MEMORY.
                exc = errors.out_of_memory(exc) or exc
                if isinstance(exc, errors.AudiomeshError):
                    code = grpc.StatusCode[exc.code]
                    interceptor._log_call(method, exc.code, self.start, error=str(exc))
                    await _drain_requests(requests)
                    await context.abort(code, str(exc), trailing_metadata=status_details(exc))
                if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                    interceptor._log_call(method, "CANCELLED", self.start)
                    return False
                if isinstance(exc, grpc.aio.AbortError) or isinstance(exc, grpc.RpcError):
                    status = context.code() if hasattr(context, "code") else None
                    interceptor._log_call(method, getattr(status, "name", "ABORTED"), self.start)
                    return False
                interceptor._log.exception("unhandled error", method=method)
                interceptor._log_call(method, "INTERNAL", self.start, error=repr(exc))
                await _drain_requests(requests)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

        return _Scope()

    def _log_call(self, method: str, code: str, start: float, **extra: Any) -> None:
        """The call's access-log line and its rpc_server_duration_seconds (health and reflection: neither)."""
        if method.startswith(_EXEMPT_PREFIXES):
            return
        seconds = time.perf_counter() - start
        RPC_SERVER_DURATION.labels(**rpc_labels(method, code)).observe(seconds)
        ms = round(seconds * 1000, 1)
        level = self._log.info if code in ("OK", "CANCELLED") else self._log.warning
        level("rpc", method=method, code=code, duration_ms=ms, **extra)


@dataclass
class ServiceSpec:
    """What a service module's ``build(settings)`` returns for the shared bootstrap."""

    registrations: list[Registration]
    warmup: Callable[[], Awaitable[None]] | None = None
    concurrency: int | None = None
    # Cheap methods ("/pkg.Service/Method") that do not count against ``concurrency``.
    light_methods: tuple[str, ...] = ()
    on_stop: Callable[[], Awaitable[None]] | None = None


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: list[str]
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)
        if serving:
            self.ready.set()

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def serve_until_signal(
        self, *, grace: float, before_stop: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Block until SIGTERM/SIGINT, then drain: NOT_SERVING for every service name, new calls
        refused (UNAVAILABLE: the listener closes and connections get GOAWAY, so callers go to
        another replica), in-flight calls run on for up to ``grace`` seconds, then are cancelled."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.ensure_future(self.server.wait_for_termination())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            logger().info("draining", grace_s=grace)
            await self.health.enter_graceful_shutdown()
            if before_stop is not None:
                await before_stop()
            await self.stop(grace)
        waiter.cancel()
        stopper.cancel()


async def start_server(
    registrations: Iterable[Registration],
    *,
    service: str,
    bind: str = "127.0.0.1:0",
    warmup: Callable[[], Awaitable[None]] | None = None,
    concurrency: int | None = None,
    light_methods: Iterable[str] = (),
    tls: tuple[bytes, bytes] | None = None,
    auth: AuthPolicy | None = None,
    extra_interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    keepalive_ms: tuple[int, int] = WORKER_KEEPALIVE_MS,
) -> RunningServer:
    """Start a server on ``bind`` (port 0 picks a free port); SERVING once ``warmup`` returns.

    ``keepalive_ms``: ping each client every so often and close its connection (cancelling its
    calls) when the ack does not come within the second value."""
    regs = list(registrations)
    server = grpc.aio.server(
        interceptors=[
            aio_server_interceptor(),
            _ServiceInterceptor(service, concurrency, auth, light_methods),
            *extra_interceptors,
        ],
        options=[
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            # New replicas behind a headless Service get traffic: clients reconnect and re-resolve.
            ("grpc.max_connection_age_ms", 5 * 60 * 1000),
            ("grpc.max_connection_age_grace_ms", 60 * 60 * 1000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # Notice a caller that froze or was cut off: ping it, close the transport (which cancels
            # its calls, so a separation stops) when the ack is late. Without this a worker would
            # run on for a job whose new owner already runs the same node. The ack deadline is
            # ping_timeout_ms in grpc 1.85 (keepalive_timeout_ms alone left it at 60 s).
            # max_pings_without_data 0: keep pinging through a long call that sends nothing.
            ("grpc.keepalive_time_ms", keepalive_ms[0]),
            ("grpc.keepalive_timeout_ms", keepalive_ms[1]),
            ("grpc.http2.ping_timeout_ms", keepalive_ms[1]),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for reg in regs:
        reg.add(reg.servicer, server)
    names = [reg.full_name for reg in regs]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME], server)  # v1 and v1alpha
    if tls:
        port = server.add_secure_port(bind, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        port = server.add_insecure_port(bind)
    if port == 0:
        raise errors.Unavailable(f"cannot bind {bind}: address in use or not available")
    await server.start()
    running = RunningServer(server=server, health=health_servicer, port=port, service_names=names)
    await running.set_serving(False)
    log = logger()
    if warmup is None:
        await running.set_serving(True)
    else:

        async def _warm() -> None:
            started = time.perf_counter()
            try:
                await warmup()
            except Exception:
                log.exception("warm-up failed; staying NOT_SERVING")
                return
            log.info("warm-up done", seconds=round(time.perf_counter() - started, 2))
            await running.set_serving(True)

        running._warm_task = asyncio.ensure_future(_warm())  # type: ignore[attr-defined]
    log.info("listening", bind=bind, port=port, services=names, concurrency=concurrency)
    return running


async def run_in_thread(fn: Callable[[threading.Event], T]) -> T:
    """Run blocking ``fn(cancel_event)`` in a thread; if the RPC is cancelled (client gone,
    deadline passed, job cancelled) set the event and wait for ``fn`` to notice and stop."""
    cancel = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, fn, cancel)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        try:
            await future
        except BaseException:  # noqa: BLE001 - the work's own error is moot once cancelled
            pass
        raise


async def stream_work(
    fn: Callable[[Callable[[float, str], None], threading.Event], T],
    *,
    progress_message: Callable[[float, str], Any],
    result_message: Callable[[T], Any],
    min_interval: float = 0.25,
) -> AsyncIterator[Any]:
    """Run blocking ``fn(report, cancel)`` in a thread; yield progress messages, then the result's.

    ``report(fraction, text)`` may be called from the worker thread at any rate; messages are
    throttled to one per ``min_interval`` seconds (plus the final 1.0). The last message is
    ``result_message(fn's return value)``.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
    last = [0.0]

    def report(fraction: float, text: str = "") -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - last[0] < min_interval:
            return
        last[0] = now
        loop.call_soon_threadsafe(queue.put_nowait, (fraction, text))

    task = asyncio.ensure_future(run_in_thread(lambda cancel: fn(report, cancel)))
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                fraction, text = getter.result()
                yield progress_message(fraction, text)
                continue
            getter.cancel()
            while not queue.empty():
                fraction, text = queue.get_nowait()
                yield progress_message(fraction, text)
            yield result_message(task.result())
            return
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001
                pass
