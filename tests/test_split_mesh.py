"""One song's separation split over two separation workers (issue 19), on a real mesh.

The mesh runs two separation processes behind one round-robin address (``ipv4:a,b``). Both
load the same tiny HTDemucs from a local repository (seeded weights: ``demucs_unittest`` draws
new random weights in each process, so two of them could not agree on any stem). Every job's
stems are compared with an in-process reference: the whole song through
``DemucsModel.separate_stream`` with ``random`` seeded by the job's shift seed, one torch
thread like the workers — the split (parts + stitch) must give those stems exactly.

Also here, without a mesh: how the runner chooses the number of parts.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jsonschema
import numpy as np
import pytest

from audiomesh import manifest
from audiomesh.config import load_settings
from audiomesh.errors import ConfigError
from audiomesh.launcher import Mesh
from audiomesh.separation.split import shift_seed
from audiomesh.services.orchestrator.runner import Runner, chunk_estimate, count_workers
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, separation_pb2
from tests.helpers.mesh import BASE_ENV, SUCCEEDED, read, upload, wait_for, write_song
from tests.helpers.models import make_tiny_repo

MODEL = "tiny_ht"
PARTS = ["separation:part1of2", "separation:part2of2"]


# --- choosing the parts (no mesh) ------------------------------------------------------------
def job_of(seconds: float, **separation) -> orchestrator_pb2.Job:
    job = orchestrator_pb2.Job(job_id="7d0c1d5e-0000-4000-8000-000000000000")
    job.input.audio.duration_seconds = seconds
    job.input.audio.sample_rate = 44100
    for name, value in separation.items():
        setattr(job.options.separation, name, value)
    return job


def info_of(kind: str = "demucs", max_segment: float | None = 7.8) -> separation_pb2.ModelInfo:
    info = separation_pb2.ModelInfo(name="htdemucs", sample_rate=44100, audio_channels=2, kind=kind)
    if max_segment is not None:
        info.max_segment_seconds = max_segment
    return info


def test_chunk_estimate_is_the_song_over_the_stride():
    # 7.8 s segments at 0.25 overlap: a stride of int(0.75 * 343980) frames.
    assert chunk_estimate(job_of(180.0), info_of()) == 31
    assert chunk_estimate(job_of(5.0), info_of()) == 1
    assert chunk_estimate(job_of(6.0, segment_seconds=1.0), info_of()) == 8
    assert chunk_estimate(job_of(6.0, segment_seconds=1.0, overlap=0.5), info_of()) == 12
    assert chunk_estimate(job_of(20.0), info_of(max_segment=None)) == 4  # the 7.8 s default


@pytest.mark.parametrize(
    ("target", "workers"),
    [
        ("127.0.0.1:50052", 1),
        ("ipv4:127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", 3),
        ("ipv6:[::1]:1,[::1]:2", 2),
        # localhost may resolve to 127.0.0.1 and ::1: one process, not two
        ("dns:///localhost:50052", 1),
        ("dns://8.8.8.8/localhost:50052", 1),
    ],
)
def test_workers_are_the_addresses_of_the_separation_target(target, workers):
    assert count_workers(target) == workers


@pytest.mark.parametrize(
    ("env", "job", "info", "parts", "why"),
    [
        ({}, job_of(30.0), info_of(), 3, "split into 3 parts (3 separation workers, 6 chunks, at most 4 parts)"),
        ({"separation_split_max": 2}, job_of(30.0), info_of(), 2, "split into 2 parts"),
        ({"separation_split_max": 1}, job_of(30.0), info_of(), 1, "not split (AUDIOMESH_SEPARATION_SPLIT_MAX=1)"),
        ({}, job_of(8.0), info_of(), 2, "(3 separation workers, 2 chunks, at most 4 parts)"),  # never more than chunks
        ({}, job_of(4.0), info_of(), 1, "not split (the song is one chunk)"),
        ({}, job_of(30.0), info_of(kind="other"), 1, "not split (model 'htdemucs' does not separate chunk by chunk)"),
        ({}, job_of(30.0), info_of(kind=""), 1, "does not separate chunk by chunk"),  # a worker from before ranges
        ({"separation_addr": "127.0.0.1:50052"}, job_of(30.0), info_of(), 1, "not split (1 separation worker,"),
        # A name that does not resolve: planned for one worker, not failed.
        ({"separation_addr": "dns:///no-such-host.invalid:50052"}, job_of(30.0), info_of(), 1, "1 separation worker"),
    ],
)
async def test_parts_are_the_fewest_of_the_cap_the_workers_and_the_chunks(env, job, info, parts, why):
    settings = load_settings(**{"separation_addr": "ipv4:127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", **env})
    runner = Runner(settings, store=None, registry=None, clients=None)  # type: ignore[arg-type]
    chosen, reason = await runner.choose_parts(job, info)
    assert chosen == parts and why in reason, reason


def hpss_job(seconds: float, hop_length: int = 0) -> orchestrator_pb2.Job:
    job = job_of(seconds)
    job.options.hpss.hop_length = hop_length
    return job


@pytest.mark.parametrize(
    ("env", "job", "stems", "parts", "why"),
    [
        # 180 s: 16 blocks of 1024 x 512 samples. Rounds of 1/K of a stem: ceil(3K/W)/K, least wins.
        ({}, hpss_job(180.0), 3, 1, "not split (1 hpss worker, 3 stems, 16 blocks, at most 4 parts)"),
        ({"hpss_addr": "ipv4:127.0.0.1:1,127.0.0.1:2"}, hpss_job(180.0), 3, 2, "in 2 parts each (2 hpss workers,"),
        ({"hpss_addr": "ipv4:127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"}, hpss_job(180.0), 3, 1, "not split (3 hpss"),
        ({"hpss_addr": "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in range(1, 5))}, hpss_job(180.0), 3, 4, "in 4"),
        ({"hpss_addr": "ipv4:127.0.0.1:1,127.0.0.1:2"}, hpss_job(180.0), 1, 2, "(2 hpss workers, 1 stems"),
        ({"hpss_addr": "ipv4:127.0.0.1:1,127.0.0.1:2", "hpss_split_max": 1}, hpss_job(180.0), 3, 1, "SPLIT_MAX=1"),
        # 8 workers but 2 nodes of a job at once: planned as for 2.
        (
            {"hpss_addr": "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in range(1, 9)), "max_parallel_nodes": 2},
            hpss_job(180.0),
            3,
            2,
            "8 hpss workers of which a job uses 2 at once (AUDIOMESH_MAX_PARALLEL_NODES)",
        ),
        # Never more parts than blocks; a song of one block is not split.
        (
            {"hpss_addr": "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in range(1, 9)), "max_parallel_nodes": 8},
            hpss_job(20.0),
            3,
            2,
            "8 hpss workers, 3 stems, 2 blocks",
        ),
        ({"hpss_addr": "ipv4:127.0.0.1:1,127.0.0.1:2"}, hpss_job(11.8), 3, 1, "the song is one HPSS block"),
        # The job's hop sets the block: hop 64 makes 1.49 s blocks.
        ({"hpss_addr": "ipv4:127.0.0.1:1,127.0.0.1:2"}, hpss_job(4.0, 64), 3, 2, "3 blocks"),
        # Exactly 2 blocks' worth of samples, then a hair less: counted short, never an empty part.
        ({"hpss_addr": "ipv4:127.0.0.1:1,127.0.0.1:2"}, hpss_job(2 * 524288 / 44100, 0), 3, 2, "2 blocks"),
        ({"hpss_addr": "ipv4:127.0.0.1:1,127.0.0.1:2"}, hpss_job(524290 / 44100, 0), 3, 1, "one HPSS block"),
    ],
)
async def test_hpss_parts_keep_every_hpss_worker_busy_with_the_fewest_parts(env, job, stems, parts, why):
    settings = load_settings(**{"hpss_addr": "127.0.0.1:50053", **env})
    runner = Runner(settings, store=None, registry=None, clients=None)  # type: ignore[arg-type]
    chosen, reason = await runner.choose_hpss_parts(job, info_of(), stems)
    assert chosen == parts and why in reason, reason


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_hpss_split_max_out_of_range_fails_at_start_naming_the_variable(value):
    with pytest.raises(ConfigError, match=f"AUDIOMESH_HPSS_SPLIT_MAX='{value}'"):
        load_settings(environ={"AUDIOMESH_HPSS_SPLIT_MAX": value})


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_split_max_out_of_range_fails_at_start_naming_the_variable(value):
    with pytest.raises(ConfigError, match=f"AUDIOMESH_SEPARATION_SPLIT_MAX='{value}'"):
        load_settings(environ={"AUDIOMESH_SEPARATION_SPLIT_MAX": value})


# --- a real mesh with two separation workers -------------------------------------------------
@pytest.fixture(scope="module")
def split_mesh(tmp_path_factory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("split")
    repo, name = make_tiny_repo(tmp / "models", MODEL)
    env = {
        **BASE_ENV,
        "AUDIOMESH_STORE_URL": f"file://{tmp / 'data'}",
        "AUDIOMESH_MODEL_REPO": str(repo),
        "AUDIOMESH_DEFAULT_MODEL": name,
        # One call per worker: a second part sent to a busy worker is refused and goes to the other.
        "AUDIOMESH_WORKER_CONCURRENCY": "1",
        "AUDIOMESH_COMPILE": "false",
    }
    mesh = Mesh(env=env, log_dir=tmp / "logs", replicas={"separation": 2, "hpss": 2}).start(timeout=240)
    try:
        yield mesh
    finally:
        mesh.stop()


def store_root(mesh: Mesh) -> Path:
    return Path(mesh.env["AUDIOMESH_STORE_URL"].removeprefix("file://"))


def worker_log(mesh: Mesh, instance: str, job_id: str) -> list[dict]:
    """The JSON log lines of one separation process about ``job_id``."""
    entries = []
    for line in (mesh.log_dir / f"{instance}.log").read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("job_id") == job_id or str(entry.get("node", "")).startswith(job_id):
            entries.append(entry)
    return entries


def parts_by_worker(mesh: Mesh, job_id: str, event: str) -> dict[str, list[str]]:
    """Instance → the part nodes whose ``event`` ("separate start" / "separate done") it logged."""
    return {
        inst: [e["node"].partition("/")[2] for e in worker_log(mesh, inst, job_id) if e.get("event") == event]
        for inst in mesh.instances("separation")
    }


def reference_stems(mesh: Mesh, job: orchestrator_pb2.Job) -> dict[str, np.ndarray]:
    """The job's stems computed here: its decoded mix, whole, through separate_stream, with the
    job's shift seed and one torch thread (as the workers run)."""
    import torch

    from audiomesh.options import separation_options
    from audiomesh.separation import SeparatorFactory
    from audiomesh.tracks import open_local

    model = SeparatorFactory(model_repo=Path(mesh.env["AUDIOMESH_MODEL_REPO"]), device="cpu").get(MODEL)
    options = separation_options(job.options.separation)
    threads, state = torch.get_num_threads(), random.getstate()
    torch.set_num_threads(1)
    random.seed(shift_seed(job.job_id))
    try:
        mix = store_root(mesh) / f"jobs/{job.job_id}/decode/mix.wav"
        with open_local(mix, sample_rate=model.sample_rate, channels=model.audio_channels) as source:
            blocks = list(model.separate_stream(source, options=options))
    finally:
        torch.set_num_threads(threads)
        random.setstate(state)
    return {stem: np.concatenate([b[stem] for _, b in blocks], axis=1) for stem in blocks[0][1]}


def assert_stems_equal_reference(mesh: Mesh, job: orchestrator_pb2.Job) -> None:
    expected = reference_stems(mesh, job)
    root = store_root(mesh)
    for stem, want in expected.items():
        got = read(root / f"jobs/{job.job_id}/separation/{stem}.wav")
        assert got.shape == want.shape, stem
        assert np.array_equal(got, want), f"{stem}: max |diff| {np.abs(got - want).max():.3g}"


def nodes(job: orchestrator_pb2.Job) -> dict[str, orchestrator_pb2.Node]:
    return {n.name: n for n in job.nodes}


def song_options(shifts: int = 1) -> orchestrator_pb2.JobOptions:
    options = orchestrator_pb2.JobOptions()
    options.separation.shifts = shifts
    return options


async def start_job(mesh: Mesh, song: bytes, shifts: int = 1) -> orchestrator_pb2.Job:
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        return (await upload(stub, song, "song.wav", song_options(shifts))).job


async def finish(mesh: Mesh, job_id: str, timeout: float = 120.0) -> tuple[orchestrator_pb2.Job, list]:
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        return await wait_for(orchestrator_pb2_grpc.OrchestratorServiceStub(channel), job_id, timeout=timeout)


def wait_for_part_start(mesh: Mesh, job_id: str, timeout: float = 60.0) -> tuple[str, str]:
    """The first (worker, part) to log "separate start" for ``job_id``; polled every 10 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for inst, started in parts_by_worker(mesh, job_id, "separate start").items():
            if started:
                return inst, started[0]
        time.sleep(0.01)
    raise AssertionError(f"no part of {job_id} started within {timeout} s")


def manifest_of(mesh: Mesh, job: orchestrator_pb2.Job) -> dict:
    doc = json.loads((store_root(mesh) / job.manifest_key).read_bytes())
    jsonschema.validate(doc, manifest.schema())
    return doc


async def test_a_job_is_split_over_both_workers_and_stitched_exactly(split_mesh, tmp_path):
    song = write_song(tmp_path / "song.wav", 4.0).read_bytes()
    created = await start_job(split_mesh, song, shifts=2)
    job, seen = await finish(split_mesh, created.job_id)
    assert job.state == SUCCEEDED, job.error
    # 4 s in 1 s segments (the model's longest) is 6 chunks; two workers: two parts.
    assert job.separation_parts == 2
    by_name = nodes(job)
    assert [n.name for n in job.nodes][:4] == ["decode", *PARTS, "stitch"]
    assert "separation" not in by_name
    assert {name: (by_name[name].stage, by_name[name].attempts) for name in [*PARTS, "stitch"]} == {
        PARTS[0]: ("separation", 1),
        PARTS[1]: ("separation", 1),
        "stitch": ("stitch", 1),
    }
    assert list(by_name["stitch"].depends_on) == PARTS
    assert list(by_name["hpss:drums"].depends_on) == ["stitch"]
    for i, name in enumerate(PARTS):
        (part,) = by_name[name].outputs
        assert part.key == f"jobs/{job.job_id}/separation/ranges/{i}-of-2.range" and part.size_bytes > 0
    assert len(job.tracks) == 9
    # Each worker computed one part (its log names the node), and one of them stitched.
    done = parts_by_worker(split_mesh, job.job_id, "separate done")
    assert sorted(p for parts in done.values() for p in parts) == PARTS and all(done.values()), done
    stitched = [
        inst for inst in done if any(e.get("event") == "stitch done" for e in worker_log(split_mesh, inst, job.job_id))
    ]
    assert len(stitched) == 1
    # Progress over the parts: never backwards, and the parts ran at the same time.
    fractions = [s.fraction for s in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    doc = manifest_of(split_mesh, job)
    assert doc["job"]["separationParts"] == 2
    events = doc["events"]
    assert any("separation split into 2 parts (2 separation workers, 6 chunks, at most 4 parts)" in e for e in events)
    first_done = min(i for i, e in enumerate(events) if " succeeded in " in e and "separation:part" in e)
    assert all(any(f"{p} started" in e for e in events[:first_done]) for p in PARTS), events
    # The parts are gone once stitched (the stems hold what they did); the stems are exact.
    assert not list((store_root(split_mesh) / f"jobs/{job.job_id}/separation/ranges").glob("*"))
    assert_stems_equal_reference(split_mesh, job)


async def test_a_restarted_orchestrator_reuses_the_finished_part_and_keeps_the_plan(split_mesh, tmp_path):
    """One part finished, the other held on a frozen worker, the orchestrator killed: after the
    restart (now with AUDIOMESH_SEPARATION_SPLIT_MAX=1) the job keeps its two parts, reuses the
    finished one and runs the other again. A new job on that orchestrator is not split."""
    song = write_song(tmp_path / "long.wav", 6.0, seed=3).read_bytes()
    job = await start_job(split_mesh, song)
    frozen, held = wait_for_part_start(split_mesh, job.job_id)
    split_mesh.pause(frozen)
    try:
        assert held not in parts_by_worker(split_mesh, job.job_id, "separate done")[frozen], "the part ended first"
        other = next(p for p in PARTS if p != held)
        deadline = time.monotonic() + 60
        while nodes(await current(split_mesh, job.job_id))[other].state != common_pb2.NODE_STATE_SUCCEEDED:
            assert time.monotonic() < deadline, f"{other} did not finish on the other worker"
            await asyncio.sleep(0.1)
        before = nodes(await current(split_mesh, job.job_id))
        split_mesh.kill("orchestrator")
    finally:
        split_mesh.resume(frozen)  # its call was cut with the orchestrator: the worker drops it
    base = split_mesh.envs["orchestrator"]
    try:
        split_mesh.envs["orchestrator"] = {**base, "AUDIOMESH_SEPARATION_SPLIT_MAX": "1"}
        split_mesh.restart("orchestrator")
        final, _ = await finish(split_mesh, job.job_id)
        assert final.state == SUCCEEDED, final.error
        assert final.separation_parts == 2
        after = nodes(final)
        assert [n.name for n in final.nodes][:4] == ["decode", *PARTS, "stitch"]
        assert after[other].attempts == before[other].attempts == 1
        assert after[other].start_time == before[other].start_time  # reused, not run again
        assert after["decode"].attempts == 1
        assert after[held].attempts == 2
        assert any(f"reusing decode, {other}" in e for e in manifest_of(split_mesh, final)["events"])
        assert_stems_equal_reference(split_mesh, final)

        # AUDIOMESH_SEPARATION_SPLIT_MAX=1 on the same two workers: one whole-song node.
        single = await start_job(split_mesh, write_song(tmp_path / "short.wav", 4.0, seed=5).read_bytes())
        whole, _ = await finish(split_mesh, single.job_id)
        assert whole.state == SUCCEEDED, whole.error
        assert whole.separation_parts == 1
        assert [(n.name, n.stage) for n in whole.nodes][:3] == [
            ("decode", "decode"),
            ("separation", "separation"),
            ("hpss:mix", "hpss"),
        ]
        assert_stems_equal_reference(split_mesh, whole)  # the whole-song call is seeded too
    finally:
        split_mesh.envs["orchestrator"] = base
        split_mesh.terminate("orchestrator")
        split_mesh.restart("orchestrator")


async def current(mesh: Mesh, job_id: str) -> orchestrator_pb2.Job:
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        return (await stub.GetJob(orchestrator_pb2.GetJobRequest(job_id=job_id), timeout=10)).job


async def test_cancelling_a_split_job_stops_every_part(split_mesh, tmp_path):
    song = write_song(tmp_path / "song.wav", 10.0, seed=9).read_bytes()
    job = await start_job(split_mesh, song)
    deadline = time.monotonic() + 60
    while True:
        running = nodes(await current(split_mesh, job.job_id))
        if all(
            p in running and running[p].state == common_pb2.NODE_STATE_RUNNING and running[p].fraction > 0
            for p in PARTS
        ):
            break
        assert time.monotonic() < deadline, "the two parts never ran at once"
        await asyncio.sleep(0.05)
    async with grpc.aio.insecure_channel(split_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        await stub.CancelJob(orchestrator_pb2.CancelJobRequest(job_id=job.job_id), timeout=30)
    final, _ = await finish(split_mesh, job.job_id, timeout=30)
    assert final.state == common_pb2.JOB_STATE_CANCELLED
    assert {p: nodes(final)[p].state for p in PARTS} == dict.fromkeys(PARTS, common_pb2.NODE_STATE_CANCELLED)
    # Each worker ended its part's call as cancelled, and neither left a part in the store.
    deadline = time.monotonic() + 30
    while True:
        ended = {
            inst: [
                e["node"].partition("/")[2]
                for e in worker_log(split_mesh, inst, job.job_id)
                if e.get("event") == "rpc" and e.get("code") == "CANCELLED"
            ]
            for inst in split_mesh.instances("separation")
        }
        if sorted(p for parts in ended.values() for p in parts) == PARTS:
            break
        assert time.monotonic() < deadline, f"the workers did not stop their parts: {ended}"
        await asyncio.sleep(0.1)
    assert all(ended.values()), ended
    assert not list((store_root(split_mesh) / f"jobs/{job.job_id}/separation").rglob("*.range"))


async def test_the_stems_hpss_is_split_over_both_hpss_workers_and_joined_exactly(split_mesh, tmp_path):
    """Two hpss workers, a 4 s song and hop 64 (1.49 s blocks: 3 of them): each main stem's HPSS
    runs in 2 parts, and the composites equal the stems' whole HPSS, summed, bit for bit."""
    from audiomesh.dsp.composite import mix
    from audiomesh.dsp.hpss import hpss
    from audiomesh.options import hpss_kwargs

    options = song_options()
    options.hpss.hop_length = 64
    options.hpss.n_fft = 256
    async with grpc.aio.insecure_channel(split_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        song = write_song(tmp_path / "song.wav", 4.0, seed=11).read_bytes()
        created = (await upload(stub, song, "song.wav", options)).job
    job, _ = await finish(split_mesh, created.job_id)
    assert job.state == SUCCEEDED, job.error
    assert job.hpss_parts == 2
    stems = ["drums", "bass", "other"]
    by_name = nodes(job)
    hpss_nodes = sorted(n for n in by_name if n.startswith("hpss:") and n != "hpss:mix")
    assert hpss_nodes == sorted(f"hpss:{s}:part{i}of2" for s in stems for i in (1, 2))
    assert all(by_name[n].state == common_pb2.NODE_STATE_SUCCEEDED for n in hpss_nodes)
    assert sorted(by_name["composite"].depends_on) == sorted(["stitch", *hpss_nodes])
    doc = manifest_of(split_mesh, job)
    assert doc["job"]["hpssParts"] == 2
    assert any("the stems' HPSS in 2 parts each (2 hpss workers, 3 stems, 3 blocks" in e for e in doc["events"])
    # Both hpss workers decomposed parts of this job.
    for inst in split_mesh.instances("hpss"):
        done = [e for e in worker_log(split_mesh, inst, job.job_id) if e.get("event") == "hpss done"]
        assert any("/hpss/parts/" not in e.get("input_key", "") and "separation/" in e["input_key"] for e in done), inst
    # The composites: each stem's whole HPSS computed here, summed in the recipe's order.
    root = store_root(split_mesh)
    kwargs = hpss_kwargs(job.options.hpss)
    parts = {s: hpss(read(root / f"jobs/{job.job_id}/separation/{s}.wav"), **kwargs) for s in stems}
    for name, which in (("main_harmonic", 0), ("main_percussive", 1)):
        want = mix({s: parts[s][which] for s in stems})
        got = read(root / f"jobs/{job.job_id}/composite/{name}.wav")
        assert np.array_equal(got, want), f"{name}: max |diff| {np.abs(got - want).max():.3g}"
    assert len(job.tracks) == 9


async def test_a_part_whose_worker_dies_is_retried_alone(split_mesh, tmp_path):
    """A worker killed in the middle of its part: that part runs again on the other worker; the
    other part ran once. Last in the file: the killed worker stays down (starting it again
    would only cost time)."""
    song = write_song(tmp_path / "song.wav", 6.0, seed=7).read_bytes()
    job = await start_job(split_mesh, song)
    victim, part = wait_for_part_start(split_mesh, job.job_id)
    split_mesh.pause(victim)  # frozen at once; checked below that it had not finished its part
    try:
        assert part not in parts_by_worker(split_mesh, job.job_id, "separate done")[victim], "the part ended first"
        split_mesh.kill(victim)
        final, _ = await finish(split_mesh, job.job_id)
        assert final.state == SUCCEEDED, final.error
        by_name = nodes(final)
        other = next(p for p in PARTS if p != part)
        assert (by_name[part].attempts, by_name[other].attempts, by_name["stitch"].attempts) == (2, 1, 1)
        assert any(f"{part} attempt 1 failed (UNAVAILABLE" in e for e in manifest_of(split_mesh, final)["events"])
        assert_stems_equal_reference(split_mesh, final)
    finally:
        split_mesh.resume(victim)  # if the kill was not reached: a stopped process would block the teardown
