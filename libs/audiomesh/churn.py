"""The cluster under churn: the same jobs on a quiet cluster, then again while replicas die.

``run_churn`` starts a mesh of several orchestrators and several of each worker
(``Mesh(replicas=...)``), runs N short synthetic songs with no faults (the reference: latency
and every track's sha256), then submits the same N songs again through the one ``ipv4:`` list
target and, while they run, kills (-9) random orchestrator and worker instances (each
restarted after a short delay, as Kubernetes would), SIGTERM-restarts every orchestrator once
(a rolling upgrade), and freezes (SIGSTOP) one job owner past its lease to check that it
cannot write stale state once resumed. Every fault is drawn from a seeded RNG and every wait
is bounded.

What it reports (``format_table``): jobs lost (not SUCCEEDED), jobs whose tracks differ from
the quiet run, nodes run more than once, duplicate owners (worker calls of one node under
different lease epochs overlapping in time, from the workers' JSON logs; lease epochs not
increasing along a manifest's events), p50/p95 latency quiet vs churn, and the time from an
orchestrator's kill -9 to its jobs' take-over. ``audiomesh churn`` runs it from the command
line; tests/test_cluster_churn.py runs a small one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_REPLICAS",
    "add_arguments",
    "cmd_churn",
    "Call",
    "cancelled_tails",
    "duplicate_owners",
    "epoch_regressions",
    "failures",
    "format_table",
    "lease_losses",
    "run_churn",
    "worker_calls",
]

#: The cluster of issue #16: three orchestrators, two of each worker.
DEFAULT_REPLICAS: dict[str, int] = {"orchestrator": 3, "separation": 2, "hpss": 2, "composite": 2, "normalize": 2}
SAMPLE_RATE = 44100
_EPOCH = re.compile(r"\(lease epoch (\d+)\)")
_TAKEN = re.compile(r"taken over by (\S+) \(lease epoch (\d+)\)")
_STARTED = re.compile(r"^(\S+) started$")
_REFUSED = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")
_MAX_WAVES = 4  # the churn phase submits the songs at most this many times


@dataclass
class _Job:
    """One submitted song as the client saw it."""

    index: int
    job_id: str = ""
    state: str = ""
    latency_s: float = 0.0
    tracks: dict[str, str] = field(default_factory=dict)  # track name -> sha256
    watch_complete: bool = False  # the (reconnecting) watch ended on a terminal state
    reconnects: int = 0
    error: str = ""


@dataclass
class _Faults:
    """What was done to the cluster, with wall-clock times to line up with the manifests."""

    orchestrator_kills: list[tuple[str, float, list[str]]] = field(default_factory=list)  # (instance, time, its jobs)
    worker_kills: list[tuple[str, float]] = field(default_factory=list)
    restarts: int = 0
    rolling: list[str] = field(default_factory=list)
    fencing: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    restart_errors: list[str] = field(default_factory=list)


def _iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _event_time(event: str) -> tuple[float, str]:
    stamp, _, text = event.partition(" ")
    return _iso(stamp), text


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --- the checks, on what the cluster left behind ------------------------------------------


class Call(NamedTuple):
    """One finished worker call, from the worker's log (wall clock: the log's timestamps)."""

    start: float  # end - duration
    end: float
    lease: str  # the holder that asked for it, "replica@epoch"
    code: str  # how it ended: OK, CANCELLED, ...


def worker_calls(log_files: list[Path], job_ids: set[str]) -> dict[tuple[str, str], list[Call]]:
    """Every finished worker call of these jobs, from the workers' JSON logs: ``(job id, node) ->
    [Call]``. Calls refused at the door (worker full or draining) did not run and are left out."""
    calls: dict[tuple[str, str], list[Call]] = {}
    for path in log_files:
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if '"rpc"' not in line or '"lease"' not in line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") != "rpc" or "node" not in entry or "lease" not in entry:
                    continue
                job_id, _, node = str(entry["node"]).partition("/")
                if job_id not in job_ids:
                    continue
                duration = float(entry.get("duration_ms", 0.0)) / 1000
                if entry.get("code") in _REFUSED and duration < 0.1:
                    continue  # refused at the door (worker full or draining): the node did not run there
                end = _iso(entry["timestamp"])
                start = end - duration
                calls.setdefault((job_id, node), []).append(
                    Call(start, end, str(entry["lease"]), str(entry.get("code", "")))
                )
    return calls


def lease_losses(log_files: list[Path], job_ids: set[str]) -> int:
    """How many times a live orchestrator gave up one of these jobs because it could not keep
    its lease (renewal too slow, or the lease expired before a write): from their JSON logs."""
    count = 0
    for path in log_files:
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if "job lease lost" in line:
                    with contextlib.suppress(ValueError):
                        count += json.loads(line).get("job_id") in job_ids
    return count


def duplicate_owners(calls: Mapping[tuple[str, str], list[Call]]) -> list[dict[str, Any]]:
    """(job, node) pairs run by two lease holders at once: calls under different epochs that
    overlap in time, unless the older holder's call ended CANCELLED — a cancelled call stops at
    the worker's next chunk and publishes nothing (see :func:`cancelled_tails`)."""
    return [o for o in _overlaps(calls) if not o["cancelled"]]


def cancelled_tails(calls: Mapping[tuple[str, str], list[Call]]) -> list[dict[str, Any]]:
    """Overlaps where the older holder's call had been cancelled and was finishing its chunk."""
    return [o for o in _overlaps(calls) if o["cancelled"]]


def _overlaps(calls: Mapping[tuple[str, str], list[Call]]) -> list[dict[str, Any]]:
    found = []
    for (job_id, node), spans in calls.items():
        for i, a in enumerate(spans):
            for b in spans[i + 1 :]:
                ea, eb = int(a.lease.rpartition("@")[2] or 0), int(b.lease.rpartition("@")[2] or 0)
                if ea != eb and a.start < b.end and b.start < a.end:
                    older = a if ea < eb else b
                    found.append(
                        {
                            "job_id": job_id,
                            "node": node,
                            "leases": [a.lease, b.lease],
                            "overlap_s": round(min(a.end, b.end) - max(a.start, b.start), 3),
                            "cancelled": older.code == "CANCELLED",
                        }
                    )
    return found


def epoch_regressions(events: list[str]) -> list[str]:
    """Events whose lease epoch is not above the previous one's (epochs strictly increase)."""
    bad, last = [], 0
    for event in events:
        if m := _EPOCH.search(event):
            epoch = int(m.group(1))
            if epoch <= last:
                bad.append(event)
            last = max(last, epoch)
    return bad


def _reruns(events: list[str]) -> int:
    """Node starts beyond the first, per node."""
    counts: dict[str, int] = {}
    for event in events:
        if m := _STARTED.match(_event_time(event)[1]):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return sum(n - 1 for n in counts.values() if n > 1)


# --- the scenario ----------------------------------------------------------------------------


def _songs(folder: Path, n: int, seconds: float, seed: int) -> list[Path]:
    import soundfile as sf

    from audiomesh.demo import synth_song

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"song-{i:02d}.wav"
        sf.write(path, synth_song(seconds, SAMPLE_RATE, seed=seed * 1000 + i).T, SAMPLE_RATE, subtype="PCM_16")
        paths.append(path)
    return paths


async def _run_jobs(
    target: str, songs: list[Path], limit_s: float, shifts: int, created: asyncio.Event | None = None
) -> list[_Job]:
    """Submit every song at once through ``target`` and follow each job to its end with the
    reconnecting watch; ``created`` is set once every job exists. ``shifts`` 0: Demucs' random
    time shift off, so the same song gives the same tracks on any run."""
    import grpc

    from audiomesh.rpc import ClientFactory
    from audiomesh.rpc.client import follow_job
    from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

    clients = ClientFactory()
    stub = clients.stub(orchestrator_pb2_grpc.OrchestratorServiceStub, target)
    jobs = [_Job(i) for i in range(len(songs))]
    options = orchestrator_pb2.JobOptions()
    options.separation.shifts = shifts
    pending = len(songs)

    async def upload(song: Path) -> orchestrator_pb2.Job:
        data = await asyncio.to_thread(song.read_bytes)

        async def messages():  # type: ignore[no-untyped-def]
            yield orchestrator_pb2.UploadAudioRequest(
                metadata=orchestrator_pb2.UploadMetadata(
                    filename=song.name, create_job=True, size_bytes=len(data), options=options
                )
            )
            for start in range(0, len(data), 1 << 20):
                yield orchestrator_pb2.UploadAudioRequest(chunk=data[start : start + (1 << 20)])

        for attempt in range(5):  # an orchestrator may die under the upload: try another
            try:
                return (await stub.UploadAudio(messages(), timeout=60)).job
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                    raise
                await asyncio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    async def one(job: _Job, song: Path) -> None:
        nonlocal pending
        started = time.monotonic()
        try:
            created_job = await upload(song)
        finally:
            pending -= 1
            if pending == 0 and created is not None:
                created.set()
        job.job_id = created_job.job_id

        def retried(attempt: int, delay: float, why: str) -> None:
            job.reconnects += 1

        last = created_job
        async for msg in follow_job(
            lambda: stub.WatchJob(orchestrator_pb2.WatchJobRequest(job_id=job.job_id)), on_retry=retried
        ):
            last = msg.job
        job.state = common_pb2.JobState.Name(last.state).removeprefix("JOB_STATE_")
        job.watch_complete = last.state in (
            common_pb2.JOB_STATE_SUCCEEDED,
            common_pb2.JOB_STATE_FAILED,
            common_pb2.JOB_STATE_CANCELLED,
        )
        job.latency_s = time.monotonic() - started
        job.tracks = {t.name: t.sha256 for t in last.tracks}
        if last.error.code:
            job.error = f"{last.error.code}: {last.error.message}"

    async def guarded(job: _Job, song: Path) -> None:
        try:
            async with asyncio.timeout(limit_s):
                await one(job, song)
        except Exception as exc:  # noqa: BLE001 - a job the client lost is a result, not a crash
            job.error = job.error or f"{type(exc).__name__}: {exc}"
            job.state = job.state or "LOST"

    try:
        await asyncio.gather(*(guarded(job, song) for job, song in zip(jobs, songs, strict=True)))
    finally:
        await clients.close()
    return jobs


class _Cluster:
    """The faults, on a running mesh (blocking calls: run them in a thread)."""

    def __init__(self, mesh: Any, store: Any, rng: random.Random, restart_delay: float, log: Callable[[str], None]):
        self.mesh, self.store, self.rng, self.restart_delay, self.log = mesh, store, rng, restart_delay, log
        self.faults = _Faults()
        self.since: set[str] = set()  # the quiet run's job ids
        self._restarting: set[str] = set()
        self._threads: list[threading.Thread] = []

    def leases(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Each unfinished job's lease as stored now (job id -> the lease document)."""
        out = {}
        for job_id in job_ids:
            with contextlib.suppress(Exception):
                doc = json.loads(self.store.get_bytes(f"jobs/{job_id}/lease.json"))
                if not doc.get("released") and self._state(job_id) in ("QUEUED", "RUNNING"):
                    out[job_id] = doc
        return out

    def manifest(self, job_id: str) -> tuple[dict[str, Any], str | None]:
        data, info = self.store.read(f"jobs/{job_id}/manifest.json")
        return json.loads(data), info.etag

    def _state(self, job_id: str) -> str:
        doc, _ = self.manifest(job_id)
        return str(doc.get("job", {}).get("state", "")).removeprefix("JOB_STATE_")

    def _up(self, service: str) -> list[str]:
        """Instances of ``service`` running now and not waiting for a restart."""
        return [
            i for i in self.mesh.instances(service) if i not in self._restarting and self.mesh.procs[i].poll() is None
        ]

    def owner_with_jobs(self, job_ids: list[str]) -> tuple[str | None, list[str]]:
        """A random running orchestrator among those holding an unfinished job (any running one
        if none does); None when it would be the last one up."""
        up = self._up("orchestrator")
        if len(up) < len(self.mesh.instances("orchestrator")):
            return None, []  # one orchestrator down at a time: the others take its jobs
        held: dict[str, list[str]] = {}
        for job_id, doc in self.leases(job_ids).items():
            held.setdefault(doc["owner"], []).append(job_id)
        name = self.rng.choice([i for i in up if i in held] or up)
        return name, held.get(name, [])

    def _restart_later(self, name: str, delay: float) -> None:
        """Start ``name`` again after ``delay`` in a thread, as Kubernetes restarts a container:
        the next fault does not wait for it."""
        self._restarting.add(name)

        def run() -> None:
            try:
                time.sleep(delay)
                self.mesh.restart(name)
                self.faults.restarts += 1
            except Exception as exc:  # noqa: BLE001 - reported, and the run goes on without it
                self.faults.restart_errors.append(f"{name}: {exc}")
            finally:
                self._restarting.discard(name)

        thread = threading.Thread(target=run, name=f"restart-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self, timeout: float) -> None:
        """Wait (bounded) for every pending restart."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))

    def kill_orchestrator(self, job_ids: list[str]) -> bool:
        name, owned = self.owner_with_jobs(job_ids)
        if name is None:
            return False
        self.mesh.kill(name)
        self.faults.orchestrator_kills.append((name, time.time(), owned))
        self.log(f"churn: kill -9 {name} (holding {len(owned)} jobs)")
        self._restart_later(name, self.restart_delay)
        return True

    def kill_worker(self) -> bool:
        from audiomesh.launcher import WORKERS

        # Never the last instance of a service up: its nodes would only wait.
        candidates = [i for w in WORKERS if len(up := self._up(w)) > 1 for i in up]
        if not candidates:
            return False
        name = self.rng.choice(candidates)
        self.mesh.kill(name)
        self.faults.worker_kills.append((name, time.time()))
        self.log(f"churn: kill -9 {name}")
        self._restart_later(name, self.restart_delay)
        return True

    def roll(self, name: str) -> bool:
        """A rolling upgrade's step: SIGTERM (hand-off), wait for the exit, start again."""
        # A rolling upgrade may overlap a restart (Kubernetes' surge does), but keeps one serving.
        if name not in self._up("orchestrator") or len(self._up("orchestrator")) < 2:
            return False
        self.log(f"churn: SIGTERM-restart {name}")
        code = self.mesh.terminate(name, timeout=120)
        if code != 0:
            self.faults.restart_errors.append(f"{name} exited with code {code} on SIGTERM")
        self.faults.rolling.append(name)
        self._restart_later(name, 0.0)
        return True

    def fence(self, job_ids: list[str], ttl: float) -> bool:
        """Freeze a job owner past its lease; once another replica took the job, resume it and
        check that it wrote nothing more (the manifest only grows from the snapshot taken while
        it was frozen) and that it noticed it lost the lease."""
        check: dict[str, Any] = self.faults.fencing
        up = set(self._up("orchestrator"))
        if len(up) < len(self.mesh.instances("orchestrator")):
            return False  # asked again in a moment
        # A job its owner is renewing right now (its lease changed within TTL/2 under the same
        # owner): one dropped already (a renewal that came too late) would test nothing.
        before = self.leases(job_ids)
        time.sleep(ttl / 2)
        after = self.leases(job_ids)
        running = [
            j
            for j, doc in after.items()
            if doc["owner"] in up
            and j in before
            and before[j]["owner"] == doc["owner"]
            and before[j].get("renewals") != doc.get("renewals")
            and self._state(j) == "RUNNING"
        ]
        if not running:
            return False
        job_id = self.rng.choice(running)
        owner = after[job_id]["owner"]
        check.update(job_id=job_id, owner=owner)
        self.log(f"churn: SIGSTOP {owner} (holds {job_id}) for longer than its lease")
        log_path = self.mesh.log_dir / f"{owner}.log"
        log_offset = log_path.stat().st_size
        paused = time.time()
        self.mesh.pause(owner)
        try:
            deadline = time.monotonic() + 3 * ttl + 30
            taken: tuple[str, int] | None = None
            while time.monotonic() < deadline:
                doc, etag = self.manifest(job_id)
                for event in doc.get("events", []):
                    at, text = _event_time(event)
                    if at >= paused and (m := _TAKEN.search(text)):
                        taken = (m.group(1), int(m.group(2)))
                if taken or doc.get("job", {}).get("state", "").endswith(("SUCCEEDED", "FAILED", "CANCELLED")):
                    break
                time.sleep(0.2)
            check["taken_over_after_s"] = round(time.time() - paused, 2) if taken else None
            check["new_owner"] = taken[0] if taken else None
            snapshot = list(doc.get("events", []))
            # Still frozen past the take-over by a little: its next writes see a stale ETag.
            time.sleep(0.5)
        finally:
            self.mesh.resume(owner)
        resumed = time.time()
        check["paused_s"] = round(resumed - paused, 2)
        lost_line = None
        deadline = time.monotonic() + max(5.0, ttl) + 5
        while time.monotonic() < deadline and lost_line is None:
            time.sleep(0.25)
            with log_path.open(encoding="utf-8", errors="replace") as fh:
                fh.seek(log_offset)
                for line in fh:
                    if "lease lost" in line and job_id in line:
                        lost_line = line.strip()
                        break
        check["owner_logged_lease_lost"] = lost_line is not None
        time.sleep(1.0)  # room for a stale write to land, were one coming
        after, _ = self.manifest(job_id)
        events = list(after.get("events", []))
        # The manifest only grew from the snapshot read while the ex-owner was frozen: a stale
        # write would have put back its own, shorter (or different) event list.
        check["manifest_extends_snapshot"] = events[: len(snapshot)] == snapshot
        stale = [e for e in events[len(snapshot) :] if f"on {owner} " in e or f"by {owner} " in e]
        check["stale_events"] = stale
        check["ok"] = bool(
            taken and check["manifest_extends_snapshot"] and check["owner_logged_lease_lost"] and not stale
        )
        self.log(f"churn: resumed {owner}; fencing {'held' if check['ok'] else 'FAILED'}: {json.dumps(check)}")
        return True


async def _churn_phase(
    mesh: Any,
    cluster: _Cluster,
    songs: list[Path],
    *,
    orchestrator_kills: int,
    worker_kills: int,
    rolling: bool,
    fencing: bool,
    ttl: float,
    gap_s: float,
    limit_s: float,
    shifts: int,
) -> list[_Job]:
    async def wave() -> asyncio.Future[list[_Job]]:
        """The songs submitted once more; returns once every job exists."""
        created = asyncio.Event()
        runner = asyncio.ensure_future(_run_jobs(mesh.orchestrator, songs, limit_s, shifts, created))
        await asyncio.wait_for(created.wait(), limit_s)
        return runner

    waves = [await wave()]
    rng = cluster.rng
    plan: list[str] = ["kill-orchestrator"] * orchestrator_kills + ["kill-worker"] * worker_kills
    rng.shuffle(plan)
    if fencing:  # early, while jobs still run
        plan.insert(min(1, len(plan)), "fence")
    if rolling:  # the rolling upgrade interleaved with the kills, each orchestrator once
        for name in mesh.instances("orchestrator"):
            plan.insert(rng.randrange(len(plan) + 1), f"roll:{name}")
    deadline = time.monotonic() + limit_s
    # This phase's jobs, from the store: every manifest under jobs/ but the quiet run's.
    ids = await asyncio.to_thread(_job_ids_since, cluster.store, cluster.since)
    for step in plan:
        done = False
        while not done and time.monotonic() < deadline:
            if all(w.done() for w in waves) and len(waves) < _MAX_WAVES:
                # Every job ended before the faults did: the same songs again, so that each
                # fault still lands on running jobs (and each wave is compared with the quiet run).
                waves.append(await wave())
                ids = await asyncio.to_thread(_job_ids_since, cluster.store, cluster.since)
            if step == "kill-orchestrator":
                done = await asyncio.to_thread(cluster.kill_orchestrator, ids)
            elif step == "kill-worker":
                done = await asyncio.to_thread(cluster.kill_worker)
            elif step == "fence":
                done = await asyncio.to_thread(cluster.fence, ids, ttl)
            else:
                done = await asyncio.to_thread(cluster.roll, step.partition(":")[2])
            # Done: the next fault after a gap; not yet possible (a peer still restarting): soon.
            await asyncio.sleep(gap_s * (0.5 + rng.random()) if done else 0.5)
        if not done:
            cluster.faults.skipped.append(step)
    try:
        return [job for jobs in await asyncio.gather(*waves) for job in jobs]
    finally:
        await asyncio.to_thread(cluster.join, 300.0)


def _job_ids_since(store: Any, since: set[str]) -> list[str]:
    keys = [info.key for info in store.list("jobs/")]
    return sorted({k.split("/")[1] for k in keys if k.endswith("/manifest.json")} - since)


def _tiny_model(folder: Path) -> tuple[Path, str]:
    """A tiny HTDemucs with seeded weights in a local model repository: every separation
    process loads the same weights (``demucs_unittest`` draws new random ones in each process,
    so two replicas, or one restarted, would give different stems). 1 s segments keep it quick."""
    from fractions import Fraction

    from audiomesh.separation.repo import build_htdemucs, save_model_to_repo

    name = "churn_tiny_htdemucs"
    if not (folder / f"{name}.th").is_file():
        model = build_htdemucs(seed=0, channels=8, bottom_channels=0, t_layers=1, segment=Fraction(1))
        save_model_to_repo(model, name, folder)
    return folder, name


def run_churn(
    *,
    jobs: int = 20,
    song_seconds: float = 5.0,
    replicas: Mapping[str, int] | None = None,
    ttl: float = 5.0,
    orchestrator_kills: int = 3,
    worker_kills: int = 3,
    rolling: bool = True,
    fencing: bool = True,
    seed: int = 0,
    restart_delay: float = 1.0,
    gap_s: float = 2.0,
    shifts: int = 0,
    store_url: str = "",
    work: Path | None = None,
    env: Mapping[str, str] | None = None,
    limit_s: float = 900.0,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict[str, Any]:
    """The churn scenario (module docstring); returns the report ``format_table`` prints.

    ``store_url``: default a file store in ``work`` (a temporary folder unless given); an
    ``s3://`` URL uses the AUDIOMESH_S3_* settings of ``env`` / the environment. ``env``: more
    variables for the mesh. ``limit_s`` bounds each phase."""
    from audiomesh.launcher import Mesh

    started = time.monotonic()
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="audiomesh-churn-")
        work = Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    counts = dict(replicas or DEFAULT_REPLICAS)
    songs = _songs(work / "songs", jobs, song_seconds, seed)
    repo, model = _tiny_model(work / "models")
    mesh_env = {
        "AUDIOMESH_STORE_URL": store_url or (work / "store").resolve().as_uri(),
        "AUDIOMESH_DEFAULT_MODEL": model,
        "AUDIOMESH_MODEL_REPO": str(repo),
        "AUDIOMESH_LOG_FORMAT": "json",
        "AUDIOMESH_LOG_LEVEL": "info",
        "AUDIOMESH_TORCH_THREADS": "1",  # many processes on few cores
        "AUDIOMESH_RETENTION_HOURS": "0",
        "AUDIOMESH_LEASE_TTL_SECONDS": str(ttl),
        "AUDIOMESH_OTLP_ENDPOINT": "",
        "AUDIOMESH_API_KEYS": "",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    mesh = Mesh(env=mesh_env, log_dir=work / "logs", replicas=counts)
    report: dict[str, Any] = {
        "jobs": jobs,
        "song_s": song_seconds,
        "replicas": counts,
        "lease_ttl_s": ttl,
        "seed": seed,
    }
    try:
        mesh.start(timeout=300)
        report["mesh_start_s"] = round(time.monotonic() - started, 1)
        log(f"churn: mesh up in {report['mesh_start_s']} s ({mesh.orchestrator})")
        store = mesh.settings.open_store()
        try:
            t0 = time.monotonic()
            quiet = asyncio.run(_run_jobs(mesh.orchestrator, songs, limit_s, shifts))
            report["quiet_wall_s"] = round(time.monotonic() - t0, 1)
            log(f"churn: quiet run done in {report['quiet_wall_s']} s")
            cluster = _Cluster(mesh, store, random.Random(seed), restart_delay, log)
            cluster.since = {j.job_id for j in quiet}
            t0 = time.monotonic()
            churned = asyncio.run(
                _churn_phase(
                    mesh,
                    cluster,
                    songs,
                    orchestrator_kills=orchestrator_kills,
                    worker_kills=worker_kills,
                    rolling=rolling,
                    fencing=fencing,
                    ttl=ttl,
                    gap_s=gap_s,
                    limit_s=limit_s,
                    shifts=shifts,
                )
            )
            report["churn_wall_s"] = round(time.monotonic() - t0, 1)
            log(f"churn: churn run done in {report['churn_wall_s']} s")
            _analyse(report, mesh, store, quiet, churned, cluster.faults, ttl)
        finally:
            store.close()
    finally:
        mesh.stop()
        report["log_dir"] = str(mesh.log_dir)
        report["wall_s"] = round(time.monotonic() - started, 1)
        if tmp is not None:
            report["log_dir"] = ""
            tmp.cleanup()
    return report


def _analyse(
    report: dict[str, Any], mesh: Any, store: Any, quiet: list[_Job], churned: list[_Job], faults: _Faults, ttl: float
) -> None:
    from audiomesh.launcher import WORKERS

    manifests: dict[str, dict[str, Any]] = {}
    for job in churned:
        with contextlib.suppress(Exception):
            manifests[job.job_id] = json.loads(store.get_bytes(f"jobs/{job.job_id}/manifest.json"))
    events = {job_id: list(doc.get("events", [])) for job_id, doc in manifests.items()}
    # A job is lost when the store says so; a client that lost its watch is counted apart.
    for job in churned:
        doc = manifests.get(job.job_id, {}).get("job", {})
        if job.state != "SUCCEEDED" and doc.get("state") == "JOB_STATE_SUCCEEDED":
            job.state = "SUCCEEDED"
            job.tracks = {t["name"]: t["sha256"] for t in doc.get("tracks", [])}
            job.latency_s = 0.0  # unknown: the client stopped watching
    lost = [
        {"job_id": j.job_id, "state": j.state, "error": j.error}
        for j in churned
        if j.state != "SUCCEEDED" or not j.job_id
    ]
    differ = [
        {"song": c.index, "job_id": c.job_id}
        for c in churned
        if c.state == "SUCCEEDED" and (c.tracks != quiet[c.index].tracks or not c.tracks)
    ]
    quiet_bad = [f"{j.job_id} {j.state or '?'} {j.error}".strip() for j in quiet if j.state != "SUCCEEDED"]
    logs = [p for w in WORKERS for inst in mesh.instances(w) if (p := mesh.log_dir / f"{inst}.log").is_file()]
    calls = worker_calls(logs, {j.job_id for j in churned if j.job_id})
    orchestrator_logs = [p for inst in mesh.instances("orchestrator") if (p := mesh.log_dir / f"{inst}.log").is_file()]
    dup_calls = duplicate_owners(calls)
    tails = cancelled_tails(calls)
    dup_epochs = {job_id: bad for job_id, ev in events.items() if (bad := epoch_regressions(ev))}
    takeovers: list[float] = []
    not_taken: list[dict[str, Any]] = []
    for name, killed, owned in faults.orchestrator_kills:
        for job_id in owned:
            times = [(at, text) for at, text in map(_event_time, events.get(job_id, []))]
            ended_before = any(
                at < killed and text.startswith(("job succeeded", "job failed", "job cancelled")) for at, text in times
            )
            taken = [at for at, text in times if at >= killed and "taken over by" in text]
            if taken:
                takeovers.append(taken[0] - killed)
            elif not ended_before:
                not_taken.append({"job_id": job_id, "killed": name})
    q_lat = [j.latency_s for j in quiet if j.state == "SUCCEEDED"]
    c_lat = [j.latency_s for j in churned if j.state == "SUCCEEDED" and j.latency_s]
    report.update(
        churn_jobs=len(churned),
        quiet_failed=quiet_bad,
        kills_orchestrator=len(faults.orchestrator_kills),
        kills_worker=len(faults.worker_kills),
        killed=[k[0] for k in faults.orchestrator_kills] + [k[0] for k in faults.worker_kills],
        rolling_restarts=len(faults.rolling),
        restarts=faults.restarts,
        faults_skipped=faults.skipped,
        restart_errors=faults.restart_errors,
        jobs_lost=len(lost),
        lost=lost,
        tracks_differ=len(differ),
        differ=differ,
        nodes_rerun=sum(_reruns(ev) for ev in events.values()),
        duplicate_owners=len(dup_calls) + len(dup_epochs),
        duplicate_calls=dup_calls,
        epoch_regressions=dup_epochs,
        worker_calls_checked=sum(len(v) for v in calls.values()),
        cancelled_tails=len(tails),
        cancelled_tail_max_s=max((t["overlap_s"] for t in tails), default=0.0),
        lease_losses_quiet=lease_losses(orchestrator_logs, {j.job_id for j in quiet}),
        lease_losses_churn=lease_losses(orchestrator_logs, {j.job_id for j in churned}),
        watch_incomplete=[j.job_id for j in churned if not j.watch_complete],
        watch_errors=[j.error for j in churned if not j.watch_complete],
        watch_reconnects=sum(j.reconnects for j in churned),
        latency_quiet_p50_s=_round(_percentile(q_lat, 0.5)),
        latency_quiet_p95_s=_round(_percentile(q_lat, 0.95)),
        latency_churn_p50_s=_round(_percentile(c_lat, 0.5)),
        latency_churn_p95_s=_round(_percentile(c_lat, 0.95)),
        takeover_worst_s=_round(max(takeovers) if takeovers else None),
        takeover_median_s=_round(statistics.median(takeovers) if takeovers else None),
        takeovers_measured=len(takeovers),
        takeover_target_s=ttl + 5,
        not_taken_over=not_taken,
        fencing=faults.fencing,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def format_table(report: Mapping[str, Any]) -> str:
    """The report as the table BENCHMARKS.md shows."""

    def v(key: str, unit: str = "") -> str:
        value = report.get(key)
        return "—" if value is None else f"{value}{unit}"

    fence = report.get("fencing") or {}
    fence_text = "skipped" if not fence else ("held" if fence.get("ok") else f"FAILED {fence.get('skipped', '')}")
    if fence.get("taken_over_after_s") is not None:
        fence_text += f" (taken over {fence['taken_over_after_s']} s after SIGSTOP)"
    rows = [
        (
            "jobs (quiet / under churn)",
            f"{v('jobs')} / {v('churn_jobs')} × {v('song_s', ' s')} songs, lease TTL {v('lease_ttl_s', ' s')}",
        ),
        ("replicas", ", ".join(f"{k} {n}" for k, n in (report.get("replicas") or {}).items())),
        ("kills -9 (orchestrator / worker)", f"{v('kills_orchestrator')} / {v('kills_worker')}"),
        ("restarts (of which rolling SIGTERM)", f"{v('restarts')} ({v('rolling_restarts')})"),
        ("jobs lost (target 0)", v("jobs_lost")),
        ("jobs whose sha256s differ from quiet (target 0)", v("tracks_differ")),
        ("nodes re-run", v("nodes_rerun")),
        ("leases a live owner let go (quiet / churn)", f"{v('lease_losses_quiet')} / {v('lease_losses_churn')}"),
        ("duplicate owners (target 0)", f"{v('duplicate_owners')} (worker calls checked: {v('worker_calls_checked')})"),
        (
            "cancelled calls finishing their chunk after a take-over",
            f"{v('cancelled_tails')} (longest {v('cancelled_tail_max_s')} s; they publish nothing)",
        ),
        ("watchers that missed the end (target 0)", str(len(report.get("watch_incomplete") or []))),
        ("job latency p50 quiet / churn", f"{v('latency_quiet_p50_s', ' s')} / {v('latency_churn_p50_s', ' s')}"),
        ("job latency p95 quiet / churn", f"{v('latency_quiet_p95_s', ' s')} / {v('latency_churn_p95_s', ' s')}"),
        (
            f"kill -9 → jobs taken over, worst / median (target ≤ {v('takeover_target_s', ' s')})",
            f"{v('takeover_worst_s', ' s')} / {v('takeover_median_s', ' s')} ({v('takeovers_measured')} jobs)",
        ),
        ("SIGSTOP fencing", fence_text),
        (
            "wall (mesh start, quiet, churn)",
            f"{v('wall_s', ' s')} ({v('mesh_start_s')}, {v('quiet_wall_s')}, {v('churn_wall_s')})",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k.ljust(width)} | {val} |" for k, val in rows)


def failures(report: Mapping[str, Any], *, timing: bool = True) -> list[str]:
    """What missed a target, one line each (empty: the cluster held). ``timing=False`` leaves out
    the take-over time target (a benchmark figure: on a loaded CI machine it measures the load)."""
    out = []
    for key in ("jobs_lost", "tracks_differ", "duplicate_owners"):
        if report.get(key):
            out.append(f"{key}: {report[key]}")
    if report.get("watch_incomplete"):
        out.append(f"watchers that missed the end: {report['watch_incomplete']}")
    if report.get("not_taken_over"):
        out.append(f"jobs of a killed orchestrator never taken over: {report['not_taken_over']}")
    worst = report.get("takeover_worst_s")
    if timing and worst is not None and worst > report["takeover_target_s"]:
        out.append(f"take-over took {worst} s > {report['takeover_target_s']} s")
    fence = report.get("fencing") or {}
    if fence and not fence.get("ok"):
        out.append(f"fencing: {fence}")
    if report.get("restart_errors"):
        out.append(f"restarts that failed: {report['restart_errors']}")
    if report.get("quiet_failed"):
        out.append(f"quiet run failed: {report['quiet_failed']}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--jobs", type=int, default=20, help="songs, run once quiet and once under churn")
    parser.add_argument("--song-seconds", type=float, default=5.0)
    parser.add_argument("--ttl", type=float, default=5.0, help="AUDIOMESH_LEASE_TTL_SECONDS of the cluster")
    parser.add_argument("--orchestrator-kills", type=int, default=3)
    parser.add_argument("--worker-kills", type=int, default=3)
    parser.add_argument("--no-rolling", action="store_true", help="skip the SIGTERM-restart of each orchestrator")
    parser.add_argument("--no-fencing", action="store_true", help="skip the SIGSTOP check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="SERVICE=N",
        help="processes per service (repeatable; default orchestrator=3 and 2 of each worker)",
    )
    parser.add_argument("--store-url", default="", help="default: a file store in the work folder")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep songs, store and logs here (default: a temp folder)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    return parser


def cmd_churn(args: argparse.Namespace) -> int:
    from audiomesh.errors import ConfigError
    from audiomesh.launcher import check_replicas

    replicas = dict(DEFAULT_REPLICAS)
    for item in args.replicas:
        service, _, count = item.partition("=")
        if not count.isdigit():
            raise ConfigError(f"--replicas {item!r}: give SERVICE=N, e.g. separation=3")
        replicas[service] = int(count)
    check_replicas(replicas)  # a ConfigError naming the service or count
    report = run_churn(
        jobs=args.jobs,
        song_seconds=args.song_seconds,
        replicas=replicas,
        ttl=args.ttl,
        orchestrator_kills=args.orchestrator_kills,
        worker_kills=args.worker_kills,
        rolling=not args.no_rolling,
        fencing=not args.no_fencing,
        seed=args.seed,
        store_url=args.store_url,
        work=args.work,
    )
    print(format_table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str))
    bad = failures(report)
    for line in bad:
        print(f"target missed: {line}", file=sys.stderr)
    return 1 if bad else 0
