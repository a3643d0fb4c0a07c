"""This orchestrator's part in a cluster of equal replicas sharing one object store.

Each replica runs the jobs whose lease it holds (lease.py) and follows the rest from their
manifests. Three background duties:

- **keep**: one task per held lease renews it every TTL/3 and notices a cancel request that
  another replica left in the store; a lost lease stops the job at once, with no more writes;
- **scan**: every few seconds, find jobs created elsewhere, re-read unfinished ones, and take
  over those whose lease was released or stayed unchanged for a whole TTL (their holder
  stopped, was killed, or is cut off);
- **hand off**: on SIGTERM, stop taking jobs and release every held lease after writing the
  job's state, so a peer resumes it at once, reusing every node output already stored.

docs/consistency.md gives the argument for why no job runs on two replicas at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

from audiomesh import errors, metrics
from audiomesh.config import Settings
from audiomesh.store import ObjectStore
from audiomesh.telemetry import logger

from .jobs import FOLLOW_INTERVAL, TERMINAL, JobRecord, JobRegistry
from .lease import RENEWER, Lease, LeaseLost, Leases, on_writer, write_through
from .runner import Runner

__all__ = ["Cluster", "cancel_key"]

_TAKE_OVER_CONCURRENCY = 8  # jobs looked at (and taken over) at once per scan


def cancel_key(job_id: str) -> str:
    """Left by a replica asked to cancel a job it does not run; the holder acts on it."""
    return f"jobs/{job_id}/cancel-requested"


class Cluster:
    def __init__(self, settings: Settings, store: ObjectStore, registry: JobRegistry, runner: Runner) -> None:
        self.replica = settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.ttl = settings.lease_ttl_seconds
        self.store = store
        self.registry = registry
        self.runner = runner
        self.leases = Leases(store, self.replica, self.ttl)
        self.stopping = False
        self._keepers: dict[str, asyncio.Task[None]] = {}
        self._scanner: asyncio.Task[None] | None = None
        self.log = logger(component="cluster", replica=self.replica)
        registry.on_lost = self._lost
        runner.release = self.release

    # --- jobs this replica runs ---------------------------------------------------------
    async def claim_new(self, job_id: str) -> Lease:
        return await on_writer(self.leases.claim_new, job_id)

    def run(self, rec: JobRecord) -> None:
        """Run a job whose lease this replica holds, keeping the lease renewed meanwhile."""
        assert rec.lease is not None
        rec.lost = False
        job_id = rec.job.job_id
        old = self._keepers.pop(job_id, None)
        if old is not None:
            old.cancel()
        self._keepers[job_id] = asyncio.ensure_future(self._keep(rec))
        self.runner.start(rec)

    async def _keep(self, rec: JobRecord) -> None:
        """Renew ``rec``'s lease every TTL/3 until it is released or lost; look for cancel requests
        every second. The lease's own deadline (TTL × 2/3 after the last renewal was sent) is
        enforced here on a timer, whatever the store does: no store call is awaited past it (a
        partitioned store does not answer, it hangs), so the job stops in time."""
        tick = min(1.0, self.ttl / 3)
        job_id = rec.job.job_id
        cancel_check: asyncio.Task[None] | None = None
        try:
            while (lease := rec.lease) is not None:
                due = lease.sent_at + self.ttl / 3
                await asyncio.sleep(max(0.0, min(tick, due - time.monotonic(), lease.remaining())))
                if rec.lease is not lease:
                    continue
                if not lease.valid():
                    self.registry.lose(rec, f"the lease was not renewed within {self.ttl * 2 / 3:.1f} s")
                    return
                try:
                    if time.monotonic() >= due and not await self._renew(rec, lease):
                        return
                    if cancel_check is None or cancel_check.done():  # a hung check is not stacked
                        cancel_check = asyncio.ensure_future(self._check_cancel(rec))
                except Exception:  # noqa: BLE001 - a bug here must not leave a job running unrenewed
                    self.log.exception("lease keeper error; carrying on", job_id=job_id)
        finally:
            if cancel_check is not None:
                cancel_check.cancel()

    async def _renew(self, rec: JobRecord, lease: Lease) -> bool:
        """One renewal, bounded by the lease's deadline; False when the lease is lost."""

        def renewed(new: Lease) -> None:
            if rec.lease is lease:  # not released or lost meanwhile
                rec.lease = new

        while True:
            write = asyncio.ensure_future(write_through(renewed, self.leases.renew, lease, pool=RENEWER))
            done, _ = await asyncio.wait({write}, timeout=max(0.0, lease.remaining()))
            if not done:  # the store hangs past the deadline: stop now; the write may land later, harmlessly
                self.registry.lose(rec, f"the lease renewal did not answer within {self.ttl * 2 / 3:.1f} s")
                return False
            exc = write.exception()
            if exc is None:
                return True
            if isinstance(exc, LeaseLost):
                self.registry.lose(rec, str(exc))
                return False
            if not lease.valid():
                self.registry.lose(rec, f"the lease could not be renewed for {self.ttl * 2 / 3:.1f} s: {exc}")
                return False
            self.log.warning("lease not renewed; retrying", job_id=rec.job.job_id, reason=str(exc))
            await asyncio.sleep(min(0.5, max(0.05, lease.remaining() / 4)))

    async def _check_cancel(self, rec: JobRecord) -> None:
        key = cancel_key(rec.job.job_id)
        with contextlib.suppress(errors.AudiomeshError):
            if await asyncio.to_thread(self.store.exists, key) and rec.task is not None and not rec.task.done():
                self.log.info("cancel requested through another orchestrator", job_id=rec.job.job_id)
                rec.task.cancel()
                await asyncio.to_thread(self.store.delete, key)

    def _lost(self, rec: JobRecord, reason: str) -> None:
        """The registry found the lease gone: stop renewing, stop the job (it writes nothing more)."""
        keeper = self._keepers.pop(rec.job.job_id, None)
        if keeper is not None and keeper is not asyncio.current_task():
            keeper.cancel()
        rec.lost = True
        if rec.task is not None and not rec.task.done():
            rec.task.cancel()

    async def release(self, rec: JobRecord) -> None:
        """Give the job's lease up (it ended, or this replica is stopping): a peer may take it at once."""
        keeper = self._keepers.pop(rec.job.job_id, None)
        if keeper is not None and keeper is not asyncio.current_task():
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        lease, rec.lease = rec.lease, None
        rec.refreshed = time.monotonic()
        if lease is not None:
            try:
                released = await on_writer(self.leases.release, lease)
            except errors.AudiomeshError as exc:  # the store is down: the lease expires by itself
                self.log.warning("lease not released; it expires after its TTL", job_id=rec.job.job_id, reason=str(exc))
                return
            self.log.info("lease released", job_id=rec.job.job_id, released=released, epoch=lease.epoch)

    # --- jobs other replicas run ----------------------------------------------------------
    async def take(self, rec: JobRecord, *, wait: float = 0.0) -> bool:
        """Take the job's lease if it is free (polling up to ``wait`` seconds), then read its
        manifest as it is now: the state to resume and the ETag every later write is fenced on."""
        deadline = time.monotonic() + wait
        job_id = rec.job.job_id
        while True:
            lease = await on_writer(self.leases.try_take, job_id)
            if lease is not None:
                break
            if time.monotonic() >= deadline or self.stopping:
                return False
            await asyncio.sleep(FOLLOW_INTERVAL)
        try:
            data, info = await on_writer(self.store.read, rec.job.manifest_key)
        except errors.NotFound:  # deleted meanwhile
            await on_writer(self.leases.release, lease)
            return False
        rec.lease = lease  # first: a concurrent refresh must not overwrite what is read here
        await self.registry.load_into(rec, data, info.etag)
        return True

    async def adopt(self, rec: JobRecord) -> bool:
        """Take over an unfinished job whose holder went silent or let go; resume it here."""
        if not await self.take(rec) or rec.terminal:
            if rec.owned:  # it ended just before the lease was taken: nothing to run
                await self.release(rec)
            return False
        assert rec.lease is not None
        reason = rec.lease.taken or "expired"
        self.log.info("job taken over", job_id=rec.job.job_id, epoch=rec.lease.epoch, reason=reason)
        # The first write, fenced on the ETag just read: if a stale holder slipped a write in, this fails.
        await self.registry.changed(rec, f"job taken over by {rec.lease.label}")
        if rec.owned:
            metrics.JOB_TAKEOVERS.labels(reason=reason).inc()
            self.run(rec)
        return rec.owned

    async def scan_once(self) -> int:
        """Discover new jobs, refresh unfinished ones, take over free ones (several at once: a
        dead replica's jobs all come free together); returns how many were taken."""
        await self.registry.discover()
        slots = asyncio.Semaphore(_TAKE_OVER_CONCURRENCY)

        async def look_at(rec: JobRecord) -> bool:
            async with slots:
                if self.stopping:
                    return False
                try:
                    await self.registry.refresh(rec)
                    if rec.terminal or rec.owned or rec.job.job_id not in self.registry.records:
                        return False
                    return await self.adopt(rec)
                except errors.Unavailable as exc:
                    self.log.warning(
                        "job not taken over: the store did not answer", job_id=rec.job.job_id, reason=str(exc)
                    )
                    return False

        candidates = [
            rec
            for rec in list(self.registry.records.values())
            # By what was published (written): a lost holder's memory may hold an end it never wrote.
            if not (rec.snapshot.state in TERMINAL or rec.owned or (rec.task is not None and not rec.task.done()))
        ]
        return sum(await asyncio.gather(*(look_at(rec) for rec in candidates)))

    def start_scanning(self) -> None:
        self._scanner = asyncio.ensure_future(self._scan_forever())

    async def _scan_forever(self) -> None:
        interval = max(0.2, min(2.0, self.ttl / 5))
        while not self.stopping:
            try:
                await self.scan_once()
            except Exception as exc:  # noqa: BLE001 - a store outage must not end the scanner
                self.log.warning("cluster scan failed; next one as scheduled", reason=str(exc))
            await asyncio.sleep(interval)

    async def request_cancel(self, rec: JobRecord, wait: float = 30.0) -> None:
        """Cancel a job another replica runs: leave the request in the store, wait for the end."""
        await asyncio.to_thread(self.store.put_bytes, cancel_key(rec.job.job_id), self.replica.encode())
        deadline = time.monotonic() + wait
        while not rec.terminal and not rec.owned and time.monotonic() < deadline:
            await asyncio.sleep(FOLLOW_INTERVAL)
            await self.registry.refresh(rec)

    async def stop(self) -> None:
        """Hand off: take nothing more, and let the runner write and release every held job."""
        self.stopping = True
        if self._scanner is not None:
            self._scanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scanner
        await self.runner.shutdown()
        for keeper in list(self._keepers.values()):
            keeper.cancel()
