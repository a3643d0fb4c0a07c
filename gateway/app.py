"""The HTTP facade: a thin, faithful translation of the orchestrator's gRPC API.

JSON routes are built at start from the ``google.api.http`` annotations (:mod:`.routes`);
bodies and responses use protobuf's ``json_format``; errors are google.rpc.Status JSON with
grpc-gateway's status mapping; server streams are NDJSON (``{"result": …}`` per message) or
Server-Sent Events. The only hand-written handlers are where bytes flow — the multipart
upload, track downloads (HTTP Range) and the streamed ZIP — plus the seed's paths and the
aggregated ``/health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import cast
from urllib.parse import quote

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message as ProtoMessage
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from stream_zip import ZIP_AUTO, MemberFile, stream_zip

import audiomesh
from audiomesh import errors
from audiomesh.config import SERVICES, Settings
from audiomesh.rpc import ClientFactory
from audiomesh.rpc.client import follow_job
from audiomesh.store import ObjectStore
from audiomesh.telemetry import logger, tracer
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

from .docs import docs_endpoint
from .errors import HTTP_STATUS, error_response, rpc_error_json, rpc_error_response
from .metrics import RequestMetrics, route_template
from .openapi import openapi_document
from .routes import HttpRoute, http_routes

STATIC = Path(__file__).with_name("static")
ORCHESTRATOR = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"]
_CHUNK = 256 * 1024
_ABORT = object()  # queued to end an upload call whose HTTP request failed


def _page_headers() -> dict[str, str]:
    """The page's own Content-Security-Policy (its <meta>, the one source) as a header, plus
    what only a header can say: no framing (clickjacking), no content-type sniffing."""
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    found = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    policy = found.group(1) if found else "default-src 'self'"
    return {
        "Content-Security-Policy": f"{policy}; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
    }


PAGE_HEADERS = _page_headers()


def attachment(filename: str) -> str:
    """``Content-Disposition`` for a download named after the user's file (RFC 6266): an ASCII
    fallback (HTTP headers are Latin-1: a name like 歌曲.wav made every download a 500) and the
    exact name as UTF-8 in ``filename*``."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


_MIME = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".json": "application/json"}


class SegmentConvertor(Convertor):
    """One path segment without ':' — so ``/v1/jobs/{id}`` and ``/v1/jobs/{id}:watch`` differ."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("seg", SegmentConvertor())


def to_json(message: ProtoMessage) -> dict:
    return json_format.MessageToDict(message)


class Gateway:
    def __init__(self, settings: Settings, clients: ClientFactory, store: ObjectStore) -> None:
        self.settings = settings
        self.clients = clients
        self.store = store
        self.log = logger(component="gateway")

    @property
    def channel(self) -> grpc.aio.Channel:
        return self.clients.channel(self.settings.orchestrator_addr)

    @property
    def orchestrator(self) -> orchestrator_pb2_grpc.OrchestratorServiceAsyncStub:
        return orchestrator_pb2_grpc.OrchestratorServiceStub(self.channel)

    def metadata(self, request: Request) -> tuple[tuple[str, str], ...]:
        md = [("x-request-id", request.state.request_id)]
        # Browsers cannot set headers on EventSource or <audio src>: a key may come as
        # ?access_token= instead (never logged: the access log records the path only).
        auth = request.headers.get("authorization")
        if not auth and (token := request.query_params.get("access_token")):
            auth = f"Bearer {token}"
        if auth:
            md.append(("authorization", auth))
        return tuple(md)

    # --- annotated routes -----------------------------------------------------------
    def endpoint(self, route: HttpRoute) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            try:
                message = await self._request_message(route, request)
            except (json_format.ParseError, UnicodeDecodeError) as exc:
                return error_response(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {exc}")
            # The request's span (AccessLog's) is current: the gRPC call below is its child.
            if route.server_streaming:
                return await self._stream(route, message, request)
            call = self.channel.unary_unary(
                route.grpc_path,
                request_serializer=route.request_class.SerializeToString,
                response_deserializer=route.response_class.FromString,
            )
            try:
                response = await call(message, metadata=self.metadata(request))
            except grpc.aio.AioRpcError as exc:
                return rpc_error_response(exc)
            return JSONResponse(to_json(response))

        handle.__name__ = route.method.name
        return handle

    async def _request_message(self, route: HttpRoute, request: Request) -> ProtoMessage:
        message = route.request_class()
        if route.body == "*":
            raw = await request.body()
            if raw.strip():
                json_format.Parse(raw, message)
        for key in request.query_params:
            if key in route.path_params or key == "access_token":
                continue
            values = request.query_params.getlist(key)
            field = message.DESCRIPTOR.fields_by_camelcase_name.get(key) or message.DESCRIPTOR.fields_by_name.get(key)
            if field is None:
                continue  # like grpc-gateway: parameters that name no field are ignored
            json_format.ParseDict({field.name: values if field.is_repeated else values[-1]}, message)
        if request.path_params:
            json_format.ParseDict(dict(request.path_params), message)
        return message

    async def _stream(self, route: HttpRoute, message: ProtoMessage, request: Request) -> Response:
        metadata = self.metadata(request)
        open_call = self.channel.unary_stream(
            route.grpc_path,
            request_serializer=route.request_class.SerializeToString,
            response_deserializer=route.response_class.FromString,
        )
        sse = "text/event-stream" in request.headers.get("accept", "")
        # Messages, the end, an error, or (SSE only) a reconnect under way, in order.
        events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        call = None
        messages: AsyncIterator[ProtoMessage]
        if route.method.name == "WatchJob":
            # The watch outlives its orchestrator: reopened upstream (any replica) until the job
            # ends, each snapshot once, so the browser or client sees one unbroken stream.
            def reconnecting(attempt: int, delay: float, why: str) -> None:
                if sse:
                    events.put_nowait(("reconnecting", {"attempt": attempt, "retryInSeconds": delay, "reason": why}))

            messages = follow_job(
                lambda: cast("AsyncIterable[orchestrator_pb2.WatchJobResponse]", open_call(message, metadata=metadata)),
                on_retry=reconnecting,
            )
        else:
            call = open_call(message, metadata=metadata)
            messages = aiter(call)
        # Read the first message before answering, so a NOT_FOUND is a 404, not a 200 stream.
        try:
            first = await anext(messages, None)
        except grpc.aio.AioRpcError as exc:
            return rpc_error_response(exc)
        except errors.Unavailable as exc:  # follow_job gave up
            return error_response(grpc.StatusCode.UNAVAILABLE, str(exc))

        async def pump() -> None:
            try:
                async for item in messages:
                    events.put_nowait(("result", to_json(item)))
                events.put_nowait(("end", None))
            except grpc.aio.AioRpcError as exc:
                events.put_nowait(("error", rpc_error_json(exc)))
            except errors.Unavailable as exc:
                events.put_nowait(("error", {"code": grpc.StatusCode.UNAVAILABLE.value[0], "message": str(exc)}))

        def frame(kind: str, payload: object) -> bytes:
            text = json.dumps({kind: payload} if kind != "reconnecting" else payload, separators=(",", ":"))
            if not sse:
                return (text + "\n").encode()
            return (b"event: reconnecting\n" if kind == "reconnecting" else b"") + f"data: {text}\n\n".encode()

        async def body() -> AsyncIterator[bytes]:
            if first is None:
                return
            while not events.empty():  # retries before the first message: over, the client saw none
                events.get_nowait()
            yield frame("result", to_json(first))
            task = asyncio.ensure_future(pump())
            try:
                while True:
                    kind, payload = await events.get()
                    if kind == "end":
                        break
                    yield frame(kind, payload)
                    if kind == "error":
                        break
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                if call is not None:
                    call.cancel()
                elif (aclose := getattr(messages, "aclose", None)) is not None:
                    await aclose()

        media = "text/event-stream" if sse else "application/x-ndjson"
        return StreamingResponse(body(), media_type=media, headers={"Cache-Control": "no-cache"})

    # --- uploads ----------------------------------------------------------------------
    async def upload(self, request: Request) -> Response:
        """multipart/form-data: optional ``options`` (JobOptions JSON) or ``model``, then ``file``.

        The file streams straight into UploadAudio, which streams it into the store (no disk on
        the way, here or in the orchestrator); the size limit is enforced as bytes arrive.
        """
        limit = self.settings.max_upload_bytes
        ctype, params = parse_options_header(request.headers.get("content-type", ""))
        if ctype != b"multipart/form-data" or b"boundary" not in params:
            return error_response(
                grpc.StatusCode.INVALID_ARGUMENT,
                "send the audio as multipart/form-data with a 'file' field (curl -F file=@song.wav)",
                http_status=415,
            )
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
            return _too_large(limit)
        upload = _MultipartUpload(params[b"boundary"])
        chunks: asyncio.Queue = asyncio.Queue(maxsize=16)  # bytes, None (the end) or _ABORT
        call_task: asyncio.Future | None = None
        sent = 0
        complete = False  # the whole body arrived and parsed: only then may the call see its end

        async def messages() -> AsyncIterator[orchestrator_pb2.UploadAudioRequest]:
            yield orchestrator_pb2.UploadAudioRequest(
                metadata=orchestrator_pb2.UploadMetadata(
                    filename=upload.filename or "upload", options=upload.options, create_job=True
                )
            )
            while (chunk := await chunks.get()) is not None:
                if chunk is _ABORT:
                    # grpc.aio cancels a call whose request iterator raises; cancelling the call
                    # object does not reach it through the tracing interceptor, which awaits it.
                    raise ConnectionAbortedError("the HTTP upload ended before its body did")
                yield orchestrator_pb2.UploadAudioRequest(chunk=chunk)

        try:
            async for data in request.stream():
                for kind, value in upload.feed(data):
                    if kind == "file-start":
                        call_task = asyncio.ensure_future(
                            self.orchestrator.UploadAudio(messages(), metadata=self.metadata(request))
                        )
                    elif kind == "file-data":
                        sent += len(value)
                        if sent > limit:
                            return _too_large(limit)
                        assert call_task is not None  # the parser yields "file-start" before any "file-data"
                        if not await _offer(chunks, value, call_task):
                            break
                if call_task is not None and call_task.done():
                    break  # refused early (bad options, unknown model): stop reading
            else:
                if call_task is not None and not upload.file_ended:
                    raise errors.InvalidInput("the multipart body ends inside the 'file' part (no closing boundary)")
                # A field after the file is refused while parsing, so the end is sent only now:
                # ending the stream at the file's last byte would create a job for a refused form.
                complete = call_task is None or await _offer(chunks, None, call_task)
        except errors.InvalidInput as exc:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ClientDisconnect:
            return error_response(grpc.StatusCode.CANCELLED, "the client closed the connection mid-upload")
        finally:
            # Every way out but a complete body ends the call: the orchestrator's UploadAudio
            # then stops streaming into the store and removes what it wrote.
            if call_task is not None and not complete and not call_task.done():
                while not chunks.empty():
                    chunks.get_nowait()
                chunks.put_nowait(_ABORT)
                call_task.add_done_callback(lambda task: task.cancelled() or task.exception())
        if call_task is None:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, "the form has no 'file' field with the audio")
        try:
            response = await call_task
        except grpc.aio.AioRpcError as exc:
            return rpc_error_response(exc)
        if response.HasField("job"):
            # The access log line names the path only: this one ties the request to its job, in
            # the job's trace (the orchestrator made the job this span's child).
            self.log.info("job created", job_id=response.job.job_id, request_id=request.state.request_id)
        return JSONResponse(to_json(response))

    # --- downloads --------------------------------------------------------------------
    async def _job(self, request: Request, job_id: str) -> orchestrator_pb2.Job:
        response = await self.orchestrator.GetJob(
            orchestrator_pb2.GetJobRequest(job_id=job_id), metadata=self.metadata(request)
        )
        return response.job

    def _files(self, job: orchestrator_pb2.Job) -> dict[str, str]:
        """Downloadable name → key: every delivered track, and the manifest."""
        files = {t.name: t.key for t in job.tracks}
        files["manifest"] = job.manifest_key
        return files

    async def download(self, request: Request) -> Response:
        job_id, name = request.path_params["job_id"], request.path_params["track"]
        job = await self._job(request, job_id)  # a gRPC error becomes its HTTP answer (handler below)
        files = self._files(job)
        if name not in files:
            state = common_pb2.JobState.Name(job.state)
            hint = "" if job.tracks else f"; the job is {state} and has no tracks yet"
            return error_response(
                grpc.StatusCode.NOT_FOUND,
                f"job {job_id} has no track {name!r}{hint}; available: {', '.join(sorted(files))}",
            )
        key = files[name]
        info = await asyncio.to_thread(self.store.stat, key)
        size = info.size
        suffix = PurePosixPath(key).suffix
        stem = PurePosixPath(job.input.name).stem or "audiomesh"
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Disposition": attachment(f"{stem}_{name}{suffix}"),
        }
        track = next((t for t in job.tracks if t.name == name), None)
        if track is not None and track.sha256:
            headers["ETag"] = f'"{track.sha256}"'
        start, length, status = 0, size, 200
        if header := request.headers.get("range"):
            parsed = _parse_range(header, size)
            if parsed is None:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
            if parsed != (0, size):
                start, length = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{size}"
        headers["Content-Length"] = str(length)
        media = _MIME.get(suffix, "application/octet-stream")
        if request.method == "HEAD" or length == 0:
            return Response(status_code=status, headers=headers, media_type=media)
        chunks = self.store.iter_chunks(key, _CHUNK, start=start, length=length)
        return StreamingResponse(chunks, status_code=status, headers=headers, media_type=media)

    async def download_all(self, request: Request) -> Response:
        """Every track and manifest.json as one ZIP, streamed as it is built (never whole)."""
        job_id = request.path_params["job_id"]
        job = await self._job(request, job_id)  # a gRPC error becomes its HTTP answer (handler below)
        if job.state != common_pb2.JOB_STATE_SUCCEEDED:
            return error_response(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {job_id} is {common_pb2.JobState.Name(job.state)}; the ZIP is ready when it has SUCCEEDED",
            )
        entries = []
        for name, key in self._files(job).items():
            info = await asyncio.to_thread(self.store.stat, key)
            filename = "manifest.json" if name == "manifest" else f"{name}{PurePosixPath(key).suffix}"
            entries.append((filename, key, info.size))
        modified = datetime.now(UTC).replace(tzinfo=None)

        def members() -> Iterator[MemberFile]:
            for filename, key, size in entries:
                yield filename, modified, 0o644, ZIP_AUTO(size, level=1), self.store.iter_chunks(key, _CHUNK)

        stem = PurePosixPath(job.input.name).stem or "audiomesh"
        return StreamingResponse(
            stream_zip(members()),
            media_type="application/zip",
            headers={"Content-Disposition": attachment(f"{stem}_{job_id[:8]}.zip")},
        )

    # --- seed paths and health ----------------------------------------------------------
    async def health(self, request: Request) -> Response:
        names = [s for s in SERVICES]
        statuses = await asyncio.gather(*(self.clients.health(self.settings.address_of(s), timeout=2.0) for s in names))
        services = dict(zip(names, statuses, strict=True))
        ok = all(s == "SERVING" for s in statuses)
        body = {"status": "SERVING" if ok else "NOT_SERVING", "services": services, "version": audiomesh.__version__}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def job_outputs(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = await self._job(request, job_id)  # a gRPC error becomes its HTTP answer (handler below)
        outputs = []
        for track in job.tracks:
            entry = to_json(track)
            entry["url"] = f"/download/{job_id}/{track.name}"
            outputs.append(entry)
        return JSONResponse(
            {
                "jobId": job_id,
                "state": common_pb2.JobState.Name(job.state),
                "outputs": outputs,
                "manifestUrl": f"/download/{job_id}/manifest",
                "zipUrl": f"/download/{job_id}/all",
            }
        )


async def _offer(queue: asyncio.Queue, item: object, call_task: asyncio.Future) -> bool:
    """Queue ``item`` for the upload call; False when the call ended first (refused early:
    nobody reads the queue any more, so a plain ``put`` on a full queue would wait forever)."""
    if call_task.done():
        return False
    if not queue.full():
        queue.put_nowait(item)
        return True
    put = asyncio.ensure_future(queue.put(item))
    try:
        await asyncio.wait({put, call_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not put.done():
            put.cancel()
    return put.done() and not put.cancelled()


def _too_large(limit: int) -> Response:
    return error_response(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"upload exceeds the limit of {limit} bytes (AUDIOMESH_MAX_UPLOAD_BYTES)",
        http_status=413,
    )


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range → (start, length); None when unsatisfiable. Several ranges or a
    malformed header → the whole object, as RFC 9110 allows."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return (0, size)
    first, _, last = spec.strip().partition("-")
    try:
        if not first:  # suffix: the last N bytes
            n = int(last)
            return (max(size - n, 0), min(n, size)) if n > 0 and size > 0 else None
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return (0, size)
    if start >= size or end < start:
        return None
    end = min(end, size - 1)
    return (start, end - start + 1)


class _MultipartUpload:
    """Streams a multipart body: fields before the file are read whole (small, bounded);
    the file part is passed on chunk by chunk."""

    _FIELD_LIMIT = 64 * 1024

    def __init__(self, boundary: bytes) -> None:
        self.filename = ""
        self.options = orchestrator_pb2.JobOptions()
        self._events: list[tuple[str, bytes]] = []
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._name = ""
        self._in_file = False
        self._file_seen = False
        self.file_ended = False
        self._header_field = b""
        self._header_value = b""
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: self._set("_header_field", self._header_field + d[s:e]),
                "on_header_value": lambda d, s, e: self._set("_header_value", self._header_value + d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
            },
        )

    def _set(self, attr: str, value: bytes) -> None:
        setattr(self, attr, value)

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        self._events = []
        try:
            self._parser.write(data)
        except errors.InvalidInput:
            raise
        except Exception as exc:  # the parser's own errors: a malformed body
            raise errors.InvalidInput(f"malformed multipart body: {exc}") from None
        return self._events

    def _part_begin(self) -> None:
        self._headers, self._value = {}, b""

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        self._in_file = self._name == "file"
        if self._in_file:
            if self._file_seen:
                raise errors.InvalidInput("send one 'file' per request")
            self._file_seen = True
            self.filename = params.get(b"filename", b"upload").decode("utf-8", "replace")
            self._events.append(("file-start", b""))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._events.append(("file-data", bytes(data[start:end])))
        else:
            self._value += data[start:end]
            if len(self._value) > self._FIELD_LIMIT:
                raise errors.InvalidInput(f"form field {self._name!r} is longer than {self._FIELD_LIMIT} bytes")

    def _part_end(self) -> None:
        if self._in_file:
            self._events.append(("file-end", b""))
            self._in_file = False
            self.file_ended = True
            return
        if self._file_seen:
            raise errors.InvalidInput(f"form field {self._name!r} must come before the file")
        text = self._value.decode("utf-8", "replace")
        if self._name == "options":
            try:
                json_format.Parse(text or "{}", self.options)
            except json_format.ParseError as exc:
                raise errors.InvalidInput(f"options is not valid JobOptions JSON: {exc}") from None
        elif self._name == "model":
            self.options.model = text.strip()
        else:
            raise errors.InvalidInput(f"unknown form field {self._name!r}; use 'options', 'model' and 'file'")


def create_app(
    settings: Settings,
    *,
    clients: ClientFactory | None = None,
    store: ObjectStore | None = None,
    services: tuple = (ORCHESTRATOR,),
) -> Starlette:
    """The ASGI app; ``services`` are the descriptors whose annotated methods become routes
    (all served at the orchestrator's address)."""
    clients = clients or settings.client_factory()
    gateway = Gateway(settings, clients, store or settings.open_store())
    routes: list = []
    annotated = http_routes(*services)
    # Custom verbs first so `/v1/jobs/{id}:watch` is never read as a job id.
    for route in sorted(annotated, key=lambda r: ":" not in r.template.rsplit("/", 1)[-1]):
        path = route.template
        for param in route.path_params:
            path = path.replace("{" + param + "}", "{" + param + ":seg}")
        routes.append(Route(path, gateway.endpoint(route), methods=[route.verb]))
    by_name = {r.method.name: gateway.endpoint(r) for r in annotated}
    document = openapi_document(annotated)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    async def index(request: Request) -> Response:
        # The page's policy is also in its <meta>; only a header can forbid framing.
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache", **PAGE_HEADERS})

    routes += [
        Route("/v1/jobs:upload", gateway.upload, methods=["POST"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs_endpoint(document), methods=["GET"]),  # the same document, as a page
        # The seed's paths, kept working.
        Route("/config", by_name["GetConfig"], methods=["GET"]),
        Route("/process", gateway.upload, methods=["POST"]),
        Route("/job/{job_id:seg}", by_name["GetJob"], methods=["GET"]),
        Route("/job/{job_id:seg}/outputs", gateway.job_outputs, methods=["GET"]),
        Route("/download/{job_id:seg}/all", gateway.download_all, methods=["GET"]),
        Route("/download/{job_id:seg}/{track:seg}", gateway.download, methods=["GET", "HEAD"]),
        Route("/", index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(RequestMetrics), Middleware(AccessLog)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS"],
                allow_headers=["authorization", "content-type", "x-request-id", "range"],
                expose_headers=["x-request-id", "content-range", "content-disposition"],
            )
        )

    async def rpc_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, grpc.aio.AioRpcError)  # registered for AioRpcError only
        return rpc_error_response(exc)

    async def unexpected(request: Request, exc: Exception) -> Response:
        if isinstance(exc, errors.AudiomeshError):
            code = grpc.StatusCode[exc.code]
            return error_response(code, str(exc), http_status=HTTP_STATUS[code])
        gateway.log.exception("unhandled error", path=request.url.path)
        return error_response(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        code = grpc.StatusCode.UNIMPLEMENTED if status == 405 else grpc.StatusCode.NOT_FOUND
        message = (
            f"{request.method} is not allowed on {request.url.path}"
            if status == 405
            else f"no route {request.url.path}"
        )
        return error_response(code, message, http_status=status)

    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            grpc.aio.AioRpcError: rpc_error,
            Exception: unexpected,
            404: not_found,
            405: not_found,
        },
    )
    app.state.gateway = gateway
    return app


class AccessLog:
    """Request id (from X-Request-ID or new), echoed in the response; the request's SERVER span
    (a child of the caller's W3C traceparent when it sends one), named by its route template;
    one log line per request, in that span, so the line carries the trace id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = logger(component="http")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if given and len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        # Continue the caller's trace (W3C traceparent/tracestate): the spans made for this
        # request, and the gRPC calls they make, join it instead of starting a new one.
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}
        started = time.perf_counter()
        status = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        method = scope["method"]
        # Attached (not only the parent): the caller's baggage stays in the context too.
        token = otel_context.attach(propagate.extract(carrier))
        try:
            await self._traced(scope, receive, send_with_id, method, status, started, request_id)
        finally:
            otel_context.detach(token)

    async def _traced(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        method: str,
        status: list[int],
        started: float,
        request_id: str,
    ) -> None:
        """The request in its SERVER span, and its access line written inside it."""
        with tracer().start_as_current_span(f"HTTP {method}", kind=SpanKind.SERVER) as span:
            try:
                await self.app(scope, receive, send)
            finally:
                route = route_template(scope)  # known once routed; the span's name says it
                if route != "unmatched":
                    span.update_name(f"HTTP {method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.request.method", method)
                span.set_attribute("http.response.status_code", status[0])
                if status[0] >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                self.log.info(
                    "http",
                    method=method,
                    path=scope["path"],
                    status=status[0],
                    duration_ms=round((time.perf_counter() - started) * 1000, 1),
                    request_id=request_id,
                )
