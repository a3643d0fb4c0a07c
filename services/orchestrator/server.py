"""Orchestrator: owns jobs — accepts audio, runs the stage graph, keeps manifests, streams progress."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

import audiomesh
from audiomesh import errors, metrics, ranges
from audiomesh.audio.io import AudioInfo, probe, scan_samples
from audiomesh.auth import ANONYMOUS, current_principal
from audiomesh.config import Settings
from audiomesh.hashing import sha256_chunks
from audiomesh.options import check_job_options, normalization, resolve_encoding
from audiomesh.rpc import Registration, ServiceSpec
from audiomesh.store import ObjectStore, sanitize_filename, validate_key
from audiomesh.telemetry import current_traceparent, logger
from audiomesh.tracks import audio_info_pb
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, separation_pb2

from .cluster import Cluster, cancel_key
from .jobs import JobRecord, JobRegistry, manifest_key, now_pb, upload_key, validate_job_id
from .lease import lease_key
from .runner import Runner

# Recovery retries while the store does not answer: first delay, doubling up to the max.
_RECOVERY_FIRST_DELAY = 0.5
_RECOVERY_MAX_DELAY = 30.0
_THREADS = 32  # the default executor's threads (asyncio's default is cores + 4)


def _principal() -> str:
    return current_principal.get()


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(
        self, settings: Settings, store: ObjectStore, registry: JobRegistry, runner: Runner, cluster: Cluster
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.runner = runner
        self.cluster = cluster
        self.log = logger(component="orchestrator")

    async def _own(self, job_id: str) -> JobRecord:
        """The caller's job, as current as the store has it (any replica may run it): another
        principal's job is NOT_FOUND, exactly like a missing one."""
        rec = await self.registry.lookup(job_id)
        if rec.job.owner != _principal():
            raise errors.NotFound(f"job {job_id!r} not found")
        return rec

    def _admit_job(self) -> None:
        """Bounded queue and per-principal limit, checked before any byte is stored; a stopping
        replica takes no new job (UNAVAILABLE: the client's retry reaches another replica).
        Counted over the jobs this replica has read so far (right after a start, not every
        manifest may be: the limits are a guard against floods, not an exact quota)."""
        if self.cluster.stopping:
            raise errors.Unavailable("this orchestrator is stopping; retry (another replica takes the job)")
        active = [r for r in self.registry.records.values() if not r.terminal]
        mine = sum(1 for r in active if r.job.owner == _principal())
        if mine >= self.settings.max_active_jobs_per_principal:
            raise errors.ResourceExhausted(
                f"you have {mine} jobs queued or running (limit {self.settings.max_active_jobs_per_principal}); "
                "retry when one has finished",
                retry_after=30.0,
            )
        queued = sum(1 for r in active if r.job.state == common_pb2.JOB_STATE_QUEUED)
        if queued >= self.settings.max_queued_jobs:
            raise errors.ResourceExhausted(f"the queue is full ({queued} jobs waiting); retry later", retry_after=60.0)

    def _check_key_access(self, key: str) -> None:
        """With API keys, a job may only read its owner's objects: jobs/<own job>/…, its own
        uploads (uploads/<principal>/…) or incoming/<principal>/…. (Open mode: any key.)"""
        principal = _principal()
        if principal == ANONYMOUS:
            return
        parts = key.split("/")
        if len(parts) >= 3 and parts[0] == "jobs":
            rec = self.registry.records.get(parts[1])
            if rec is not None and rec.job.owner == principal:
                return
        elif len(parts) >= 3 and parts[0] in ("incoming", "uploads") and parts[1] == principal:
            return
        raise errors.NotFound(f"no object with key {key!r} in the store")

    # --- creating jobs -----------------------------------------------------------------
    async def UploadAudio(
        self, request_iterator: AsyncIterator[orchestrator_pb2.UploadAudioRequest], context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.UploadAudioResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("metadata"):
            raise errors.InvalidInput("the first UploadAudio message must carry metadata (filename, options)")
        meta = first.metadata
        if meta.create_job:
            self._admit_job()
        limit = self.settings.max_upload_bytes
        if meta.size_bytes < 0:
            raise errors.InvalidInput(f"size_bytes must be >= 0 (0 = not announced), got {meta.size_bytes}")
        if meta.size_bytes > limit:
            raise errors.TooLarge(f"upload of {meta.size_bytes} bytes exceeds the limit of {limit} bytes")
        job_id = str(uuid.uuid4())
        name = sanitize_filename(meta.filename or "input")
        options = await self._resolve_options(meta.options) if meta.create_job else meta.options
        # Without a job, the upload is stored under its owner (CreateJob checks it, retention
        # removes it if no job ever uses it); with one, it is the job's input. Both keys are new
        # (a fresh UUID), so streaming into the final key overwrites nothing, and a job folder
        # without a manifest is not a job yet (JobRegistry.discover skips it).
        key = f"jobs/{job_id}/input/{name}" if meta.create_job else upload_key(_principal(), name)
        # The chunks stream straight into the store (multipart on S3; no local spool), counted
        # against the limit and hashed on the way; the stored object is then checked in place.
        # Anything refused is deleted: no object stays behind.
        pump = _UploadPump(request_iterator, asyncio.get_running_loop(), limit)
        stored = False
        try:
            put = asyncio.ensure_future(
                asyncio.to_thread(self.store.put_stream, key, pump, max_bytes=limit, content_type=_UPLOAD_TYPE)
            )
            try:
                await asyncio.shield(put)
            except asyncio.CancelledError:
                pump.abort()  # the put ends at its next chunk and removes what it wrote
                with contextlib.suppress(BaseException):
                    await put
                # A cancelled call's stream may also just end: then the put completed with a cut-off upload.
                await self._discard(key)
                raise
            stored = True
            job_input = await self._inspect(key, name, pump.size, pump.sha256.hexdigest())
        except BaseException:
            if stored:
                await self._discard(key)
            raise
        size = pump.size
        response = orchestrator_pb2.UploadAudioResponse(input_key=key, size_bytes=size)
        if meta.create_job:
            try:
                response.job.CopyFrom(await self._create(job_id, job_input, options))
            except BaseException:  # e.g. this replica began stopping: the job was never created
                await self._discard(key)
                raise
        return response

    async def CreateJob(
        self, request: orchestrator_pb2.CreateJobRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.CreateJobResponse:
        if not request.input_key:
            raise errors.InvalidInput("input_key is required")
        validate_key(request.input_key)
        self._check_key_access(request.input_key)
        self._admit_job()
        options = await self._resolve_options(request.options)
        info = await asyncio.to_thread(self.store.stat, request.input_key)  # NotFound names the key
        if info.size > self.settings.max_upload_bytes:
            raise errors.TooLarge(
                f"{request.input_key} is {info.size} bytes; the limit is {self.settings.max_upload_bytes}"
            )
        # Checked in place in the store (range reads), not downloaded to scratch.
        job_input = await self._inspect(request.input_key, sanitize_filename(Path(request.input_key).name), info.size)
        job = await self._create(str(uuid.uuid4()), job_input, options)
        return orchestrator_pb2.CreateJobResponse(job=job)

    async def _inspect(self, key: str, name: str, size: int, sha256: str | None = None) -> orchestrator_pb2.JobInput:
        """Check the stored object ``key`` as a job input, reading it in place (range reads with
        read-ahead; ``audio.io`` copies it to scratch only for a format that needs ffmpeg), and
        describe it; ``sha256`` if the caller hashed it already, else one more sequential read."""
        if size == 0:
            raise errors.InvalidInput(f"{name}: the file is empty (0 bytes)")
        limits = self.settings

        def check() -> tuple[AudioInfo, str]:
            with self.store.open_seekable(key) as f:
                info = probe(f, name=name)
                if info.channels > limits.max_channels:
                    raise errors.InvalidInput(
                        f"{name}: {info.channels} channels; at most {limits.max_channels} are accepted"
                    )
                if not limits.min_sample_rate <= info.sample_rate <= limits.max_sample_rate:
                    raise errors.InvalidInput(
                        f"{name}: sample rate {info.sample_rate} Hz is outside "
                        f"{limits.min_sample_rate}–{limits.max_sample_rate} Hz"
                    )
                if info.duration_s < limits.min_duration_seconds:
                    raise errors.InvalidInput(
                        f"{name}: {info.duration_s:.3f} s of audio is too short; at least "
                        f"{limits.min_duration_seconds:g} s"
                    )
                scan_samples(f, name=name)  # NaN/Inf and damage refused before a job uses it
            if info.duration_s > limits.max_duration_seconds:
                raise errors.InvalidInput(
                    f"{name}: {info.duration_s:.0f} s of audio exceeds the limit of {limits.max_duration_seconds:.0f} s"
                )
            return info, sha256 or sha256_chunks(self.store.iter_chunks(key))

        info, digest = await asyncio.to_thread(check)
        return orchestrator_pb2.JobInput(key=key, name=name, sha256=digest, size_bytes=size, audio=audio_info_pb(info))

    async def _discard(self, key: str) -> None:
        """Delete a refused upload (shielded: it completes even if the call is being cancelled)."""
        try:
            await asyncio.shield(asyncio.to_thread(self.store.delete, key))
        except Exception as exc:  # noqa: BLE001 - the refusal is what the caller must see
            self.log.warning("could not delete a refused upload; retention removes it", key=key, reason=str(exc))

    async def _resolve_options(self, options: orchestrator_pb2.JobOptions) -> orchestrator_pb2.JobOptions:
        """Fill defaults and check the options against the model before anything is stored."""
        resolved = orchestrator_pb2.JobOptions()
        resolved.CopyFrom(options)
        if not resolved.model:
            resolved.model = self.settings.default_model
        resolve_encoding(resolved, self.settings)  # the configured encoding; MP3's default bitrate
        # Check everything now so bad options, unknown models, stems and recipes fail the
        # request, not the job minutes later.
        check_job_options(resolved)  # every range in audiomesh.ranges, then the model's own rules
        normalization(resolved.normalize, self.settings)
        probe_job = orchestrator_pb2.Job(job_id="00000000-0000-4000-8000-000000000000", options=resolved)
        try:
            # Checked against the models the separation workers last listed when none answers now.
            await self.runner.plan(probe_job, or_last_known=True)
        except errors.Unavailable as exc:
            # No separation worker yet (scaled to zero: KEDA starts one when jobs queue; or still
            # starting): queue the job; the model is checked when it starts (_plan_when_reachable).
            logger().warning("separation unreachable: the job's model is checked when it starts", error=str(exc))
        return resolved

    async def _create(
        self, job_id: str, job_input: orchestrator_pb2.JobInput, options: orchestrator_pb2.JobOptions
    ) -> orchestrator_pb2.Job:
        job = orchestrator_pb2.Job(
            job_id=job_id,
            state=common_pb2.JOB_STATE_QUEUED,
            create_time=now_pb(),
            input=job_input,
            options=options,
            manifest_key=manifest_key(job_id),
            owner=_principal(),
            trace_parent=current_traceparent(),  # every run of the job joins this call's trace
        )
        if self.cluster.stopping:  # the upload took a while: no new job on a replica that is stopping now
            raise errors.Unavailable("this orchestrator is stopping; retry (another replica takes the job)")
        lease = await self.cluster.claim_new(job_id)
        rec = await self.registry.add(
            job, f"job created from {job_input.name} ({job_input.size_bytes} bytes) on {lease.label}", lease
        )
        if not rec.owned:  # the lease expired before the first manifest write (a stalled replica)
            self.registry.records.pop(job_id, None)
            await asyncio.to_thread(self.store.delete, lease_key(job_id))
            raise errors.Unavailable("this orchestrator is overloaded: the job was not created; retry")
        metrics.JOBS_CREATED.inc()
        self.cluster.run(rec)
        return rec.snapshot

    # --- reading jobs ------------------------------------------------------------------
    async def GetJob(
        self, request: orchestrator_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.GetJobResponse:
        return orchestrator_pb2.GetJobResponse(job=(await self._own(request.job_id)).snapshot)

    async def ListJobs(
        self, request: orchestrator_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.ListJobsResponse:
        ranges.check("page_size", request.page_size, ranges.PAGE_SIZE)
        await self.registry.require_loaded()
        size = request.page_size or ranges.DEFAULT_PAGE_SIZE
        after = _decode_token(request.page_token)
        # A cursor, not an offset (AIP-158): the page starts strictly after the last job of the
        # previous one in (create_time, job_id) descending order, so jobs created or deleted
        # between calls neither shift nor repeat items.
        records = [
            r
            for r in self.registry.newest_first()
            if r.job.owner == _principal() and (after is None or _position(r.job) < after)
        ]
        page = records[:size]
        token = _encode_token(_position(page[-1].job)) if len(records) > size else ""
        return orchestrator_pb2.ListJobsResponse(jobs=[r.snapshot for r in page], next_page_token=token)

    async def WatchJob(
        self, request: orchestrator_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.WatchJobResponse]:
        await self._own(request.job_id)
        async for job in self.registry.watch(request.job_id):
            yield orchestrator_pb2.WatchJobResponse(job=job)

    # --- changing jobs -----------------------------------------------------------------
    async def CancelJob(
        self, request: orchestrator_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.CancelJobResponse:
        rec = await self._own(request.job_id)
        await self._cancel(rec)
        return orchestrator_pb2.CancelJobResponse(job=rec.snapshot)

    async def RetryJob(
        self, request: orchestrator_pb2.RetryJobRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.RetryJobResponse:
        rec = await self._own(request.job_id)
        _check_retryable(rec)
        await _until_released(rec)  # its last run still gives the lease up: a new run must not lose it
        if self.cluster.stopping:
            raise errors.Unavailable("this orchestrator is stopping; retry (another replica runs the job)")
        # Whoever retries runs the job: take its lease (released when it ended; a holder that
        # died before releasing it frees it after a TTL), then check again on the fresh manifest.
        if not rec.owned and not await self.cluster.take(rec, wait=self.cluster.ttl + 1):
            raise errors.Unavailable(f"job {request.job_id} is held by another orchestrator; retry in a few seconds")
        try:
            _check_retryable(rec)
        except errors.FailedPrecondition:
            await self.cluster.release(rec)
            raise
        await asyncio.to_thread(self.store.delete, cancel_key(rec.job.job_id))  # an old request must not stop it
        self.runner.reset_for_retry(rec)
        await self.registry.changed(rec, f"job retried on {self.cluster.replica}; nodes that succeeded will be reused")
        if rec.owned:
            self.cluster.run(rec)
        return orchestrator_pb2.RetryJobResponse(job=rec.snapshot)

    async def DeleteJob(
        self, request: orchestrator_pb2.DeleteJobRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.DeleteJobResponse:
        rec = await self._own(request.job_id)
        await self._cancel(rec)
        if not rec.terminal:
            raise errors.FailedPrecondition(f"job {request.job_id} is still stopping; delete it again in a few seconds")
        # A write that would land in the folder after the delete (CI saw the folder come back).
        await _until_released(rec)
        count = await self.registry.delete(request.job_id)
        return orchestrator_pb2.DeleteJobResponse(deleted_objects=count)

    # --- facts -------------------------------------------------------------------------
    async def GetConfig(
        self, request: orchestrator_pb2.GetConfigRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.GetConfigResponse:
        config = struct_pb2.Struct()
        config.update(self.settings.public_dict())
        return orchestrator_pb2.GetConfigResponse(config=config, version=audiomesh.__version__)

    async def ListModels(
        self, request: separation_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> separation_pb2.ListModelsResponse:
        return await self.runner.list_models()

    async def _cancel(self, rec: JobRecord) -> None:
        """Cancel a job and wait (bounded) until it is marked CANCELLED: here if this replica runs
        it, else through a request its holder acts on (or whoever takes it over next)."""
        if rec.terminal:
            return
        if not rec.owned:
            await self.cluster.request_cancel(rec)  # returns when it ended, or when this replica took it over
        if rec.owned and rec.task is not None and not rec.terminal:
            rec.task.cancel()
            # Cancelling the task cancels the workers' calls; they stop within one chunk.
            await _until_done(rec.task)


async def _until_done(task: asyncio.Task | None) -> None:
    """Wait (30 s at most) for a job's runner task to end; how it ended is its own business (logged there)."""
    if task is not None and not task.done():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(task), timeout=30)


async def _until_released(rec: JobRecord) -> None:
    """An ended job whose runner here is still finishing (writing its end, releasing its lease):
    wait for it. Bounded: a release waits for at most one renewal and one PUT."""
    if rec.terminal:
        await _until_done(rec.task)


def _check_retryable(rec: JobRecord) -> None:
    if rec.job.state not in (common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED):
        state = common_pb2.JobState.Name(rec.job.state)
        raise errors.FailedPrecondition(
            f"job {rec.job.job_id} is {state}; only FAILED or CANCELLED jobs can be retried"
        )


_UPLOAD_TYPE = "application/octet-stream"
#: Bytes of upload messages handed to the storing thread at a time.
_PUMP_BATCH = 1 << 20


class _UploadPump:
    """The chunks of an UploadAudio stream as a blocking iterable, for ``store.put_stream`` in a
    worker thread: each ``next()`` pulls one message on the event loop. Counts bytes against the
    limit and hashes them (sha256) on the way."""

    def __init__(
        self,
        requests: AsyncIterator[orchestrator_pb2.UploadAudioRequest],
        loop: asyncio.AbstractEventLoop,
        limit: int,
    ) -> None:
        self._requests = requests
        self._loop = loop
        self._limit = limit
        self._pending: concurrent.futures.Future | None = None
        self._aborted = False
        self.size = 0
        self.sha256 = hashlib.sha256()

    async def _next(self) -> tuple[bytes, bool]:
        """Up to about _PUMP_BATCH bytes of messages (one thread hop each, not one per message),
        and whether the stream ended."""
        parts: list[bytes] = []
        size = 0
        while size < _PUMP_BATCH:
            msg = await anext(self._requests, None)
            if msg is None:
                return b"".join(parts), True
            if msg.HasField("metadata"):
                raise errors.InvalidInput("metadata may only be sent in the first message")
            parts.append(msg.chunk)
            size += len(msg.chunk)
        return b"".join(parts), False

    def __iter__(self) -> Iterator[bytes]:
        ended = False
        while not ended:
            if self._aborted:
                raise errors.Cancelled("the upload call ended before its last chunk")
            self._pending = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
            try:
                chunk, ended = self._pending.result()
            except concurrent.futures.CancelledError:
                raise errors.Cancelled("the upload call ended before its last chunk") from None
            self.size += len(chunk)
            if self.size > self._limit:
                raise errors.TooLarge(f"upload exceeds the limit of {self._limit} bytes")
            self.sha256.update(chunk)
            yield chunk

    def abort(self) -> None:
        """From the event loop: make the thread's pending and next pulls raise Cancelled."""
        self._aborted = True
        if self._pending is not None:
            self._pending.cancel()


def _position(job: orchestrator_pb2.Job) -> tuple[int, str]:
    """A job's place in ListJobs' order (newest first: both fields descending)."""
    return job.create_time.ToNanoseconds(), job.job_id


def _encode_token(position: tuple[int, str]) -> str:
    """Opaque to clients: base64url (unpadded) of a small JSON cursor."""
    raw = json.dumps({"v": 1, "t": position[0], "id": position[1]}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[int, str] | None:
    if not token:
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        position = doc["t"], doc["id"]
        if doc.get("v") != 1 or type(position[0]) is not int or position[0] < 0:
            raise ValueError
        validate_job_id(position[1])
    except (ValueError, TypeError, KeyError, errors.InvalidInput):  # binascii.Error is a ValueError
        raise errors.InvalidInput("page_token is not a token returned by ListJobs") from None
    return position


def build(settings: Settings, *, store: ObjectStore | None = None) -> ServiceSpec:
    """The orchestrator; ``store`` replaces the configured one (tests). Nothing here contacts
    the store: recovery does, with backoff, before the service reports SERVING."""
    store = store or settings.open_store(create_bucket=False)
    registry = JobRegistry(store, settings.public_dict(), outage_budget=settings.unavailable_budget_seconds)
    runner = Runner(settings, store, registry, settings.client_factory(as_service=True))
    cluster = Cluster(settings, store, registry, runner)
    servicer = OrchestratorServicer(settings, store, registry, runner, cluster)
    background: list[asyncio.Task] = []
    # Scrape-time gauges (jobs, nodes backlog per stage, leases); registered while serving.
    gauges = metrics.JobsCollector(registry.gauges)

    async def sweep_forever() -> None:
        interval = max(60.0, min(3600.0, settings.retention_hours * 360))
        while True:
            try:
                await registry.sweep(settings.retention_hours)
            except Exception as exc:  # noqa: BLE001 - a store outage must not end the sweeper
                registry.log.warning("retention sweep failed; next one as scheduled", reason=str(exc))
            await asyncio.sleep(interval)

    stopping = asyncio.Event()

    async def retry_until_stopped(what: str, action: Callable[[], Awaitable[Any]]) -> Any:
        """``action()`` until it succeeds (0.5 s doubling to 30 s between tries, for as long as the
        store does not answer); CancelledError if the orchestrator stops first."""
        delay, attempt = _RECOVERY_FIRST_DELAY, 0
        while not stopping.is_set():
            attempt += 1
            try:
                return await action()
            except Exception as exc:  # noqa: BLE001 - any failure is retried; giving up would stay stuck
                registry.log.warning(what, attempt=attempt, retry_in_s=delay, reason=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            delay = min(delay * 2, _RECOVERY_MAX_DELAY)
        raise asyncio.CancelledError

    async def recover() -> None:
        """Warm-up: SERVING as soon as the store answers (opening it the usual way creates a
        missing S3 bucket), however many jobs it holds. Then, in the background: read every
        manifest (16 at a time; until then ListJobs answers UNAVAILABLE, while a job asked for by
        id is read on demand), start the cluster scan — which takes over unfinished jobs whose
        lease was released or went silent for a TTL, this replica's own from before a restart
        included — and the retention sweeper."""
        # Uploads hold a thread each for as long as they stream: room for many at once.
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="orchestrator")
        )
        metrics.register_collector(gauges)
        await retry_until_stopped(
            "the store did not answer; NOT_SERVING, retrying",
            lambda: asyncio.to_thread(lambda: settings.open_store().close()),
        )
        background.append(asyncio.ensure_future(load_and_scan()))

    async def load_and_scan() -> None:
        started = time.monotonic()
        unfinished = await retry_until_stopped("jobs not loaded: the store did not answer; retrying", registry.load_all)
        # Every job is queryable after a restart; unfinished ones run again from their manifest,
        # here or on a peer: whichever takes the lease first (the first scan runs at once).
        cluster.start_scanning()  # first: a failed first scan below must not leave it off
        try:
            taken = await cluster.scan_once()
        except Exception as exc:  # noqa: BLE001 - the scanner tries again in a second or two
            registry.log.warning("first cluster scan failed; the scanner goes on", reason=str(exc))
            taken = 0
        registry.log.info(
            "jobs loaded from the store",
            jobs=len(registry.records),
            unfinished=len(unfinished),
            taken_over=taken,
            replica=cluster.replica,
            seconds=round(time.monotonic() - started, 2),
        )
        background.append(asyncio.ensure_future(sweep_forever()))

    async def stop() -> None:
        stopping.set()
        try:
            await registry.close_watchers()
            for task in background:
                task.cancel()
            await cluster.stop()
        finally:
            # After the hand-off: a scrape while draining still sees the jobs and nodes held.
            metrics.unregister_collector(gauges)  # in-process replicas (tests) come and go

    return ServiceSpec(
        registrations=[
            Registration(
                orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server,
                servicer,
                orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name,
            )
        ],
        warmup=recover,
        on_stop=stop,
    )
