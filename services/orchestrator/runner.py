"""Runs a job's stage graph on the workers.

A node starts as soon as its dependencies succeeded; independent nodes run concurrently
(bounded per job). Retryable failures (worker gone, busy, internal error) are retried with
backoff; a request the worker refuses (bad input, unknown model) fails the job at once.
Cancelling the job's task cancels the in-flight gRPC calls, which stops the workers.
On resume, nodes that succeeded and whose outputs still exist are reused.

When several separation workers can take work, a job's separation is split into parts
(graph.py: ``separation:part{i}of{K}`` + ``stitch``), chosen once when the job is first planned
(:meth:`Runner.choose_parts`) and kept in ``Job.separation_parts``: the parts are nodes like any
other (each retried alone, reused on resume), and the round-robin channel spreads them over the
workers (a busy one answers RESOURCE_EXHAUSTED and the part waits for a free slot).
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from audiomesh import errors, manifest, metrics, scratch
from audiomesh.audio.io import decode_blocks
from audiomesh.audio.stream import TrackWriter
from audiomesh.config import Settings
from audiomesh.dsp.hpss import block_count
from audiomesh.options import check_model_options, hpss_kwargs, separation_options
from audiomesh.rpc import ClientFactory, status_of
from audiomesh.rpc.server import LEASE_HEADER, NODE_HEADER
from audiomesh.store import ObjectStore
from audiomesh.telemetry import job_span, logger, tracer
from audiomesh.tracks import ENCODINGS, INTERMEDIATE, Outputs, extension
from audiomesh.v1 import (
    common_pb2,
    composite_pb2_grpc,
    hpss_pb2_grpc,
    normalize_pb2_grpc,
    orchestrator_pb2,
    separation_pb2,
    separation_pb2_grpc,
)

from .graph import LOCAL_STAGE, MAX_HPSS_PARTS, MAX_SEPARATION_PARTS, DecodeRequest, Plan, make_plan, overall_fraction
from .jobs import JobRecord, JobRegistry, now_pb
from .lease import Lease

# Retried up to node_attempts times (UNAVAILABLE: for unavailable_budget_seconds instead;
# RESOURCE_EXHAUSTED without a reason means "busy" and waits without using attempts).
_RETRYABLE_CODES = {"RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN", "ABORTED", "DEADLINE_EXCEEDED"}
_OUTCOMES = {
    common_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    common_pb2.JOB_STATE_FAILED: "failed",
    common_pb2.JOB_STATE_CANCELLED: "cancelled",
}
# Failures that repeat on every attempt: the same request needs the same memory / bytes.
_FINAL_REASONS = {"OUT_OF_MEMORY", "TOO_LARGE"}
# The chunk length assumed when neither the job nor the model names one (Demucs v4's segment).
DEFAULT_SEGMENT_SECONDS = 7.8
# How long a resolved dns:/// separation address's worker count is reused.
_WORKERS_TTL_SECONDS = 10.0
# Samples a stem may have fewer than the upload's duration says (resampling rounds): ~23 ms.
_BLOCK_ESTIMATE_SLACK = 1024


@dataclass(frozen=True)
class _Rpc:
    """How the runner calls a worker stage; the request and outputs come from the graph's nodes."""

    stub: type  # the generated stub class; the worker's address is Settings.address_of(stage)
    method: str
    streams: bool  # a server stream of progress messages, then one result


_RPCS: dict[str, _Rpc] = {
    "separation": _Rpc(separation_pb2_grpc.SeparationServiceStub, "Separate", streams=True),
    "stitch": _Rpc(separation_pb2_grpc.SeparationServiceStub, "Stitch", streams=True),
    "hpss": _Rpc(hpss_pb2_grpc.HpssServiceStub, "Decompose", streams=True),
    "composite": _Rpc(composite_pb2_grpc.CompositeServiceStub, "Composite", streams=False),
    "normalize": _Rpc(normalize_pb2_grpc.NormalizeServiceStub, "Normalize", streams=False),
}


def retryable(err: errors.AudiomeshError) -> bool:
    """Whether a failed attempt (not UNAVAILABLE, which has its own time budget) may be retried."""
    return err.code in _RETRYABLE_CODES and err.reason not in _FINAL_REASONS


class NodeFailed(Exception):
    def __init__(self, node: str, code: str, message: str) -> None:
        super().__init__(message)
        self.node, self.code, self.message = node, code, message


class Runner:
    def __init__(self, settings: Settings, store: ObjectStore, registry: JobRegistry, clients: ClientFactory) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.clients = clients
        # 0: no cap here; the workers' capacity bounds the work (busy ones answer RESOURCE_EXHAUSTED).
        self.job_slots = asyncio.Semaphore(settings.max_running_jobs) if settings.max_running_jobs else None
        self.shutting_down = False
        self._models: separation_pb2.ListModelsResponse | None = None  # the last ListModels answer
        self._workers: dict[str, tuple[int, float]] = {}  # target → (workers, monotonic time) last counted
        # Gives up a job's lease when it ended or was handed off (cluster.Cluster.release).
        self.release: Callable[[JobRecord], Awaitable[None]] | None = None

    async def shutdown(self) -> None:
        """Hand every running job over: stop it without marking it cancelled, write its state,
        release its lease; another orchestrator (or this one after a restart) resumes it."""
        self.shutting_down = True
        tasks = [r.task for r in self.registry.records.values() if r.task and not r.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- model facts -------------------------------------------------------------------
    async def list_models(self, *, or_last_known: bool = False) -> separation_pb2.ListModelsResponse:
        """The separation workers' models. ``or_last_known``: when none answers (scaled to zero,
        restarting), the last answer this orchestrator had, if any (Unavailable otherwise)."""
        stub = self.clients.stub(separation_pb2_grpc.SeparationServiceStub, self.settings.separation_addr)
        try:
            models = await stub.ListModels(separation_pb2.ListModelsRequest(), timeout=30)
        except grpc.aio.AioRpcError as exc:
            err = status_of(exc)
            if or_last_known and isinstance(err, errors.Unavailable) and self._models is not None:
                return self._models
            raise err from None
        self._models = models
        return models

    async def model_info(self, name: str, *, or_last_known: bool = False) -> separation_pb2.ModelInfo:
        models = await self.list_models(or_last_known=or_last_known)
        for info in models.models:
            if info.name == name:
                return info
        names = ", ".join(m.name for m in models.models)
        raise errors.NotFound(f"unknown model {name!r}; available: {names}")

    async def plan(
        self, job: orchestrator_pb2.Job, *, or_last_known: bool = False
    ) -> tuple[Plan, separation_pb2.ModelInfo]:
        """The job's graph with the parts it was planned with (``Job.separation_parts``; 0, not
        chosen yet, plans one separation node), and its model's description."""
        info = await self.model_info(job.options.model, or_last_known=or_last_known)
        check_model_options(job.options, info)
        return _plan_of(job, info), info

    async def choose_parts(self, job: orchestrator_pb2.Job, info: separation_pb2.ModelInfo) -> tuple[int, str]:
        """How many parts to split the job's separation into, and why, in words for its events.

        ``min(AUDIOMESH_SEPARATION_SPLIT_MAX, separation workers, chunks)``: more parts than
        workers would queue on the same ones, and a part with no chunk is wasted work. 1 (no
        split) for a model that cannot run chunk ranges (not a Demucs model) or ``split=False``.
        """
        cap = self.settings.separation_split_max
        if cap < 2:
            return 1, "not split (AUDIOMESH_SEPARATION_SPLIT_MAX=1)"
        if not _splittable(job, info):
            return 1, f"not split (model '{info.name}' does not separate chunk by chunk)"
        chunks = chunk_estimate(job, info)
        if chunks < 2:
            return 1, "not split (the song is one chunk)"
        workers = await self.workers(self.settings.separation_addr)
        parts = max(1, min(cap, workers, chunks, MAX_SEPARATION_PARTS))
        why = f"{workers} separation worker{'s' if workers != 1 else ''}, {chunks} chunks, at most {cap} parts"
        return parts, (f"split into {parts} parts" if parts > 1 else "not split") + f" ({why})"

    async def choose_hpss_parts(
        self, job: orchestrator_pb2.Job, info: separation_pb2.ModelInfo, stems: int
    ) -> tuple[int, str]:
        """How many parts each of the job's ``stems`` main stems' HPSS is split into, and why.

        The stems' HPSS runs after separation as ``stems x K`` calls of ``1/K`` of a stem each, in
        ``ceil(stems x K / workers)`` rounds (workers: at most AUDIOMESH_MAX_PARALLEL_NODES): K is the one of ``1 … min(AUDIOMESH_HPSS_SPLIT_MAX,
        the stem's HPSS blocks)`` with the least ``rounds / K``, the fewest parts on a tie (one
        worker: never split; two workers, three stems: 2 parts, 1.5 stems' time instead of 2).
        """
        cap = self.settings.hpss_split_max
        if cap < 2 or stems < 1:
            return 1, "not split (AUDIOMESH_HPSS_SPLIT_MAX=1)" if cap < 2 else "not split"
        blocks = hpss_block_estimate(job, info)
        if blocks < 2:
            return 1, "not split (the song is one HPSS block)"
        workers = await self.workers(self.settings.hpss_addr)
        slots = min(workers, self.settings.max_parallel_nodes)  # a job runs no more nodes at once
        parts = min(range(1, min(cap, blocks, MAX_HPSS_PARTS) + 1), key=lambda k: (-(-stems * k // slots) / k, k))
        why = f"{workers} hpss worker{'s' if workers != 1 else ''}"
        if slots < workers:
            why += f" of which a job uses {slots} at once (AUDIOMESH_MAX_PARALLEL_NODES)"
        why += f", {stems} stems, {blocks} blocks, at most {cap} parts"
        return parts, (f"in {parts} parts each" if parts > 1 else "not split") + f" ({why})"

    async def workers(self, target: str) -> int:
        """Workers that can take work at a gRPC target (an AUDIOMESH_*_ADDR): the addresses it
        names (a ``dns:///`` name resolved, at most every ``_WORKERS_TTL_SECONDS``); 1 when unknown."""
        cached = self._workers.get(target)
        if cached is not None and time.monotonic() - cached[1] < _WORKERS_TTL_SECONDS:
            return cached[0]
        try:
            workers = await asyncio.wait_for(asyncio.to_thread(count_workers, target), 5.0)
        except (OSError, TimeoutError, UnicodeError, ValueError) as exc:
            logger().info("workers not counted; planning for one", target=target, reason=str(exc))
            workers = 1
        self._workers[target] = (workers, time.monotonic())
        return workers

    # --- job lifecycle -----------------------------------------------------------------
    def start(self, rec: JobRecord) -> None:
        rec.task = asyncio.ensure_future(self._run(rec))

    @staticmethod
    def reset_for_retry(rec: JobRecord) -> None:
        """Queue a FAILED/CANCELLED job again; resume reuses the nodes whose outputs exist."""
        rec.job.state = common_pb2.JOB_STATE_QUEUED
        rec.queued_at = time.monotonic()  # the queue wait of a retry starts at its request
        rec.job.retry_time.CopyFrom(now_pb())  # and its duration: not the time it sat FAILED
        rec.job.ClearField("error")
        for node in rec.job.nodes:
            if node.state != common_pb2.NODE_STATE_SUCCEEDED:
                node.state = common_pb2.NODE_STATE_PENDING
                node.ClearField("error")

    async def _run(self, rec: JobRecord) -> None:
        try:
            await self._run_owned(rec)
        finally:
            # Counted once per end, by the replica that holds the job when it ends (written);
            # a job lost meanwhile (lease None) or handed off (not terminal) is not finished here.
            if rec.lease is not None and rec.terminal:
                try:
                    _count_end(rec)
                except Exception:  # noqa: BLE001 - metrics never keep a lease from being released
                    logger().exception("job end not counted in the metrics")
            # Ended here, or handed off: a peer may take the lease at once. (Lost: nothing to give.)
            if self.release is not None and rec.lease is not None and (rec.terminal or self.shutting_down):
                await self.release(rec)

    async def _run_owned(self, rec: JobRecord) -> None:
        job = rec.job
        with job_span(job.job_id, job.trace_parent):  # in the job's one trace, whoever runs it
            try:
                if self.job_slots is None:
                    await self._execute(rec)
                else:
                    async with self.job_slots:
                        await self._execute(rec)
            except asyncio.CancelledError:
                if rec.lost:  # another replica owns the job now: not a word more from this one
                    logger().info("job stopped here: its lease was lost")
                    return
                if self.shutting_down:
                    await self.registry.changed(rec, "orchestrator stopping; job handed over to another orchestrator")
                    return
                if rec.terminal and rec.persisted_state == rec.job.state:
                    return  # it ended (and that is written) before the cancel arrived
                await self._finish(rec, common_pb2.JOB_STATE_CANCELLED, "job cancelled")
            except NodeFailed as exc:
                job.error.CopyFrom(common_pb2.ErrorDetail(code=exc.code, message=exc.message, node=exc.node))
                await self._finish(rec, common_pb2.JOB_STATE_FAILED, f"job failed in {exc.node}: {exc.message}")
            except errors.AudiomeshError as exc:
                job.error.CopyFrom(common_pb2.ErrorDetail(code=exc.code, message=str(exc)))
                await self._finish(rec, common_pb2.JOB_STATE_FAILED, f"job failed: {exc}")
            except Exception as exc:  # noqa: BLE001 - a bug must fail the job, not hang it
                logger().exception("job crashed")
                job.error.CopyFrom(common_pb2.ErrorDetail(code="INTERNAL", message=f"{type(exc).__name__}: {exc}"))
                await self._finish(rec, common_pb2.JOB_STATE_FAILED, "job failed: internal error")

    async def _finish(self, rec: JobRecord, state: common_pb2.JobState.ValueType, event: str) -> None:
        for node in rec.job.nodes:
            if node.state in (common_pb2.NODE_STATE_RUNNING, common_pb2.NODE_STATE_PENDING):
                node.state = (
                    common_pb2.NODE_STATE_CANCELLED
                    if state == common_pb2.JOB_STATE_CANCELLED
                    else common_pb2.NODE_STATE_SKIPPED
                )
                if node.HasField("start_time") and not node.HasField("end_time"):
                    node.end_time.CopyFrom(now_pb())
        rec.job.state = state
        rec.job.ClearField("eta_seconds")
        rec.job.current_stage = ""
        await self.registry.changed(rec, event)

    async def _plan_when_reachable(self, rec: JobRecord) -> tuple[Plan, separation_pb2.ModelInfo]:
        """Plan the job, waiting (within the budget) for a separation worker that is not up
        yet — e.g. an orchestrator restarted before its workers resumes jobs at start."""
        deadline = time.monotonic() + self.settings.unavailable_budget_seconds
        delay = 0.5
        while True:
            try:
                return await self.plan(rec.job)
            except errors.Unavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger().info("separation worker not reachable yet; waiting", reason=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _execute(self, rec: JobRecord) -> None:
        job = rec.job
        plan, info = await self._plan_when_reachable(rec)
        split = ""
        if not job.nodes and not job.separation_parts:
            # Chosen once: a resumed or retried job keeps its parts (and the parts it wrote).
            job.separation_parts, split = await self.choose_parts(job, info)
            stems = len(_plan_of(job, info).main_stems)
            job.hpss_parts, hpss_split = await self.choose_hpss_parts(job, info, stems)
            if job.hpss_parts > 1:
                split += f"; the stems' HPSS {hpss_split}"
            plan = _plan_of(job, info)
        if not job.nodes:
            for spec in plan.nodes:
                job.nodes.add(
                    name=spec.name,
                    stage=spec.stage,
                    state=common_pb2.NODE_STATE_PENDING,
                    depends_on=plan.depends_on(spec.name),
                )
        else:
            _match_nodes(job, plan)
            await self._prepare_resume(rec)
        if job.state == common_pb2.JOB_STATE_QUEUED:
            _observe_queue_wait(rec)
        job.state = common_pb2.JOB_STATE_RUNNING
        _set_current_stage(job)  # with the state: never RUNNING without a stage
        started = time.monotonic()
        await self.registry.changed(rec, f"job running; separation {split}" if split else "job running")
        node_slots = asyncio.Semaphore(self.settings.max_parallel_nodes)
        running: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                done_names = {n.name for n in job.nodes if n.state == common_pb2.NODE_STATE_SUCCEEDED}
                if len(done_names) == len(job.nodes):
                    break
                for node in job.nodes:
                    if node.state == common_pb2.NODE_STATE_PENDING and node.name not in running:
                        if all(d in done_names for d in node.depends_on):
                            running[node.name] = asyncio.ensure_future(
                                self._run_node(rec, node, plan, info, node_slots, started)
                            )
                if not running:
                    raise errors.FailedPrecondition("stage graph is stuck: no node can run")
                finished, _ = await asyncio.wait(running.values(), return_when=asyncio.FIRST_COMPLETED)
                for name in [n for n, t in running.items() if t in finished]:
                    running.pop(name).result()  # raises NodeFailed
        finally:
            for task in running.values():
                task.cancel()
            if running:
                await asyncio.gather(*running.values(), return_exceptions=True)
            rec.node_activity.clear()  # a node task cancelled before it started never cleared its mark
        normalize = rec.node("normalize")
        job.ClearField("tracks")
        job.tracks.extend(normalize.outputs)
        job.fraction = 1.0
        await self._finish(rec, common_pb2.JOB_STATE_SUCCEEDED, "job succeeded")

    def _all_exist(self, keys: list[str]) -> bool:
        return all(self.store.exists(k) for k in keys)

    async def _prepare_resume(self, rec: JobRecord) -> None:
        """Reuse succeeded nodes whose outputs still exist, or whose outputs are gone but read by
        no node that runs again (a split separation's parts, deleted once stitched); everything
        else runs again."""
        nodes = list(rec.job.nodes)
        rerun = {n.name for n in nodes if n.state != common_pb2.NODE_STATE_SUCCEEDED}
        missing = set()
        for node in nodes:
            if node.name not in rerun and not await asyncio.to_thread(self._all_exist, [t.key for t in node.outputs]):
                missing.add(node.name)
        grew = True
        while grew:  # a node that runs again needs what its dependencies wrote
            needed = {d for n in nodes if n.name in rerun for d in n.depends_on} & missing
            grew = not needed <= rerun
            rerun |= needed
        reused = [n.name for n in nodes if n.name not in rerun]
        for node in nodes:
            if node.name not in rerun:
                continue
            node.state = common_pb2.NODE_STATE_PENDING
            node.fraction = 0.0
            node.ClearField("outputs")
        _set_current_stage(rec.job)  # the manifest's stage named nodes that are no longer running
        await self.registry.changed(rec, f"job resumed; reusing {', '.join(reused) or 'nothing'}")

    # --- one node ----------------------------------------------------------------------
    async def _run_node(
        self,
        rec: JobRecord,
        node: orchestrator_pb2.Node,
        plan: Plan,
        info: separation_pb2.ModelInfo,
        slots: asyncio.Semaphore,
        started: float,
    ) -> None:
        """One node whose inputs exist: waits for a node slot, then runs (:meth:`_attempt_node`).
        Marked in ``rec.node_activity`` meanwhile (held, running, or waiting while every worker
        slot is busy: the gauges' backlog), and observed in
        NODE_DURATION once it started, with how it ended (succeeded, failed or cancelled)."""
        # Ready, held back by this job's own node slots (max_parallel_nodes): more workers would
        # not run it sooner, so it is "held", not the "waiting" backlog an autoscaler reads.
        rec.node_activity[node.name] = (node.stage, "held")
        try:
            async with slots:
                rec.node_activity[node.name] = (node.stage, "running")
                cancelled = False
                try:
                    await self._attempt_node(rec, node, plan, info, started)
                except asyncio.CancelledError:
                    cancelled = True
                    raise
                finally:
                    # By its state: a node cancelled while its success is being written did succeed.
                    succeeded = node.state == common_pb2.NODE_STATE_SUCCEEDED
                    _observe_node(node, "succeeded" if succeeded else "cancelled" if cancelled else "failed")
        finally:
            rec.node_activity.pop(node.name, None)

    async def _attempt_node(
        self,
        rec: JobRecord,
        node: orchestrator_pb2.Node,
        plan: Plan,
        info: separation_pb2.ModelInfo,
        started: float,
    ) -> None:
        node.state = common_pb2.NODE_STATE_RUNNING
        node.start_time.CopyFrom(now_pb())
        node.ClearField("end_time")
        node.ClearField("error")
        _set_current_stage(rec.job)
        await self.registry.changed(rec, f"{node.name} started")

        def progress(fraction: float) -> None:
            node.fraction = max(node.fraction, min(fraction, 1.0))
            job = rec.job
            job.fraction = overall_fraction(job.nodes)
            elapsed = time.monotonic() - started
            if job.fraction > 0.02:
                job.eta_seconds = elapsed * (1 - job.fraction) / job.fraction
            asyncio.ensure_future(self.registry.changed(rec, persist=False))

        attempts_left = self.settings.node_attempts
        busy_deadline = time.monotonic() + self.settings.stage_timeout_seconds
        unavailable_deadline = time.monotonic() + self.settings.unavailable_budget_seconds
        busy_waits = 0
        unreachable_since: float | None = None  # start of the current run of failed connections
        with tracer().start_as_current_span(f"node {node.name}"):
            while True:
                if rec.lease is not None and not rec.lease.valid():
                    # A loop that wakes late (SIGSTOP, a starved process) can come here before the
                    # lease keeper's deadline timer fires: no call may start past the deadline, or
                    # it runs beside the new holder's (the churn test saw a stale holder's hpss:mix
                    # start 0.4 s after the take-over, straight out of a busy-worker wait).
                    self.registry.lose(rec, "the lease passed its deadline before a node call")
                if rec.lost:
                    raise asyncio.CancelledError
                first_try = time.monotonic()
                node.attempts += 1
                attempts_left -= 1
                try:
                    outputs = await self._dispatch(node, plan, info, rec.job, progress, rec.lease)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.CANCELLED and rec.task and rec.task.cancelling():
                        raise asyncio.CancelledError from None
                    err = status_of(exc)
                except errors.AudiomeshError as exc:
                    err = exc
                if isinstance(err, errors.ResourceExhausted) and err.reason is None:
                    if time.monotonic() < busy_deadline:
                        # A busy worker is not a failed attempt: wait for a free slot.
                        node.attempts -= 1
                        attempts_left += 1
                        busy_waits += 1
                        metrics.NODE_BUSY_WAITS.labels(stage=node.stage).inc()
                        rec.node_activity[node.name] = (node.stage, "waiting")  # backlog until it retries
                        try:
                            await asyncio.sleep(min(0.2 * busy_waits, 2.0))
                        finally:
                            rec.node_activity[node.name] = (node.stage, "running")
                        continue
                if isinstance(err, errors.Unavailable):
                    # Gone workers or store: keep trying for the budget, not a fixed count.
                    retry = time.monotonic() < unavailable_deadline
                else:
                    retry = retryable(err) and attempts_left > 0
                code, message = err.code, str(err)
                if isinstance(err, errors.Unavailable) and node.stage in _RPCS and _transport_failure(message):
                    unreachable_since = unreachable_since or first_try
                    message = _unreachable_message(
                        node.stage,
                        self.settings.address_of(node.stage),
                        time.monotonic() - unreachable_since,
                        self.settings.unavailable_budget_seconds,
                        retry,
                        message,
                    )
                else:
                    unreachable_since = None
                if not retry:
                    node.state = common_pb2.NODE_STATE_FAILED
                    node.end_time.CopyFrom(now_pb())
                    node.error.CopyFrom(common_pb2.ErrorDetail(code=code, message=message, node=node.name))
                    await self.registry.changed(rec, f"{node.name} failed: {code}: {message}")
                    raise NodeFailed(node.name, code, message)
                metrics.NODE_RETRIES.labels(stage=node.stage, code=code).inc()
                delay = min(0.5 * 2 ** (node.attempts - 1), 5.0)
                await self.registry.changed(
                    rec, f"{node.name} attempt {node.attempts} failed ({code}: {message}); retrying in {delay:.1f}s"
                )
                await asyncio.sleep(delay)
        node.ClearField("outputs")
        node.outputs.extend(outputs)
        node.state = common_pb2.NODE_STATE_SUCCEEDED
        _set_current_stage(rec.job)
        node.fraction = 1.0
        node.end_time.CopyFrom(now_pb())
        node.duration_seconds = (node.end_time.ToNanoseconds() - node.start_time.ToNanoseconds()) / 1e9
        rec.job.fraction = overall_fraction(rec.job.nodes)
        await self.registry.changed(rec, f"{node.name} succeeded in {node.duration_seconds:.2f}s")
        spec = plan.node(node.name)
        if spec.drops_reads and rec.owned:
            await self._drop(spec.reads)

    async def _drop(self, keys: tuple[str, ...]) -> None:
        """Delete intermediate objects nothing reads any more (best effort: retention removes
        what is left with the job)."""

        def delete() -> None:
            for key in keys:
                self.store.delete(key)

        try:
            await asyncio.to_thread(delete)
        except errors.AudiomeshError as exc:
            logger().warning("intermediate objects not deleted; they go with the job", reason=str(exc))

    async def _dispatch(
        self,
        node: orchestrator_pb2.Node,
        plan: Plan,
        info: separation_pb2.ModelInfo,
        job: orchestrator_pb2.Job,
        progress: Callable[[float], None],
        lease: Lease | None = None,
    ) -> list[common_pb2.Track]:
        """One generic path for every node: its request → its stage's call → its outputs."""
        spec = plan.node(node.name)
        request = spec.build_request(plan, job)
        response: Any
        if spec.stage == LOCAL_STAGE:
            response = await self._decode(request, info)
        else:
            rpc = _RPCS[spec.stage]
            stub = self.clients.stub(rpc.stub, self.settings.address_of(spec.stage))
            metadata = [(NODE_HEADER, f"{job.job_id}/{spec.name}")]
            if lease is not None:
                metadata.append((LEASE_HEADER, f"{lease.owner}@{lease.epoch}"))
            call = getattr(stub, rpc.method)(
                request, timeout=self.settings.stage_timeout_seconds, metadata=tuple(metadata)
            )
            response = await (_follow(call, progress, spec.stage) if rpc.streams else call)
        return spec.collect(response, node, job)

    async def _decode(self, request: DecodeRequest, info: separation_pb2.ModelInfo) -> common_pb2.Track:
        """Input → float WAV at the model's rate and channel count, shared by every stage."""

        def work() -> common_pb2.Track:
            # Block by block (bounded memory: a 20-minute song is not held in the orchestrator).
            with scratch.workdir("decode-") as tmp:
                local = Path(tmp) / "input"
                self.store.get_to_file(request.input_key, local)
                fmt, subtype, ext = ENCODINGS[INTERMEDIATE]
                mix = Path(tmp) / f"mix{ext}"
                with TrackWriter(mix, info.sample_rate, info.audio_channels, fmt=fmt, subtype=subtype) as writer:
                    # Messages name the user's file, not the scratch copy ("input").
                    blocks = decode_blocks(
                        local, sample_rate=info.sample_rate, channels=info.audio_channels, name=request.input_name
                    )
                    for block in blocks:
                        writer.write(block)
                return Outputs(self.store, tmp).publish_file("mix", request.output_key, mix, writer.measurement)

        return await asyncio.to_thread(work)


def _count_end(rec: JobRecord) -> None:
    """JOBS_FINISHED and JOB_DURATION (creation, or the latest retry, → the end's write, from the
    job's timestamps)."""
    outcome = _OUTCOMES.get(rec.job.state)
    if outcome is None:
        return
    job = rec.job
    seconds = (job.update_time.ToNanoseconds() - manifest.run_start(job).ToNanoseconds()) / 1e9
    metrics.JOBS_FINISHED.labels(outcome=outcome).inc()
    metrics.JOB_DURATION.labels(outcome=outcome).observe(max(0.0, seconds))


def _observe_queue_wait(rec: JobRecord) -> None:
    """QUEUED → RUNNING: from the creation or retry on this replica (monotonic), else (a queued
    job taken over from another replica) from the job's creation time."""
    if rec.queued_at is not None:
        seconds = time.monotonic() - rec.queued_at
    else:
        seconds = (now_pb().ToNanoseconds() - rec.job.create_time.ToNanoseconds()) / 1e9
    rec.queued_at = None
    metrics.JOB_QUEUE_WAIT.observe(max(0.0, seconds))


def _observe_node(node: orchestrator_pb2.Node, outcome: str) -> None:
    """NODE_DURATION of a node run that ended: the manifest's duration when it succeeded, else
    from its start to now."""
    if outcome == "succeeded":
        seconds = node.duration_seconds
    else:
        seconds = (now_pb().ToNanoseconds() - node.start_time.ToNanoseconds()) / 1e9
    metrics.NODE_DURATION.labels(stage=node.stage, outcome=outcome).observe(max(0.0, seconds))


def _plan_of(job: orchestrator_pb2.Job, info: separation_pb2.ModelInfo) -> Plan:
    return make_plan(
        job.job_id,
        sources=list(info.sources),
        two_stems=job.options.separation.two_stems,
        main_stems=list(job.options.main_stems),
        ext=extension(job.options.encoding),
        parts=job.separation_parts or 1,
        hpss_parts=job.hpss_parts or 1,
    )


def _splittable(job: orchestrator_pb2.Job, info: separation_pb2.ModelInfo) -> bool:
    """Whether the job's separation can run as chunk ranges: a Demucs model, split into chunks."""
    return info.kind == "demucs" and separation_options(job.options.separation).split


def chunk_estimate(job: orchestrator_pb2.Job, info: separation_pb2.ModelInfo) -> int:
    """The chunks one pass over the job's song has (a shifted pass has as many or one more):
    its duration over the stride, ``segment x (1 - overlap)``, with the job's segment, else the
    model's longest, else :data:`DEFAULT_SEGMENT_SECONDS`."""
    options = separation_options(job.options.separation)
    segment = options.segment
    if segment is None:
        segment = info.max_segment_seconds if info.HasField("max_segment_seconds") else DEFAULT_SEGMENT_SECONDS
    rate = info.sample_rate or job.input.audio.sample_rate or 44100
    stride = max(int((1.0 - options.overlap) * int(rate * segment)), 1)
    frames = round(job.input.audio.duration_seconds * rate)
    return max(1, math.ceil(frames / stride))


def hpss_block_estimate(job: orchestrator_pb2.Job, info: separation_pb2.ModelInfo) -> int:
    """The HPSS blocks of one of the job's stems (at the model's rate, with the job's hop),
    counted a little short so that a part never comes out empty on the real stem."""
    rate = info.sample_rate or job.input.audio.sample_rate or 44100
    frames = round(job.input.audio.duration_seconds * rate) - _BLOCK_ESTIMATE_SLACK
    return block_count(max(frames, 1), hop_length=hpss_kwargs(job.options.hpss)["hop_length"])


def count_workers(target: str) -> int:
    """The worker processes a gRPC target reaches: a fixed list ``ipv4:a:p,b:p`` / ``ipv6:…``
    counted, a ``dns:///host:port`` resolved (blocking: call it in a thread; the addresses of
    one family, the larger count, so a dual-stack pod or ``localhost`` counts once), a plain
    ``host:port`` one."""
    scheme, sep, rest = target.partition(":")
    if sep and scheme in ("ipv4", "ipv6"):
        return len({item.strip() for item in rest.split(",") if item.strip()})
    if not target.startswith("dns:"):
        return 1
    name = target.removeprefix("dns:")
    if name.startswith("//"):  # dns://[authority]/host:port
        name = name[2:].partition("/")[2]
    host, _, port = name.rpartition(":")
    infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    families: dict[int, set[str]] = {}
    for family, _, _, _, address in infos:
        families.setdefault(family, set()).add(str(address[0]))
    return max((len(ips) for ips in families.values()), default=1)


def _match_nodes(job: orchestrator_pb2.Job, plan: Plan) -> None:
    """Fit a resumed job's nodes (from its manifest, maybe written by older code) to the plan:
    matched by name, dependencies as the graph derives them now, nodes the plan gained added."""
    names = {spec.name for spec in plan.nodes}
    unknown = [n.name for n in job.nodes if n.name not in names]
    if unknown:
        raise errors.FailedPrecondition(
            f"the manifest's nodes {unknown} are not in this job's plan {sorted(names)}; run the job again"
        )
    have = {n.name for n in job.nodes}
    for spec in plan.nodes:
        if spec.name not in have:
            job.nodes.add(name=spec.name, stage=spec.stage, state=common_pb2.NODE_STATE_PENDING)
    for node in job.nodes:
        del node.depends_on[:]
        node.depends_on.extend(plan.depends_on(node.name))


def _unreachable_message(stage: str, where: str, elapsed: float, budget: float, retry: bool, reason: str) -> str:
    """What a failed connection means so far: how long it has really lasted, and the budget."""
    if retry:
        return f"the {stage} worker at {where} could not be reached ({elapsed:.0f} s so far; retrying for up to {budget:g} s): {reason}"
    return (
        f"the {stage} worker at {where} could not be reached for {elapsed:.0f} s (the budget is {budget:g} s): {reason}"
    )


def _transport_failure(message: str) -> bool:
    """gRPC's own words for "nobody answered" (as opposed to a worker reporting UNAVAILABLE)."""
    text = message.lower()
    return any(m in text for m in ("failed to connect", "connections to all backends failing", "socket closed"))


def _set_current_stage(job: orchestrator_pb2.Job) -> None:
    """What is running now, e.g. "separation, hpss:mix" (nodes run concurrently). Between
    nodes (the job just became RUNNING, or a node finished and its successors are about to be
    started by ``_execute``'s loop) it names the nodes starting next, so a RUNNING job never
    reads as doing nothing; when every node is done it keeps the last value until ``_finish``."""
    names = [n.name for n in job.nodes if n.state == common_pb2.NODE_STATE_RUNNING]
    if not names:
        done = {n.name for n in job.nodes if n.state == common_pb2.NODE_STATE_SUCCEEDED}
        names = [
            n.name
            for n in job.nodes
            if n.state == common_pb2.NODE_STATE_PENDING and all(d in done for d in n.depends_on)
        ]
    if names:
        job.current_stage = ", ".join(names)


async def _follow(call: AsyncIterator[Any], progress: Callable[[float], None], stage: str) -> Any:
    """Relay a worker's progress stream; return its result message."""
    async for msg in call:
        if msg.HasField("progress"):
            progress(msg.progress.fraction)
        else:
            return msg.result
    raise errors.Unavailable(f"{stage} stream ended without a result")


__all__ = ["NodeFailed", "Runner"]
