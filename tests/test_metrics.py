"""Prometheus metrics: each metric exists and moves as the work it counts implies.

The main test runs one job on a mesh of its own (real processes) and checks what every
service's /metrics says against the job's manifest: jobs finished, node durations per stage,
RPC calls per worker, seconds of audio separated, bytes written, gauges back to idle, model
loaded once, and no job id in any label. The others check the orchestrator's scrape-time
gauges (the backlog KEDA reads) and the separation worker's model metrics in this process.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from audiomesh import metrics
from audiomesh.config import load_settings
from audiomesh.launcher import Mesh
from audiomesh.rpc.server import start_server
from audiomesh.separation import SeparatorFactory
from audiomesh.separation import compiled as compiled_module
from audiomesh.services.orchestrator.jobs import JobRecord, JobRegistry
from audiomesh.services.orchestrator.lease import Lease
from audiomesh.services.orchestrator.server import build as build_orchestrator
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.mesh import SUCCEEDED, start_mesh, upload, wait_for, write_song
from tests.helpers.models import make_tiny_repo

pytestmark = pytest.mark.timeout(300)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: The RPC each worker stage's node makes (runner._RPCS).
STAGE_METHODS = {"separation": "Separate", "hpss": "Decompose", "composite": "Composite", "normalize": "Normalize"}
WORKERS = tuple(STAGE_METHODS)
OK_CODES = ("OK", "0")  # rpc_grpc_status_code of a call that succeeded, by name or number


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by (sample name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return parse(response.read().decode())


def local() -> Samples:
    """This process's default registry (in-process services), as a scrape would show it."""
    return parse(generate_latest(REGISTRY).decode())


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample, have), value in samples.items()
        if sample == name and all(dict(have).get(k) == v for k, v in labels.items())
    )


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


# --- the orchestrator's gauges -----------------------------------------------------------------


def _record(state: int, *, held: bool = True, **activity: tuple[str, str]) -> JobRecord:
    job = orchestrator_pb2.Job(job_id=f"00000000-0000-4000-8000-{len(activity):012d}", state=state)
    lease = Lease(job.job_id, "me", 1, 6.0, "etag", sent_at=time.monotonic()) if held else None
    return JobRecord(job=job, lease=lease, node_activity=dict(activity))


def test_gauges_count_held_jobs_and_their_nodes_by_stage(tmp_path):
    registry = JobRegistry(load_settings(store_url=f"file://{tmp_path}").open_store(), {})
    records = {
        "queued": _record(common_pb2.JOB_STATE_QUEUED),
        "running": _record(
            common_pb2.JOB_STATE_RUNNING,
            separation=("separation", "running"),
            **{"hpss:mix": ("hpss", "waiting"), "hpss:drums": ("hpss", "waiting"), "hpss:bass": ("hpss", "running")},
        ),
        # Ended, lease not released yet: a lease, no backlog.
        "ended": _record(common_pb2.JOB_STATE_SUCCEEDED, separation=("separation", "running")),
        # Another replica's job, followed here: nothing.
        "followed": _record(common_pb2.JOB_STATE_RUNNING, held=False, separation=("separation", "waiting")),
    }
    registry.records.update(records)
    jobs, nodes, leases = registry.gauges()
    assert jobs == {"queued": 1, "running": 1}
    assert leases == 3
    assert nodes[("separation", "running")] == 1
    assert nodes[("hpss", "waiting")] == 2 and nodes[("hpss", "running")] == 1
    # Every stage is reported, idle ones as 0 (an autoscaler reads 0, not "no data").
    assert {stage for stage, _ in nodes} == {"decode", "separation", "stitch", "hpss", "composite", "normalize"}
    assert sum(nodes.values()) == 4


def test_a_retried_job_s_duration_counts_from_its_retry_not_its_creation():
    """A job that sat FAILED for an hour, then was retried and took 30 s: JOB_DURATION observes
    30 s (the retry's run), not 3630 s; a job never retried counts from its creation."""
    from audiomesh.services.orchestrator.runner import _count_end

    def observed(job: orchestrator_pb2.Job) -> float:
        before = local()
        _count_end(JobRecord(job=job))
        return delta(local(), before, "audiomesh_job_duration_seconds_sum", outcome="succeeded")

    job = orchestrator_pb2.Job(job_id="00000000-0000-4000-8000-00000000r37r", state=SUCCEEDED)
    job.create_time.FromSeconds(1_000_000)
    job.update_time.FromSeconds(1_000_000 + 3630)
    assert observed(job) == pytest.approx(3630)
    job.retry_time.FromSeconds(1_000_000 + 3600)
    assert observed(job) == pytest.approx(30)


def test_jobs_collector_reports_the_last_reading_when_read_fails():
    readings: list[object] = [({"running": 2}, {("hpss", "waiting"): 3}, 2), RuntimeError("torn")]

    def read():
        value = readings.pop(0)
        if isinstance(value, Exception):
            raise value
        return value

    registry = CollectorRegistry(auto_describe=True)
    registry.register(metrics.JobsCollector(read))  # type: ignore[arg-type]
    for _ in range(2):  # the second scrape's read raises: the first values again, no error
        samples = parse(generate_latest(registry).decode())
        assert total(samples, "audiomesh_jobs", state="running") == 2
        assert total(samples, "audiomesh_jobs", state="queued") == 0
        assert total(samples, "audiomesh_nodes", stage="hpss", state="waiting") == 3
        assert total(samples, "audiomesh_leases_held") == 2


def test_collectors_of_replicas_in_one_process_add_up_and_unregister():
    one = metrics.JobsCollector(lambda: ({"running": 1}, {("separation", "waiting"): 1}, 1))
    two = metrics.JobsCollector(lambda: ({"running": 2, "queued": 1}, {("separation", "waiting"): 4}, 3))
    before = local()
    metrics.register_collector(one)
    metrics.register_collector(two)
    metrics.register_collector(two)  # twice: still once
    try:
        text = generate_latest(REGISTRY).decode()
        assert text.count("# TYPE audiomesh_jobs gauge") == 1  # one family, not one per replica
        samples = parse(text)
        assert delta(samples, before, "audiomesh_jobs", state="running") == 3
        assert delta(samples, before, "audiomesh_jobs", state="queued") == 1
        assert delta(samples, before, "audiomesh_nodes", stage="separation", state="waiting") == 5
        assert delta(samples, before, "audiomesh_leases_held") == 4
    finally:
        metrics.unregister_collector(one)
        metrics.unregister_collector(two)
    after = local()
    assert total(after, "audiomesh_leases_held") == total(before, "audiomesh_leases_held")


@pytest.fixture(scope="module")
def metrics_mesh(tmp_path_factory) -> Iterator[Mesh]:
    """A mesh of its own: no other test's job moves its counters (its tests run one at a time)."""
    mesh = start_mesh(tmp_path_factory.mktemp("metrics-mesh"), gateway=True)
    try:
        yield mesh
    finally:
        mesh.stop()


async def test_nodes_held_back_by_the_node_slot_are_held_not_backlog(metrics_mesh, tmp_path):
    """An orchestrator in this process with one node slot per job, on the mesh's workers and
    store: after decode, separation and hpss:mix are both ready and one waits for the slot; the
    gauges show it while it waits, and everything is back at 0 once the job ended."""
    mesh = metrics_mesh
    overrides = {k.removeprefix("AUDIOMESH_").lower(): v for k, v in mesh.env.items() if k.startswith("AUDIOMESH_")}
    settings = load_settings(**{**overrides, "max_parallel_nodes": 1, "replica_id": "metrics-test"})
    spec = build_orchestrator(settings)
    server = await start_server(spec.registrations, service="orchestrator", warmup=spec.warmup)
    try:
        await asyncio.wait_for(server.ready.wait(), 60)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            before = local()
            song = write_song(tmp_path / "song.wav", 4.0).read_bytes()
            created = await upload(stub, song, "song.wav")
            watch = asyncio.ensure_future(wait_for(stub, created.job.job_id, timeout=240))
            most_held, most_running, running_jobs = 0.0, 0.0, 0.0
            while not watch.done():  # bounded by the watch's own timeout
                now = local()
                most_held = max(most_held, total(now, "audiomesh_nodes", state="held"))
                most_running = max(most_running, total(now, "audiomesh_nodes", state="running"))
                running_jobs = max(running_jobs, total(now, "audiomesh_jobs", state="running"))
                await asyncio.sleep(0.02)
            job, _ = await watch
            assert job.state == SUCCEEDED, job.error
            assert most_held >= 1  # separation or hpss:mix, held back by the one slot
            assert most_running == 1  # never more than the one slot
            assert running_jobs == 1
            after = await _when_released(before)
            assert total(after, "audiomesh_nodes") == 0
            assert total(after, "audiomesh_jobs") == 0
            assert delta(after, before, "audiomesh_jobs_created_total") == 1
            assert delta(after, before, "audiomesh_jobs_finished_total", outcome="succeeded") == 1
            assert delta(after, before, "audiomesh_job_queue_wait_seconds_count") == 1
            stages = Counter(n.stage for n in job.nodes)
            for stage, count in stages.items():
                assert (
                    delta(after, before, "audiomesh_node_duration_seconds_count", stage=stage, outcome="succeeded")
                    == count
                )
    finally:
        await spec.on_stop()
        await server.stop(1)
    # Stopped: its collector is gone from the registry (no leak into later tests).
    assert "audiomesh_leases_held" not in {name for name, _ in local()}


async def _when_released(before: Samples, wait: float = 30.0) -> Samples:
    """This process's metrics once the job's lease is released (just after its end)."""
    deadline = time.monotonic() + wait
    while True:
        now = local()
        if total(now, "audiomesh_leases_held") == 0 or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.05)


# --- the separation worker's model metrics ----------------------------------------------------


@pytest.mark.parametrize(("backend", "outcome"), [("no_such_backend", "failed"), ("aot_eager", "compiled")])
async def test_model_load_and_compile_are_observed(tmp_path, monkeypatch, backend, outcome):
    monkeypatch.setattr(compiled_module, "COMPILE_NICE", 0)
    repo, name = make_tiny_repo(tmp_path / "repo", f"tiny_{outcome}")
    factory = SeparatorFactory(model_repo=repo, device="cpu", allow_download=False)
    compiler = compiled_module.BackgroundCompiler(
        factory,
        backend=backend,
        cache_dir=tmp_path / "cache",  # aot_eager keeps no on-disk cache
        cold_in_child=False,
        compare_speed=False,
    )
    before = local()
    try:
        await asyncio.to_thread(factory.get, name)
        await asyncio.to_thread(factory.get, name)  # cached: not loaded again
        execution = await asyncio.to_thread(compiler.wait, name, timeout=120)
        assert execution == {"failed": "compile_failed", "compiled": "compiled"}[outcome]
    finally:
        compiler.close()
    after = local()
    assert delta(after, before, "audiomesh_model_load_seconds_count", model=name) == 1
    assert delta(after, before, "audiomesh_model_load_seconds_sum", model=name) > 0
    assert delta(after, before, "audiomesh_model_compile_seconds_count", model=name, outcome=outcome) == 1
    assert delta(after, before, "audiomesh_model_compile_seconds_count", model=name) == 1
    assert delta(after, before, "audiomesh_model_compile_seconds_sum", model=name) > 0


# --- one job on a real mesh, every service scraped ------------------------------------------


def scrape_all(mesh: Mesh) -> dict[str, Samples]:
    services = ("gateway", "orchestrator", *WORKERS)
    missing = [s for s in services if s not in mesh.metrics]
    assert not missing, f"no /metrics address for {missing}: {mesh.metrics}"
    return {service: scrape(mesh.metrics[service]) for service in services}


def calls(samples: Samples, method: str, *, ok: bool | None = None) -> float:
    """rpc_server_duration_seconds_count of ``method`` (only OK calls, only failed ones, or all)."""
    count = 0.0
    for (name, labels), value in samples.items():
        have = dict(labels)
        if name != "rpc_server_duration_seconds_count" or have.get("rpc_method") != method:
            continue
        if ok is None or (have.get("rpc_grpc_status_code") in OK_CODES) == ok:
            count += value
    return count


async def test_one_job_moves_every_service_metric_as_its_manifest_implies(metrics_mesh, tmp_path):
    mesh = metrics_mesh
    before = scrape_all(mesh)
    song = write_song(tmp_path / "song.wav", 5.0, seed=3)
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        created = await upload(stub, song.read_bytes(), "song.wav")
        job, _ = await wait_for(stub, created.job.job_id)
    assert job.state == SUCCEEDED, job.error
    after = await asyncio.to_thread(_scrape_when_idle, mesh)
    orch_before, orch = before["orchestrator"], after["orchestrator"]
    nodes_by_stage = Counter(n.stage for n in job.nodes)

    # Jobs: one created, one finished (succeeded), its duration from the manifest's timestamps.
    assert delta(orch, orch_before, "audiomesh_jobs_created_total") == 1
    assert delta(orch, orch_before, "audiomesh_jobs_finished_total", outcome="succeeded") == 1
    assert delta(orch, orch_before, "audiomesh_jobs_finished_total") == 1
    assert delta(orch, orch_before, "audiomesh_job_duration_seconds_count", outcome="succeeded") == 1
    job_seconds = (job.update_time.ToNanoseconds() - job.create_time.ToNanoseconds()) / 1e9
    assert delta(orch, orch_before, "audiomesh_job_duration_seconds_sum") == pytest.approx(job_seconds, abs=0.5)
    assert delta(orch, orch_before, "audiomesh_job_queue_wait_seconds_count") == 1
    assert delta(orch, orch_before, "audiomesh_job_queue_wait_seconds_sum") <= job_seconds

    # Nodes: one observation per node of the manifest, by stage, summing its durations.
    assert set(nodes_by_stage) == {"decode", "separation", "hpss", "composite", "normalize"}
    for stage, count in nodes_by_stage.items():
        name = "audiomesh_node_duration_seconds"
        assert delta(orch, orch_before, f"{name}_count", stage=stage, outcome="succeeded") == count, stage
        assert delta(orch, orch_before, f"{name}_count", stage=stage) == count, stage
        manifest_seconds = sum(n.duration_seconds for n in job.nodes if n.stage == stage)
        assert delta(orch, orch_before, f"{name}_sum", stage=stage) == pytest.approx(manifest_seconds, rel=1e-6)
    assert delta(orch, orch_before, "audiomesh_node_retries_total") == 0

    # Workers: one OK call per node of their stage; every refused (busy) call is a busy wait.
    for stage, method in STAGE_METHODS.items():
        worker_before, worker = before[stage], after[stage]
        assert calls(worker, method, ok=True) - calls(worker_before, method, ok=True) == nodes_by_stage[stage], stage
        refused = delta(worker, worker_before, "audiomesh_worker_refusals_total")
        assert calls(worker, method, ok=False) - calls(worker_before, method, ok=False) == refused, stage
        assert delta(orch, orch_before, "audiomesh_node_busy_waits_total", stage=stage) == refused, stage
        # The orchestrator timed the same calls as a client: as many, each at least as long as served.
        client, server = "rpc_client_duration_seconds", "rpc_server_duration_seconds"
        served = delta(worker, worker_before, f"{server}_count", rpc_method=method)
        assert delta(orch, orch_before, f"{client}_count", rpc_method=method) == served, stage
        served_seconds = delta(worker, worker_before, f"{server}_sum", rpc_method=method)
        assert delta(orch, orch_before, f"{client}_sum", rpc_method=method) >= served_seconds > 0, stage
        # Bytes: at least the outputs of the stage's nodes went into the store.
        written = sum(t.size_bytes for n in job.nodes if n.stage == stage for t in n.outputs)
        assert delta(worker, worker_before, "audiomesh_store_written_bytes_total") >= written, stage
        # Slots: the bound is reported, none busy now.
        assert total(worker, "audiomesh_worker_slots") >= 1, stage
        assert total(worker, "audiomesh_worker_slots_busy") == 0, stage
    # The orchestrator stored the upload and the decoded mix.
    decoded = sum(t.size_bytes for n in job.nodes if n.stage == "decode" for t in n.outputs)
    stored = delta(orch, orch_before, "audiomesh_store_written_bytes_total")
    assert stored >= job.input.size_bytes + decoded

    # Separation: the seconds of audio separated are the mix's, and the model loaded once (at start).
    separation = next(n for n in job.nodes if n.stage == "separation")
    separated = delta(after["separation"], before["separation"], "audiomesh_separated_audio_seconds_total")
    assert separated == pytest.approx(separation.outputs[0].audio.duration_seconds, rel=1e-9)
    assert separated == pytest.approx(job.input.audio.duration_seconds, abs=0.01)
    model = job.options.model
    assert total(after["separation"], "audiomesh_separated_audio_seconds_total", model=model) >= separated
    assert total(after["separation"], "audiomesh_model_load_seconds_count", model=model) == 1

    # Gauges: nothing held, queued or running once the job ended.
    assert total(orch, "audiomesh_jobs") == 0
    assert total(orch, "audiomesh_nodes") == 0
    assert total(orch, "audiomesh_leases_held") == 0

    # Labels stay low-cardinality: no job id anywhere, and each service shows only its own families.
    for service, samples in after.items():
        leaked = [(name, labels) for name, labels in samples if any(job.job_id in v for _, v in labels)]
        assert not leaked, (service, leaked)
        if service != "orchestrator":
            assert not any(name.startswith("audiomesh_jobs") for name, _ in samples), service


def _scrape_when_idle(mesh: Mesh, wait: float = 30.0) -> dict[str, Samples]:
    """Every service's metrics once the orchestrator released the job's lease (just after its
    end) and no worker slot is busy (a worker finishes its call's bookkeeping after replying)."""
    deadline = time.monotonic() + wait
    while True:
        samples = scrape_all(mesh)
        idle = total(samples["orchestrator"], "audiomesh_leases_held") == 0 and not any(
            total(samples[w], "audiomesh_worker_slots_busy") for w in WORKERS
        )
        if idle or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_every_exported_family_is_named_in_metrics_names(metrics_mesh):
    """The dashboard and KEDA queries are checked against metrics.NAMES: every audiomesh family a
    service exports must be in it."""
    for service, samples in scrape_all(metrics_mesh).items():
        families = {name for name, _ in samples}
        ours = {f for f in families if f.startswith(("audiomesh_", "rpc_", "http_"))}
        unknown = {f for f in ours if not any(f == n or f.startswith(n + "_") for n in metrics.NAMES)}
        assert not unknown, (service, unknown)


async def test_a_handed_off_job_is_a_takeover_and_finishes_once_on_its_new_holder(metrics_mesh, tmp_path):
    """SIGTERM the orchestrator mid-job (it hands the job off: releases its lease), start it
    again: the new process counts one take-over of a released lease and the job's one end."""
    mesh = metrics_mesh
    song = write_song(tmp_path / "song.wav", 8.0, seed=5).read_bytes()
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        created = await upload(stub, song, "song.wav")
        job_id = created.job.job_id

        async def until_separating() -> None:
            async for msg in stub.WatchJob(orchestrator_pb2.WatchJobRequest(job_id=job_id)):
                if "separation" in msg.job.current_stage:
                    return
            raise AssertionError("the job ended before its separation was seen running")

        await asyncio.wait_for(until_separating(), 120)
    assert await asyncio.to_thread(mesh.terminate, "orchestrator") == 0
    await asyncio.to_thread(mesh.restart, "orchestrator")
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        job, _ = await wait_for(stub, job_id)
    assert job.state == SUCCEEDED, job.error
    orch = (await asyncio.to_thread(_scrape_when_idle, mesh))["orchestrator"]  # the new process: from 0
    assert total(orch, "audiomesh_job_takeovers_total", reason="released") == 1
    assert total(orch, "audiomesh_job_takeovers_total", reason="expired") == 0
    assert total(orch, "audiomesh_jobs_finished_total", outcome="succeeded") == 1
    assert total(orch, "audiomesh_jobs_created_total") == 0
    assert total(orch, "audiomesh_leases_lost_total") == 0
    # Resumed: only the nodes that ran here are observed (decode's output was reused).
    assert total(orch, "audiomesh_node_duration_seconds_count", stage="decode") == 0
    assert total(orch, "audiomesh_node_duration_seconds_count", stage="normalize", outcome="succeeded") == 1


def test_a_lost_lease_is_counted_once(tmp_path):
    registry = JobRegistry(load_settings(store_url=f"file://{tmp_path}").open_store(), {})
    rec = _record(common_pb2.JOB_STATE_RUNNING)
    before = local()
    registry.lose(rec, "fenced off")
    registry.lose(rec, "fenced off again")  # not held any more: nothing to lose
    assert rec.lease is None
    assert delta(local(), before, "audiomesh_leases_lost_total") == 1
