"""Job records: state in memory, the manifest in the store after every state change.

The manifest is the source of truth across restarts: on start the registry loads every
``jobs/*/manifest.json``; jobs that were not finished are handed back to the runner.
Watchers wait on a per-job version counter, so each sees every change after its snapshot.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from google.protobuf import struct_pb2, timestamp_pb2

from audiomesh import errors, manifest
from audiomesh.store import ObjectStore
from audiomesh.telemetry import logger
from audiomesh.v1 import common_pb2, orchestrator_pb2

TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
_PROGRESS_PERSIST_INTERVAL = 2.0  # seconds between manifest writes caused by progress alone


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

    @property
    def terminal(self) -> bool:
        return self.job.state in TERMINAL

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
        self.loaded = False  # every manifest in the store read (set by the orchestrator's recovery)
        self.closing = False  # the orchestrator is stopping: watchers end (close_watchers)
        self._config = struct_pb2.Struct()
        self._config.update(config)
        self.log = logger(component="jobs")

    # --- lookup -----------------------------------------------------------------------
    def require_loaded(self) -> None:
        """Job RPCs answer UNAVAILABLE (which clients retry) until recovery has read every
        manifest: a half-loaded registry would call a job from before the restart NOT_FOUND."""
        if not self.loaded:
            raise errors.Unavailable("orchestrator is loading jobs from the store; retry")

    def get(self, job_id: str) -> JobRecord:
        validate_job_id(job_id)
        rec = self.records.get(job_id)
        if rec is None:
            raise errors.NotFound(f"job {job_id!r} not found")
        return rec

    def newest_first(self) -> list[JobRecord]:
        # job_id breaks ties so the order is total (ListJobs' cursor relies on it).
        return sorted(
            self.records.values(), key=lambda r: (r.job.create_time.ToNanoseconds(), r.job.job_id), reverse=True
        )

    # --- changes ----------------------------------------------------------------------
    async def add(self, job: orchestrator_pb2.Job, event: str) -> JobRecord:
        rec = JobRecord(job=job)
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
        rec.version += 1
        async with rec.changed:
            rec.changed.notify_all()

    async def persist(self, rec: JobRecord) -> None:
        """One atomic write (file: temp + fsync + rename; S3: one PUT). A store that cannot be
        reached is retried for ``outage_budget`` seconds; a full or unreachable store leaves the
        previous manifest intact and is logged — the job goes on in memory and the next change
        writes again."""
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
            try:
                await asyncio.to_thread(self.store.put_bytes, rec.job.manifest_key, data)
                rec.persist_error = ""
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
        rec = self.get(job_id)

        def moved_since(version: int) -> Callable[[], bool]:  # binds `version` now (a lambda in the loop would not)
            return lambda: rec.version != version or self.closing

        seen = rec.version
        snapshot = _copy(rec.job)
        yield snapshot
        sent = _visible(snapshot)
        # Decide on the snapshot sent, not the live record: the last message is the final state.
        while snapshot.state not in TERMINAL and job_id in self.records:
            async with rec.changed:
                await rec.changed.wait_for(moved_since(seen))
            if self.closing:
                raise errors.Unavailable(
                    f"the orchestrator is stopping; job {job_id} resumes when it is back: watch it again then"
                )
            seen = rec.version
            current = _copy(rec.job)
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
        # Wake watchers so they end.
        rec.version += 1
        async with rec.changed:
            rec.changed.notify_all()
        return count

    # --- recovery and retention ---------------------------------------------------------
    async def load_all(self) -> list[JobRecord]:
        """Read every manifest in the store; return the records that must be resumed.

        All or nothing: a store that stops answering half-way raises
        :class:`~audiomesh.errors.Unavailable` (the caller retries the whole load) instead of
        skipping the manifests it could not read — those jobs would vanish."""
        infos = await asyncio.to_thread(lambda: list(self.store.list("jobs/")))
        loaded: dict[str, JobRecord] = {}
        for info in infos:
            if not info.key.endswith("/manifest.json"):
                continue
            try:
                data = await asyncio.to_thread(self.store.get_bytes, info.key)
                doc = manifest.loads(data)
            except errors.Unavailable:
                raise
            except errors.AudiomeshError as exc:
                self.log.warning("skipping unreadable manifest", key=info.key, reason=str(exc))
                continue
            loaded[doc.job.job_id] = JobRecord(job=doc.job, events=list(doc.events))
        self.records.update(loaded)
        return [rec for rec in loaded.values() if not rec.terminal]

    async def sweep(self, retention_hours: float) -> tuple[int, int]:
        """Retention, one pass: delete finished jobs older than ``retention_hours`` (with the
        uploads only they used), then uploads no job uses that are older than that (an upload
        without a job that CreateJob never got). Returns (jobs, uploads) deleted; 0 hours keeps all."""
        jobs = self.expired(retention_hours)
        for job_id in jobs:
            await self.delete(job_id)
        if retention_hours <= 0:
            return len(jobs), 0
        cutoff = datetime.now(UTC) - timedelta(hours=retention_hours)
        infos = await asyncio.to_thread(lambda: list(self.store.list(UPLOADS)))
        used = {r.job.input.key for r in self.records.values()}
        orphans = [i.key for i in infos if i.key not in used and i.last_modified < cutoff]
        for key in orphans:
            await asyncio.to_thread(self.store.delete, key)
        if jobs or orphans:
            self.log.info("retention sweep", jobs_deleted=len(jobs), orphaned_uploads_deleted=len(orphans))
        return len(jobs), len(orphans)

    def expired(self, retention_hours: float) -> list[str]:
        if retention_hours <= 0:
            return []
        cutoff = datetime.now(UTC) - timedelta(hours=retention_hours)
        return [
            r.job.job_id
            for r in self.records.values()
            if r.terminal and r.job.create_time.ToDatetime(tzinfo=UTC) < cutoff
        ]


def validate_job_id(job_id: str) -> None:
    """Job ids are UUID4 strings; anything else never touches a key."""
    import uuid

    try:
        ok = str(uuid.UUID(job_id)) == job_id
    except (ValueError, AttributeError, TypeError):
        ok = False
    if not ok:
        raise errors.InvalidInput(f"job_id {job_id!r} is not a job id (a lowercase UUID)")


def _copy(job: orchestrator_pb2.Job) -> orchestrator_pb2.Job:
    out = orchestrator_pb2.Job()
    out.CopyFrom(job)
    return out


def _visible(job: orchestrator_pb2.Job) -> orchestrator_pb2.Job:
    """``job`` as a watcher compares it: without the time of the last write."""
    out = _copy(job)
    out.ClearField("update_time")
    return out
