"""Job leases in the object store: who runs a job, for how long, and how another replica takes over.

A lease is one small object per job (``jobs/{id}/lease.json``) written only with conditional
PUTs, so the store's compare-and-swap on the ETag is the only arbiter (docs/consistency.md
has the argument):

- **claim** a new job: ``If-None-Match: *`` (exactly one creator wins), epoch 1;
- **renew** every TTL/3: ``If-Match`` on the ETag this holder last wrote; a 412 means another
  replica took the job: stop at once and write nothing more;
- **hold** only while fresh: the holder stops acting once TTL × 2/3 has passed on its own
  monotonic clock since it *sent* its last successful write (:meth:`Lease.valid`);
- **take over** a job whose lease ETag stayed the same for a whole TTL on the observer's own
  monotonic clock (or that was released): ``If-Match`` on that ETag, epoch + 1;
- **release** on hand-off or when the job ended: ``If-Match``, ``released: true`` — a peer
  takes it at once instead of after the TTL.

No wall clock is compared between machines: only durations on each replica's own monotonic
clock, assumed to run at the same rate within a few percent.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from audiomesh import errors
from audiomesh.store import ObjectStore

__all__ = ["RENEWER", "WRITER", "Lease", "LeaseDoc", "LeaseLost", "Leases", "lease_key", "on_writer", "write_through"]

T = TypeVar("T")

# The holder stops acting after this fraction of the TTL without a successful renewal;
# an observer waits a whole TTL. The gap (a third of the TTL) absorbs a slow PUT and clock rate skew.
_VALID_FRACTION = 2 / 3


def lease_key(job_id: str) -> str:
    return f"jobs/{job_id}/lease.json"


#: Lease and manifest writes run on their own threads: never queued behind uploads, decodes or
#: listings on the default executor, which would delay a renewal past the lease's deadline.
WRITER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lease-writer")
#: Renewals have threads of their own again: a burst of take-overs (a dead peer's jobs all come
#: free at once) or manifest writes to a slow store must not queue them past their deadline.
RENEWER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lease-renewer")


async def write_through(
    record: Callable[[T], object], fn: Callable[..., T], *args: Any, pool: Executor = WRITER, **kwargs: Any
) -> T:
    """``fn`` (a blocking conditional write) on ``pool``'s threads, its answer passed to
    ``record`` even if the caller is cancelled meanwhile. The write lands either way, and the
    caller must learn its new ETag — else its next conditional write fails on its own change
    and it thinks it lost the job. A cancelled caller waits for the answer (holding whatever
    lock it holds, so no write of the same object overtakes this one), then the cancellation
    goes on."""

    def done(f: asyncio.Future[T]) -> None:
        if not f.cancelled() and f.exception() is None:
            record(f.result())

    future = asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))
    future.add_done_callback(done)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if not future.done():
            await asyncio.wait([future])
        raise


async def on_writer(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn`` on the :data:`WRITER` threads (lease reads and writes that need no ``record``)."""
    return await asyncio.get_running_loop().run_in_executor(WRITER, functools.partial(fn, *args, **kwargs))


class LeaseLost(errors.AudiomeshError):
    """This replica no longer holds the job's lease: it must stop and write nothing more."""

    code = "ABORTED"


@dataclass(frozen=True)
class LeaseDoc:
    """The lease object's content."""

    owner: str  # the holder's replica id
    epoch: int  # +1 on every change of holder; node outputs and manifests are written under it
    ttl_seconds: float
    released: bool = False
    renewals: int = 0  # makes every renewal's content (and so its ETag) differ

    def dumps(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "epoch": self.epoch,
                "ttl_seconds": self.ttl_seconds,
                "released": self.released,
                "renewals": self.renewals,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def loads(cls, data: bytes) -> LeaseDoc | None:
        """The lease, or None when the object is not one (then only a TTL of silence frees it)."""
        try:
            doc = json.loads(data)
            return cls(
                owner=str(doc["owner"]),
                epoch=int(doc["epoch"]),
                ttl_seconds=float(doc["ttl_seconds"]),
                released=bool(doc.get("released", False)),
                renewals=int(doc.get("renewals", 0)),
            )
        except (ValueError, TypeError, KeyError):
            return None


@dataclass
class Lease:
    """A lease this replica holds: the ETag it last wrote and when it sent that write."""

    job_id: str
    owner: str
    epoch: int
    ttl: float
    etag: str
    sent_at: float  # monotonic time the last successful write was *sent* (not answered)
    renewals: int = 0
    taken: str = ""  # how try_take found it free: "released" by its holder, or "expired" (or missing)

    def valid(self, now: float | None = None) -> bool:
        """Whether the holder may still act: less than TTL × 2/3 since its last successful write was sent."""
        now = time.monotonic() if now is None else now
        return now - self.sent_at < self.ttl * _VALID_FRACTION

    def remaining(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return self.sent_at + self.ttl * _VALID_FRACTION - now

    @property
    def label(self) -> str:
        return f"{self.owner} (lease epoch {self.epoch})"


@dataclass
class _Sighting:
    etag: str | None  # None: no lease object at all
    since: float  # monotonic time this replica first saw it


@dataclass
class Leases:
    """Lease operations for one replica (blocking store calls: run them in a thread)."""

    store: ObjectStore
    owner: str
    ttl: float
    _seen: dict[str, _Sighting] = field(default_factory=dict)

    def _write(self, job_id: str, doc: LeaseDoc, **condition: object) -> Lease:
        sent = time.monotonic()
        try:
            info = self.store.put_if(lease_key(job_id), doc.dumps(), **condition)  # type: ignore[arg-type]
        except errors.PreconditionFailed as exc:
            raise LeaseLost(f"job {job_id}: the lease changed hands ({exc})") from None
        assert info.etag, "a store with conditional writes reports ETags"
        self._seen.pop(job_id, None)
        return Lease(job_id, self.owner, doc.epoch, doc.ttl_seconds, info.etag, sent, doc.renewals)

    def _verified(self, lease: Lease) -> Lease:
        """Read a new holder's lease back: a store whose conditional PUT is check-then-write
        (versitygw <= 1.7.0) can let two racing writers both "win"; the last write is the one that
        stays, and only its writer goes on."""
        _, info = self.store.read(lease_key(lease.job_id))
        if info.etag != lease.etag:
            raise LeaseLost(f"job {lease.job_id}: another replica's lease write landed after this one's")
        return lease

    def claim_new(self, job_id: str) -> Lease:
        """The lease of a job this replica creates: LeaseLost if one exists already."""
        return self._verified(self._write(job_id, LeaseDoc(self.owner, 1, self.ttl), if_none_match=True))

    def renew(self, lease: Lease) -> Lease:
        """Extend ``lease``; LeaseLost if it changed since this holder wrote it (someone took it)."""
        doc = LeaseDoc(self.owner, lease.epoch, lease.ttl, renewals=lease.renewals + 1)
        return self._write(lease.job_id, doc, if_match=lease.etag)

    def release(self, lease: Lease) -> bool:
        """Give the job up so a peer takes it at once; False if it was no longer ours."""
        doc = LeaseDoc(self.owner, lease.epoch, lease.ttl, released=True, renewals=lease.renewals + 1)
        try:
            self._write(lease.job_id, doc, if_match=lease.etag)
        except LeaseLost:
            return False
        return True

    def try_take(self, job_id: str, *, now: float | None = None, force: bool = False) -> Lease | None:
        """Take the job's lease if it is free: released, missing, or unchanged for a whole TTL on
        this replica's clock (``force``: the job has ended, so its holder has nothing left to do).
        None when it is held (this call starts or continues watching its ETag) or another replica
        won the race. Unavailable passes through."""
        try:
            data, info = self.store.read(lease_key(job_id))
        except errors.NotFound:
            data, info = None, None
        # After the read: a sighting must not predate the write it sees (a slow GET would start
        # the TTL before the holder even sent its renewal).
        now = time.monotonic() if now is None else now
        etag = info.etag if info else None
        doc = LeaseDoc.loads(data) if data is not None else None
        seen = self._seen.get(job_id)
        if seen is None or seen.etag != etag:
            seen = self._seen[job_id] = _Sighting(etag, now)
        ttl = max(self.ttl, doc.ttl_seconds if doc else 0.0)  # the holder's own TTL when longer
        free = force or (doc is not None and doc.released) or etag is None or now - seen.since >= ttl
        if not free:
            return None
        epoch = (doc.epoch if doc else 0) + 1
        new = LeaseDoc(self.owner, epoch, self.ttl)
        taken = "released" if doc is not None and doc.released else "expired"
        try:
            if etag is None:
                return replace(self._verified(self._write(job_id, new, if_none_match=True)), taken=taken)
            return replace(self._verified(self._write(job_id, new, if_match=etag)), taken=taken)
        except LeaseLost:
            self._seen.pop(job_id, None)
            return None

    def forget(self, job_id: str) -> None:
        self._seen.pop(job_id, None)
