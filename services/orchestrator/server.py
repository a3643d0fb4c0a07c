"""Orchestrator: owns jobs — accepts audio, runs the stage graph, keeps manifests, streams progress."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.protobuf import struct_pb2

import audiomesh
from audiomesh import errors, ranges, scratch
from audiomesh.audio.io import file_sha256, probe, scan_samples
from audiomesh.auth import ANONYMOUS, current_principal
from audiomesh.config import Settings
from audiomesh.options import check_job_options, normalization
from audiomesh.rpc import Registration, ServiceSpec
from audiomesh.store import ObjectStore, sanitize_filename, validate_key
from audiomesh.telemetry import logger
from audiomesh.tracks import audio_info_pb
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, separation_pb2

from .jobs import JobRecord, JobRegistry, manifest_key, now_pb, upload_key, validate_job_id
from .runner import Runner

# Recovery retries while the store does not answer: first delay, doubling up to the max.
_RECOVERY_FIRST_DELAY = 0.5
_RECOVERY_MAX_DELAY = 30.0


def _principal() -> str:
    return current_principal.get()


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self, settings: Settings, store: ObjectStore, registry: JobRegistry, runner: Runner) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.runner = runner
        self.log = logger(component="orchestrator")

    def _own(self, job_id: str) -> JobRecord:
        """The caller's job: another principal's job is NOT_FOUND, exactly like a missing one."""
        self.registry.require_loaded()
        rec = self.registry.get(job_id)
        if rec.job.owner != _principal():
            raise errors.NotFound(f"job {job_id!r} not found")
        return rec

    def _admit_job(self) -> None:
        """Bounded queue and per-principal limit, checked before any byte is stored."""
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
        self.registry.require_loaded()
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
        # Spool to a local temp file while counting bytes: nothing is stored before the
        # whole upload arrived, fits the limit and decodes as audio.
        fd, spool = tempfile.mkstemp(prefix="upload-", dir=scratch.process_dir())
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for msg in request_iterator:
                    if msg.HasField("metadata"):
                        raise errors.InvalidInput("metadata may only be sent in the first message")
                    size += len(msg.chunk)
                    if size > limit:
                        raise errors.TooLarge(f"upload exceeds the limit of {limit} bytes")
                    out.write(msg.chunk)
            job_input = await self._inspect(Path(spool), name, size)
            # Without a job, the upload is stored under its owner (CreateJob checks it, retention
            # removes it if no job ever uses it); with one, it is the job's input.
            key = f"jobs/{job_id}/input/{name}" if meta.create_job else upload_key(_principal(), name)
            job_input.key = key
            await asyncio.to_thread(self.store.put_file, key, spool)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool)
        response = orchestrator_pb2.UploadAudioResponse(input_key=key, size_bytes=size)
        if meta.create_job:
            response.job.CopyFrom(await self._create(job_id, job_input, options))
        return response

    async def CreateJob(
        self, request: orchestrator_pb2.CreateJobRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.CreateJobResponse:
        self.registry.require_loaded()
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
        with scratch.workdir("create-") as tmp:
            local = Path(tmp) / "input"
            await asyncio.to_thread(self.store.get_to_file, request.input_key, local)
            job_input = await self._inspect(local, sanitize_filename(Path(request.input_key).name), info.size)
        job_input.key = request.input_key
        job = await self._create(str(uuid.uuid4()), job_input, options)
        return orchestrator_pb2.CreateJobResponse(job=job)

    async def _inspect(self, path: Path, name: str, size: int) -> orchestrator_pb2.JobInput:
        if size == 0:
            raise errors.InvalidInput(f"{name}: the file is empty (0 bytes)")
        info = await asyncio.to_thread(lambda: probe(path, name=name))
        limits = self.settings
        if info.channels > limits.max_channels:
            raise errors.InvalidInput(f"{name}: {info.channels} channels; at most {limits.max_channels} are accepted")
        if not limits.min_sample_rate <= info.sample_rate <= limits.max_sample_rate:
            raise errors.InvalidInput(
                f"{name}: sample rate {info.sample_rate} Hz is outside {limits.min_sample_rate}–{limits.max_sample_rate} Hz"
            )
        if info.duration_s < limits.min_duration_seconds:
            raise errors.InvalidInput(
                f"{name}: {info.duration_s:.3f} s of audio is too short; at least {limits.min_duration_seconds:g} s"
            )
        await asyncio.to_thread(lambda: scan_samples(path, name=name))  # NaN/Inf refused before storing
        if info.duration_s > self.settings.max_duration_seconds:
            raise errors.InvalidInput(
                f"{name}: {info.duration_s:.0f} s of audio exceeds the limit of {self.settings.max_duration_seconds:.0f} s"
            )
        return orchestrator_pb2.JobInput(
            name=name, sha256=await asyncio.to_thread(file_sha256, path), size_bytes=size, audio=audio_info_pb(info)
        )

    async def _resolve_options(self, options: orchestrator_pb2.JobOptions) -> orchestrator_pb2.JobOptions:
        """Fill defaults and check the options against the model before anything is stored."""
        resolved = orchestrator_pb2.JobOptions()
        resolved.CopyFrom(options)
        if not resolved.model:
            resolved.model = self.settings.default_model
        if not resolved.encoding:
            from audiomesh.tracks import encoding_by_name

            resolved.encoding = encoding_by_name(self.settings.output_encoding)
        if resolved.encoding not in common_pb2.AudioEncoding.values():
            raise errors.InvalidInput(f"unknown encoding {resolved.encoding}")
        # Check everything now so bad options, unknown models, stems and recipes fail the
        # request, not the job minutes later.
        check_job_options(resolved)  # every range in audiomesh.ranges, then the model's own rules
        normalization(resolved.normalize, self.settings)
        probe_job = orchestrator_pb2.Job(job_id="00000000-0000-4000-8000-000000000000", options=resolved)
        await self.runner.plan(probe_job)
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
        )
        rec = await self.registry.add(job, f"job created from {job_input.name} ({job_input.size_bytes} bytes)")
        self.runner.start(rec)
        return rec.job

    # --- reading jobs ------------------------------------------------------------------
    async def GetJob(
        self, request: orchestrator_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.GetJobResponse:
        return orchestrator_pb2.GetJobResponse(job=self._own(request.job_id).job)

    async def ListJobs(
        self, request: orchestrator_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.ListJobsResponse:
        self.registry.require_loaded()
        ranges.check("page_size", request.page_size, ranges.PAGE_SIZE)
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
        return orchestrator_pb2.ListJobsResponse(jobs=[r.job for r in page], next_page_token=token)

    async def WatchJob(
        self, request: orchestrator_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.WatchJobResponse]:
        self._own(request.job_id)
        async for job in self.registry.watch(request.job_id):
            yield orchestrator_pb2.WatchJobResponse(job=job)

    # --- changing jobs -----------------------------------------------------------------
    async def CancelJob(
        self, request: orchestrator_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.CancelJobResponse:
        rec = self._own(request.job_id)
        await _cancel(rec)
        return orchestrator_pb2.CancelJobResponse(job=rec.job)

    async def RetryJob(
        self, request: orchestrator_pb2.RetryJobRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.RetryJobResponse:
        rec = self._own(request.job_id)
        if rec.job.state not in (common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED):
            state = common_pb2.JobState.Name(rec.job.state)
            raise errors.FailedPrecondition(
                f"job {request.job_id} is {state}; only FAILED or CANCELLED jobs can be retried"
            )
        self.runner.retry(rec)
        await self.registry.changed(rec, "job retried; nodes that succeeded will be reused")
        return orchestrator_pb2.RetryJobResponse(job=rec.job)

    async def DeleteJob(
        self, request: orchestrator_pb2.DeleteJobRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.DeleteJobResponse:
        await _cancel(self._own(request.job_id))
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


async def _cancel(rec: JobRecord) -> None:
    """Cancel a running job and wait (bounded) until the runner has marked it CANCELLED."""
    if not rec.terminal and rec.task is not None:
        rec.task.cancel()
        # Cancelling the task cancels the workers' calls; they stop within one chunk.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(rec.task), timeout=30)


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
    servicer = OrchestratorServicer(settings, store, registry, runner)
    background: list[asyncio.Task] = []

    async def sweep_forever() -> None:
        interval = max(60.0, min(3600.0, settings.retention_hours * 360))
        while True:
            try:
                await registry.sweep(settings.retention_hours)
            except Exception as exc:  # noqa: BLE001 - a store outage must not end the sweeper
                registry.log.warning("retention sweep failed; next one as scheduled", reason=str(exc))
            await asyncio.sleep(interval)

    stopping = asyncio.Event()

    async def recover() -> None:
        """Recovery, awaited as warm-up so health stays NOT_SERVING until it is done: load every
        manifest (retried with backoff, 0.5 s doubling to 30 s, for as long as the store does
        not answer), resume unfinished jobs, then start the retention sweeper. Until then job
        RPCs answer UNAVAILABLE (``JobRegistry.require_loaded``)."""
        log = registry.log
        delay, attempt, started = _RECOVERY_FIRST_DELAY, 0, time.monotonic()
        while True:
            attempt += 1
            try:
                # Opening the store the usual way is the first call that needs an answer (an S3
                # bucket is created if missing); then every manifest, all or nothing.
                await asyncio.to_thread(lambda: settings.open_store().close())
                unfinished = await registry.load_all()
                break
            except Exception as exc:  # noqa: BLE001 - any failure is retried; giving up would stay NOT_SERVING
                log.warning(
                    "jobs not loaded: the store did not answer; NOT_SERVING, retrying",
                    attempt=attempt,
                    retry_in_s=delay,
                    reason=str(exc),
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            if stopping.is_set():
                raise asyncio.CancelledError  # stopped before the store answered: never SERVING
            delay = min(delay * 2, _RECOVERY_MAX_DELAY)
        if stopping.is_set():
            raise asyncio.CancelledError
        registry.loaded = True
        # Every job is queryable after a restart; unfinished ones run again from their manifest.
        for rec in unfinished:
            log.info("resuming job", job_id=rec.job.job_id, state=common_pb2.JobState.Name(rec.job.state))
            runner.start(rec)
        log.info(
            "recovery done: jobs loaded from the store; SERVING",
            jobs=len(registry.records),
            resumed=len(unfinished),
            attempts=attempt,
            seconds=round(time.monotonic() - started, 2),
        )
        background.append(asyncio.ensure_future(sweep_forever()))

    async def stop() -> None:
        stopping.set()
        await registry.close_watchers()
        for task in background:
            task.cancel()
        await runner.shutdown()

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
