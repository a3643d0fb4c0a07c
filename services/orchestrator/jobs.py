"""Job records: state in memory, the manifest in the store after every state change.

The manifest is the source of truth across restarts and replicas. A replica holds a record
for every job it has seen; it *owns* the ones whose lease it holds (``rec.lease``, see
lease.py) and only those it writes — each write conditional on the manifest ETag it last read
or wrote (fencing: a replica that lost the job cannot overwrite the new owner's state). The
others it *follows*: re-read from the store when asked for or watched. Watchers wait on a
per-job version counter, so each sees every change after its snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from audiomesh import errors, manifest, metrics
from audiomesh.store import ObjectInfo, ObjectStore
from audiomesh.telemetry import logger, remember_job_trace
from audiomesh.v1 import common_pb2, orchestrator_pb2

from .graph import STAGE_WEIGHTS
from .lease import Lease, write_through

#: Every stage a node can have (the gauges report each, 0 included: an autoscaler reads 0, not "no data").
STAGES = tuple(STAGE_WEIGHTS)
TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
_PROGRESS_PERSIST_INTERVAL = 2.0  # seconds between manifest writes caused by progress alone
FOLLOW_INTERVAL = 0.5  # seconds between reads of a followed job's manifest while someone watches it
_LOAD_CONCURRENCY = 16  # manifests read at once when discovering jobs


def now_pb() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def manifest_key(job_id: str) -> str:
    return f"jobs/{job_id}/manifest.json"


UPLOADS = "uploads/"  # UploadAudio without a job: uploads/<owner>/<upload id>/<name>


def upload_key(owner: str, name: str) -> str:
    """Where an upload without a job goes: under its owner, so CreateJob can check who may use it
    (the owner of open mode is ``anonymous``), and where retention finds it if no job ever does."""
    return f"{UPLOADS}{owner or 'anonymous'}/{uuid.uuid4()}/{name}"


@dataclass
class JobRecord:
    job: orchestrator_pb2.Job
    events: list[str] = field(default_factory=list)
    version: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task | None = None
    last_persist: float = 0.0
    persisted_state: int = -1  # the job state in the last manifest written (or attempted)
    persist_error: str = ""
    etag: str | None = None  # the manifest's ETag as this replica last read or wrote it
    lease: Lease | None = None  # held: this replica owns the job and writes its manifest
    lost: bool = False  # the lease was lost while running: the runner stops and writes nothing
    refreshed: float = 0.0  # monotonic time of the last read of a followed job's manifest
    # The job as of the last notification: what clients are shown. The live ``job`` can be ahead
    # of the manifest (a state change whose write is in flight); this never is.
    published: orchestrator_pb2.Job | None = None
    # Monotonic time this replica queued the job (created or retried it): JOB_QUEUE_WAIT starts there.
    queued_at: float | None = None
    # Nodes of the running job by name → (stage, "waiting" | "running"), kept by the runner for
    # the scrape-time gauges (read from the metrics thread: plain dict, copied atomically).
    node_activity: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def snapshot(self) -> orchestrator_pb2.Job:
        return self.published if self.published is not None else self.job

    @property
    def terminal(self) -> bool:
        return self.job.state in TERMINAL

    @property
    def owned(self) -> bool:
        return self.lease is not None

    def node(self, name: str) -> orchestrator_pb2.Node:
        for node in self.job.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


class JobRegistry:
    def __init__(self, store: ObjectStore, config: dict, *, outage_budget: float = 60.0) -> None:
        self.store = store
        self.outage_budget = outage_budget
        self.records: dict[str, JobRecord] = {}
        self.loaded = False  # every manifest in the store read once (ListJobs waits for it)
        self._loaded = asyncio.Event()
        self.closing = False  # the orchestrator is stopping: watchers end (close_watchers)
        # Called when a write finds the lease gone or the manifest changed by another replica.
        self.on_lost: Callable[[JobRecord, str], None] | None = None
        self._config = struct_pb2.Struct()
        self._config.update(config)
        self.log = logger(component="jobs")

    # --- lookup -----------------------------------------------------------------------
    async def require_loaded(self, wait: float = 2.0) -> None:
        """ListJobs waits up to ``wait`` seconds for every manifest to have been read once, then
        answers UNAVAILABLE (which clients retry): a half-loaded list would miss jobs. (A job
        asked for by id is read on demand.)"""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._loaded.wait(), wait)
        if not self.loaded:
            raise errors.Unavailable("orchestrator is loading jobs from the store; retry")

    def get(self, job_id: str) -> JobRecord:
        validate_job_id(job_id)
        rec = self.records.get(job_id)
        if rec is None:
            raise errors.NotFound(f"job {job_id!r} not found")
        return rec

    async def lookup(self, job_id: str, *, max_age: float = FOLLOW_INTERVAL) -> JobRecord:
        """The job as current as the store has it: an owned record as it is, a followed one re-read
        when older than ``max_age`` seconds, an unknown one read from the store (created by another
        replica, or not loaded yet); NotFound when no manifest exists."""
        validate_job_id(job_id)
        rec = self.records.get(job_id)
        if rec is None:
            loaded = await self._read(manifest_key(job_id))
            if loaded is None:
                raise errors.NotFound(f"job {job_id!r} not found")
            rec = self.records.setdefault(job_id, loaded)
        elif not rec.owned and time.monotonic() - rec.refreshed >= max_age:
            await self.refresh(rec)
            rec = self.get(job_id)  # NotFound if it was deleted elsewhere
        return rec

    async def _read(self, key: str) -> JobRecord | None:
        """A followed record from the manifest at ``key``; None if it does not exist."""
        try:
            data, info = await asyncio.to_thread(self.store.read, key)
        except errors.NotFound:
            return None
        doc = manifest.loads(data)
        return JobRecord(
            job=doc.job, events=list(doc.events), etag=info.etag, refreshed=time.monotonic(), published=doc.job
        )

    async def refresh(self, rec: JobRecord) -> None:
        """Re-read a followed job's manifest; wake its watchers if it changed (or was deleted)."""
        if rec.owned:
            return
        job_id = rec.job.job_id
        try:
            data, info = await asyncio.to_thread(self.store.read, rec.job.manifest_key)
        except errors.NotFound:
            if self.records.get(job_id) is rec:
                del self.records[job_id]
            await self._notify(rec)
            return
        rec.refreshed = time.monotonic()
        if info.etag == rec.etag or rec.owned:  # unchanged, or adopted by this replica meanwhile
            return
        await self.load_into(rec, data, info.etag)

    async def load_into(self, rec: JobRecord, data: bytes, etag: str | None) -> None:
        """``rec`` becomes the manifest ``data`` read with ``etag``; its watchers are told."""
        doc = manifest.loads(data)
        remember_job_trace(doc.job.job_id, doc.job.trace_parent)  # a take-over logs in the job's trace
        rec.job, rec.events, rec.etag = doc.job, list(doc.events), etag
        await self._notify(rec)

    async def _notify(self, rec: JobRecord, *, publish: bool = True) -> None:
        if publish:
            rec.published = _copy(rec.job)  # what watchers and GetJob see: persisted, or progress only
        rec.version += 1
        async with rec.changed:
            rec.changed.notify_all()

    def gauges(self) -> tuple[dict[str, int], dict[tuple[str, str], int], int]:
        """What :class:`audiomesh.metrics.JobsCollector` reports: held jobs by state (queued,
        running), their nodes by (stage, held|waiting|running), and leases held. Called from the
        metrics server's thread: it only copies builtin containers (atomic under the GIL) and
        reads plain attributes, so it neither blocks the event loop nor sees a torn dict."""
        jobs = {"queued": 0, "running": 0}
        nodes = {(stage, state): 0 for stage in STAGES for state in ("held", "waiting", "running")}
        leases = 0
        for rec in list(self.records.values()):
            if rec.lease is None:
                continue
            leases += 1
            state = rec.job.state
            if state == common_pb2.JOB_STATE_QUEUED:
                jobs["queued"] += 1
            elif state == common_pb2.JOB_STATE_RUNNING:
                jobs["running"] += 1
            else:
                continue  # ended, lease not released yet: no backlog
            for stage, activity in list(rec.node_activity.values()):
                nodes[(stage, activity)] = nodes.get((stage, activity), 0) + 1
        return jobs, nodes, leases

    def newest_first(self) -> list[JobRecord]:
        # job_id breaks ties so the order is total (ListJobs' cursor relies on it).
        return sorted(
            self.records.values(), key=lambda r: (r.job.create_time.ToNanoseconds(), r.job.job_id), reverse=True
        )

    # --- changes ----------------------------------------------------------------------
    async def add(self, job: orchestrator_pb2.Job, event: str, lease: Lease) -> JobRecord:
        """A new job this replica created (and holds ``lease`` of): its first manifest is written
        only if none exists."""
        rec = JobRecord(job=job, lease=lease, queued_at=time.monotonic())
        self.records[job.job_id] = rec
        await self.changed(rec, event)
        return rec

    async def changed(self, rec: JobRecord, event: str | None = None, *, persist: bool = True) -> None:
        """Write the manifest (progress-only changes: throttled), then wake watchers."""
        rec.job.update_time.CopyFrom(now_pb())
        if event:
            rec.events.append(f"{datetime.now(UTC).isoformat(timespec='milliseconds')} {event}")
            self.log.info(event, job_id=rec.job.job_id)
        # Persist before telling watchers: a client that sees a state can read it in the manifest.
        # A state the manifest does not have yet is persisted by whoever notifies first (another
        # coroutine's progress may wake the watchers while the state change waits for the lock).
        due = time.monotonic() - rec.last_persist >= _PROGRESS_PERSIST_INTERVAL
        if persist or due or rec.job.state != rec.persisted_state:
            await self.persist(rec)
            while rec.owned and rec.job.state != rec.persisted_state:  # it changed during that write
                await self.persist(rec)
        # A replica that lost the job (nothing was written) does not show what it could not write.
        await self._notify(rec, publish=rec.owned)

    async def persist(self, rec: JobRecord) -> None:
        """One atomic, fenced write (file: temp + rename under a lock; S3: one conditional PUT).
        A store that cannot be reached is retried for ``outage_budget`` seconds while the lease
        holds; a full or unreachable store leaves the previous manifest intact and is logged —
        the job goes on in memory and the next change writes again. Nothing is written without
        a valid lease, and a manifest changed by another replica means the job was taken over."""
        if not rec.owned:
            return  # lost (the runner is stopping) or followed: the owner writes
        async with rec.write_lock:
            rec.last_persist = time.monotonic()
            state = rec.job.state
            try:
                await self._write(rec)
            finally:  # written, or given up on (then the next change tries again)
                rec.persisted_state = state

    async def _write(self, rec: JobRecord) -> None:
        """The manifest of ``rec`` now, in one PUT (retried while the store is unreachable)."""
        doc = orchestrator_pb2.Manifest(
            schema_version=manifest.SCHEMA_VERSION,
            job=rec.job,
            software=manifest.software_versions(),
            config=self._config,
            events=rec.events,
        )
        data = manifest.dumps(doc)
        deadline = time.monotonic() + self.outage_budget
        delay = 0.25
        while True:
            lease = rec.lease
            if lease is None or not lease.valid():
                # Checked before every PUT: an owner that could not renew for TTL×2/3 may already
                # have been replaced; only the ETag condition below can tell, and it must not race.
                self.lose(rec, "the lease expired before the manifest could be written")
                return
            condition: dict[str, Any] = {"if_match": rec.etag} if rec.etag else {"if_none_match": True}
            try:
                await write_through(
                    functools.partial(_record_etag, rec),
                    self.store.put_if,
                    rec.job.manifest_key,
                    data,
                    **condition,
                )
                rec.persist_error = ""
                return
            except errors.PreconditionFailed:
                self.lose(rec, "the manifest was changed by another replica: it owns the job now")
                return
            except errors.Unavailable as exc:
                if time.monotonic() + delay > deadline:
                    self._persist_failed(rec, exc)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except errors.AudiomeshError as exc:  # StoreFull and the like
                self._persist_failed(rec, exc)
                return

    def lose(self, rec: JobRecord, reason: str) -> None:
        """This replica no longer owns ``rec``: stop writing it; the runner stops its job."""
        if rec.lease is None:
            return
        self.log.warning("job lease lost; stopping without writing", job_id=rec.job.job_id, reason=reason)
        rec.lease = None
        metrics.LEASES_LOST.inc()
        # Follow it from the store from now on; what this replica holds in memory may be a state
        # it could not write (even a terminal one): the next read replaces it, whatever its ETag.
        rec.refreshed, rec.etag = 0.0, None
        if self.on_lost is not None:
            self.on_lost(rec, reason)

    def _persist_failed(self, rec: JobRecord, exc: Exception) -> None:
        rec.persist_error = str(exc)
        self.log.error("manifest not written; the previous one is kept", job_id=rec.job.job_id, reason=str(exc))

    async def watch(self, job_id: str) -> AsyncIterator[orchestrator_pb2.Job]:
        """A snapshot, then every change a watcher can see, until the job is terminal.

        A change is visible when the job differs from the last one sent in anything but
        ``update_time`` (events alone, or progress that moved nothing, send nothing). A RUNNING
        job without a ``current_stage`` is never sent (the runner sets one with the state; this
        guards any path that does not).
        """
        rec = await self.lookup(job_id, max_age=0)  # a watch starts from the store's state, never a stale end

        def moved_since(version: int) -> Callable[[], bool]:  # binds `version` now (a lambda in the loop would not)
            return lambda: rec.version != version or self.closing

        seen = rec.version
        snapshot = _copy(rec.snapshot)
        yield snapshot
        sent = _visible(snapshot)
        # Decide on the snapshot sent, not the live record: the last message is the final state.
        while snapshot.state not in TERMINAL and self.records.get(job_id) is rec:
            # A followed job changes in the store, not here: re-read its manifest every FOLLOW_INTERVAL.
            with contextlib.suppress(TimeoutError):
                async with rec.changed:
                    await asyncio.wait_for(rec.changed.wait_for(moved_since(seen)), FOLLOW_INTERVAL)
            # Followed (or just lost): the store has the job, whatever changed here; one read for all watchers.
            if not rec.owned and not self.closing and time.monotonic() - rec.refreshed >= FOLLOW_INTERVAL / 2:
                await self.refresh(rec)
            if rec.version == seen and not self.closing:
                continue
            if self.closing:
                raise errors.Unavailable(
                    f"the orchestrator is stopping; job {job_id} resumes when it is back: watch it again then"
                )
            seen = rec.version
            current = _copy(rec.snapshot)
            visible = _visible(current)
            if visible == sent or (current.state == common_pb2.JOB_STATE_RUNNING and not current.current_stage):
                continue
            snapshot, sent = current, visible
            yield snapshot

    async def close_watchers(self) -> None:
        """End every WatchJob stream now with UNAVAILABLE (retry after the restart), instead of
        holding the server's drain for its whole grace and being cancelled (a traceback)."""
        self.closing = True
        for rec in list(self.records.values()):
            async with rec.changed:
                rec.changed.notify_all()

    async def delete(self, job_id: str) -> int:
        rec = self.get(job_id)

        def delete_objects() -> int:
            # The manifest goes last: a crash half-way leaves a job that is still listed (and
            # swept again), never orphaned objects that nothing refers to.
            keys = [o.key for o in self.store.list(f"jobs/{job_id}/") if o.key != rec.job.manifest_key]
            for key in keys:
                self.store.delete(key)
            self.store.delete(rec.job.manifest_key)
            return len(keys) + 1

        count = await asyncio.to_thread(delete_objects)
        self.records.pop(job_id, None)
        # An upload the job was created from (two-step flow) goes with the last job that used it.
        upload = rec.job.input.key
        if upload.startswith(UPLOADS) and not any(r.job.input.key == upload for r in self.records.values()):
            await asyncio.to_thread(self.store.delete, upload)
            count += 1
        self.log.info("job deleted", job_id=job_id, objects=count)
        await self._notify(rec)  # watchers end
        return count

    # --- recovery and retention ---------------------------------------------------------
    async def discover(self) -> list[JobRecord]:
        """Read the manifests of the jobs this replica has not seen yet (every job, the first
        time), ``_LOAD_CONCURRENCY`` at a time; return the new records (followed: none is owned).

        A store that stops answering half-way raises :class:`~audiomesh.errors.Unavailable`
        (the caller tries again later) instead of skipping what it could not read. A folder
        without a manifest (a job being created) is skipped until its manifest exists."""
        prefixes = await asyncio.to_thread(lambda: list(self.store.list_prefixes("jobs/")))
        ids = [p.removeprefix("jobs/").rstrip("/") for p in prefixes]
        new = [i for i in ids if i not in self.records and is_job_id(i)]
        slots = asyncio.Semaphore(_LOAD_CONCURRENCY)

        async def read(job_id: str) -> JobRecord | None:
            async with slots:
                try:
                    return await self._read(manifest_key(job_id))
                except errors.Unavailable:
                    raise
                except errors.AudiomeshError as exc:
                    self.log.warning("skipping unreadable manifest", key=manifest_key(job_id), reason=str(exc))
                    return None

        found = await asyncio.gather(*(read(i) for i in new))
        return [self.records.setdefault(r.job.job_id, r) for r in found if r is not None]

    async def load_all(self) -> list[JobRecord]:
        """Every job in the store (see :meth:`discover`); the unfinished ones."""
        await self.discover()
        self.loaded = True
        self._loaded.set()
        return [rec for rec in self.records.values() if not rec.terminal]

    async def sweep(self, retention_hours: float) -> tuple[int, int]:
        """Retention, one pass: delete finished jobs older than ``retention_hours`` (with the
        uploads only they used), then uploads no job uses that are older than that (an upload
        without a job that CreateJob never got). Returns (jobs, uploads) deleted; 0 hours keeps all."""
        jobs = []
        for job_id in self.expired(retention_hours):
            rec = self.records.get(job_id)
            if rec is not None:
                await self.refresh(rec)  # retried on another replica since this one last looked?
            if job_id in self.records and self.records[job_id].terminal:
                await self.delete(job_id)
                jobs.append(job_id)
        if retention_hours <= 0:
            return len(jobs), 0
        cutoff = datetime.now(UTC) - timedelta(hours=retention_hours)
        infos = await asyncio.to_thread(lambda: list(self.store.list(UPLOADS)))
        used = {r.job.input.key for r in self.records.values()}
        orphans = [i.key for i in infos if i.key not in used and i.last_modified < cutoff]
        for key in orphans:
            await asyncio.to_thread(self.store.delete, key)
        orphans += await self._sweep_unfinished_creations(cutoff)
        if jobs or orphans:
            self.log.info("retention sweep", jobs_deleted=len(jobs), orphaned_uploads_deleted=len(orphans))
        return len(jobs), len(orphans)

    async def _sweep_unfinished_creations(self, cutoff: datetime) -> list[str]:
        """Job folders without a manifest, untouched since ``cutoff``: an orchestrator died between
        storing an upload (or a lease) and writing the job's first manifest. Nothing refers to them."""

        def sweep() -> list[str]:
            gone: list[str] = []
            for prefix in self.store.list_prefixes("jobs/"):
                if prefix.removeprefix("jobs/").rstrip("/") in self.records:
                    continue
                infos = list(self.store.list(prefix))
                if infos and not any(i.key.endswith("/manifest.json") for i in infos):
                    if max(i.last_modified for i in infos) < cutoff:
                        self.store.delete_prefix(prefix)
                        gone.extend(i.key for i in infos)
            return gone

        return await asyncio.to_thread(sweep)

    def expired(self, retention_hours: float) -> list[str]:
        if retention_hours <= 0:
            return []
        cutoff = datetime.now(UTC) - timedelta(hours=retention_hours)
        return [
            r.job.job_id
            for r in self.records.values()
            if r.terminal and r.job.create_time.ToDatetime(tzinfo=UTC) < cutoff
        ]


def is_job_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except (ValueError, AttributeError, TypeError):
        return False


def validate_job_id(job_id: str) -> None:
    """Job ids are UUID4 strings; anything else never touches a key."""
    if not is_job_id(job_id):
        raise errors.InvalidInput(f"job_id {job_id!r} is not a job id (a lowercase UUID)")


def _record_etag(rec: JobRecord, info: ObjectInfo) -> None:
    """The ETag of a manifest write that landed — not after a loss meanwhile: the record must
    then re-read the store, whatever this write put there."""
    if rec.owned:
        rec.etag = info.etag


def _copy(job: orchestrator_pb2.Job) -> orchestrator_pb2.Job:
    out = orchestrator_pb2.Job()
    out.CopyFrom(job)
    return out


def _visible(job: orchestrator_pb2.Job) -> orchestrator_pb2.Job:
    """``job`` as a watcher compares it: without the time of the last write."""
    out = _copy(job)
    out.ClearField("update_time")
    return out
