"""The `audiomesh` command as a user runs it (subprocesses, real mesh)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import pytest

from audiomesh import manifest
from tests.helpers.mesh import BASE_ENV, write_song


@contextlib.asynccontextmanager
async def orchestrator_standing_in(servicer) -> AsyncIterator[dict[str, str]]:
    """A gRPC server on 127.0.0.1 serving ``servicer`` as the OrchestratorService (with health):
    the CLI's environment pointing at it. Stands in where only a few answers matter."""
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from audiomesh.v1 import orchestrator_pb2_grpc

    server = grpc.aio.server()
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield {**BASE_ENV, "AUDIOMESH_ORCHESTRATOR_ADDR": f"127.0.0.1:{port}"}
    finally:
        await server.stop(None)


TRACKS = {"vocals", "drums", "bass", "other", "harmonic", "percussive", "main", "main_harmonic", "main_percussive"}


def run_cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "audiomesh.cli", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def mesh_env(mesh) -> dict[str, str]:
    return {k: v for k, v in mesh.env.items() if k.startswith(("AUDIOMESH_", "HF_"))}


def test_process_demo_without_a_running_mesh(tmp_path):
    """The README's first command: starts an ephemeral mesh, shows progress, writes every track."""
    env = {**BASE_ENV, "AUDIOMESH_ORCHESTRATOR_ADDR": "127.0.0.1:1"}  # nothing listens there
    done = run_cli(
        "process", "--demo", "--demo-seconds", "3", "--model", "demucs_unittest", "--out", "out", env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting one" in done.stderr and "%" in done.stderr  # the progress bar
    out = tmp_path / "out" / "demo"
    assert {p.stem for p in out.glob("*.wav")} == TRACKS
    doc = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(doc, manifest.schema())
    assert (tmp_path / "data" / "jobs").is_dir()  # the embedded default store: ./data


def test_process_jobs_show_models_against_a_running_mesh(file_mesh, tmp_path):
    env = mesh_env(file_mesh)
    song = write_song(tmp_path / "tune.wav", 2.0)
    done = run_cli("process", str(song), "--out", "out", "--quiet", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting one" not in done.stderr
    assert {p.stem for p in (tmp_path / "out" / "tune").glob("*.wav")} == TRACKS
    job_id = done.stdout.split("job ", 1)[1].split()[0]

    listed = run_cli("jobs", env=env, cwd=tmp_path)
    assert listed.returncode == 0 and job_id in listed.stdout
    shown = run_cli("show", job_id, env=env, cwd=tmp_path)
    assert json.loads(shown.stdout)["state"] == "JOB_STATE_SUCCEEDED"
    models = run_cli("models", env=env, cwd=tmp_path)
    assert "demucs_unittest" in models.stdout and "htdemucs" in models.stdout
    retried = run_cli("retry", job_id, env=env, cwd=tmp_path)
    assert retried.returncode == 2 and "FAILED_PRECONDITION" in retried.stderr and "SUCCEEDED" in retried.stderr
    missing = run_cli("show", "5b1c1d3e-0000-4000-8000-000000000000", env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr and "Traceback" not in missing.stderr


def test_default_model_without_weights_fails_fast_and_says_how(file_mesh, tmp_path):
    env = mesh_env(file_mesh)
    song = write_song(tmp_path / "tune.wav", 2.0)
    started = time.monotonic()
    done = run_cli("process", str(song), "--model", "htdemucs", "--quiet", env=env, cwd=tmp_path, timeout=120)
    assert time.monotonic() - started < 60
    assert done.returncode == 1
    assert "AUDIOMESH_MODEL_REPO" in done.stderr and "demucs_unittest" in done.stderr
    assert "Traceback" not in done.stderr


def test_model_execution_words_and_labels_come_from_the_proto_enum():
    """`audiomesh models` and the separation worker name ModelExecution values from the enum
    itself (no table of integers): every value round-trips, an unknown (newer) one shows blank."""
    from audiomesh.separation.execution import execution_label, execution_value
    from audiomesh.v1 import separation_pb2

    enum = separation_pb2.ModelExecution
    for value in enum.values():
        word = enum.Name(value).removeprefix("MODEL_EXECUTION_").lower() if value else ""
        assert execution_value(word) == value
    assert execution_label(separation_pb2.MODEL_EXECUTION_COMPILE_FAILED) == "compile failed"
    assert execution_label(separation_pb2.MODEL_EXECUTION_UNSPECIFIED) == execution_label(max(enum.values()) + 1) == ""


def test_a_model_reporting_an_execution_the_enum_lacks_is_listed_as_unspecified():
    """A plug-in separator's own word must not fail ListModels (every job's plan calls it)."""
    from types import SimpleNamespace

    from audiomesh.separation.execution import model_info_pb
    from audiomesh.v1 import separation_pb2

    info = SimpleNamespace(
        name="plug", sources=("a", "b"), sample_rate=44100, audio_channels=2, origin="test", max_segment=None
    )
    for word, expected in (("warming_up", "MODEL_EXECUTION_UNSPECIFIED"), ("compiled", "MODEL_EXECUTION_COMPILED")):
        info.execution = word
        assert separation_pb2.ModelExecution.Name(model_info_pb(info).execution) == expected


async def test_a_lost_watch_is_retried_with_backoff_then_given_up():
    """follow_job (the CLI's and the gateway's watch) against an address nothing answers: it
    retries UNAVAILABLE at 0.2 s doubling to the cap, then raises WatchLost naming why."""
    import grpc

    from audiomesh.rpc.client import CHANNEL_OPTIONS, WatchLost, follow_job
    from audiomesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    retries: list[tuple[int, float, str]] = []
    async with grpc.aio.insecure_channel("127.0.0.1:1", options=CHANNEL_OPTIONS) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        request = orchestrator_pb2.WatchJobRequest(job_id="5b1c1d3e-0000-4000-8000-000000000000")
        started = time.monotonic()
        with pytest.raises(WatchLost, match=r"within 2 s \(UNAVAILABLE"):
            async for _ in follow_job(
                lambda: stub.WatchJob(request),
                max_backoff=0.8,
                give_up_after=2.0,
                on_retry=lambda *a: retries.append(a),
            ):
                pass
    assert [delay for _, delay, _ in retries][:3] == [0.2, 0.4, 0.8]
    assert all(delay <= 0.8 for _, delay, _ in retries)
    assert [attempt for attempt, _, _ in retries] == list(range(1, len(retries) + 1))
    assert 1.0 < time.monotonic() - started < 10


# ------------------------------------------------------------------ issue 18: Demucs habits, messages

CLOSED = {**BASE_ENV, "AUDIOMESH_ORCHESTRATOR_ADDR": "127.0.0.1:1"}  # nothing listens there


def write_clicks(path: Path, seconds: float = 2.0, rate: int = 44100) -> Path:
    """Sparse full-scale clicks: quiet in LUFS, loud in true peak, so normalizing to -14 LUFS
    is held back by the -1 dBTP ceiling."""
    import numpy as np
    import soundfile as sf

    y = np.zeros((int(seconds * rate), 2), dtype="float32")
    y[:: rate // 4][:, :] = 0.9
    y[1 :: rate // 4][:, :] = -0.9
    sf.write(path, y, rate, subtype="PCM_16")
    return path


def test_cuda_asked_where_torch_sees_none_is_refused_before_any_mesh_starts(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: -d cuda is valid here")
    song = write_song(tmp_path / "a.wav", 1.0)
    done = run_cli("process", "-d", "cuda", str(song), env=CLOSED, cwd=tmp_path, timeout=60)
    assert done.returncode != 0, done.stderr
    assert "-d cuda: torch" in done.stderr and "sees no CUDA device on this machine" in done.stderr, done.stderr
    assert "use -d cpu" in done.stderr and "starting one" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_demucs_command_line_runs_unchanged(file_mesh, tmp_path):
    """`demucs -n M --two-stems vocals --mp3 --mp3-bitrate 192 -o out -j 2 -d cpu a.wav b.mp3`
    with `audiomesh process` in its place, in a 60-column terminal: MP3 tracks of the right
    length and bitrate, a batch that goes past a file that is not audio and one that is
    missing, the device named as the mesh's, the page's stage words, the loudness outcome."""
    import soundfile as sf

    env = {**mesh_env(file_mesh), "COLUMNS": "60"}
    song = write_song(tmp_path / "a.wav", 2.0)
    y, rate = sf.read(song)
    sf.write(tmp_path / "b.mp3", y, rate)
    write_clicks(tmp_path / "clicks.wav")
    (tmp_path / "notes.txt").write_text("not audio")
    argv = ["-n", "demucs_unittest", "--two-stems", "vocals", "--mp3", "--mp3-bitrate", "192", "-o", "out"]
    files = ["a.wav", "b.mp3", "clicks.wav", "notes.txt", "missing.wav"]
    done = run_cli("process", *argv, "-j", "2", "-d", "cpu", *files, env=env, cwd=tmp_path)

    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "note: -d cpu not applied" in done.stderr and "cannot be chosen per job" in done.stderr
    summary = done.stderr[done.stderr.index("3 of 5 files done; failed:") :]
    assert "missing.wav: no such file" in summary and "notes.txt: INVALID_ARGUMENT" in summary
    for name in ("a", "b", "clicks"):
        out = tmp_path / "out" / name
        assert {"vocals.mp3", "no_vocals.mp3", "manifest.json"} <= {p.name for p in out.iterdir()}
        assert not list(out.glob("*.wav"))
        info = sf.info(out / "vocals.mp3")
        assert abs(info.frames / info.samplerate - 2.0) < 0.1
        kbps = (out / "vocals.mp3").stat().st_size * 8 / 2.0 / 1000
        assert 192 * 0.7 < kbps < 192 * 1.3, kbps
    doc = json.loads((tmp_path / "out" / "clicks" / "manifest.json").read_text())
    norm = doc["job"]["normalization"]
    assert norm["limitedByCeiling"]
    reached = norm["reference"]["integratedLufs"] + norm["linkedGainDb"]
    assert f"clicks.wav: loudness limited by the -1 dBTP ceiling: {reached:.1f} LUFS (target -14 LUFS)" in done.stdout
    assert "a.wav: loudness" not in done.stdout  # a job the ceiling did not hold says nothing

    bars = [line for line in done.stderr.splitlines() if "% |" in line]
    assert bars and all(len(line) <= 59 for line in bars), [line for line in bars if len(line) > 59]
    assert len({(line.index("|"), line.rindex("|")) for line in bars}) == 1  # one shape throughout
    words = " ".join(bars)
    assert "Separating stems" in words and "Done in" in words
    assert "hpss:" not in words and ", running" not in words and "|  ," not in words


def test_messages_without_a_mesh(tmp_path):
    """Every command that needs a mesh says where it looked and what to do; a missing file is
    reported before any mesh is started."""
    commands = [
        ["jobs"],
        ["show", "cc26e1bc"],
        ["cancel", "cc26e1bc"],
        ["retry", "cc26e1bc"],
        ["download", "cc26e1bc"],
        ["models"],
        ["process", "--detach", str(write_song(tmp_path / "a.wav", 0.5))],
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "audiomesh.cli", *argv],
            env={**os.environ, **CLOSED},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in commands
    ]
    for argv, proc in zip(commands, procs, strict=True):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (argv, err)
        assert err.strip() == "error: no mesh at 127.0.0.1:1: start one with `audiomesh up`", (argv, err)

    missing = run_cli("process", "gone.wav", "also-gone.flac", env=CLOSED, cwd=tmp_path, timeout=60)
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == ["error: gone.wav: no such file", "error: also-gone.flac: no such file"]
    assert not (tmp_path / "data").exists()  # no mesh was started
    version = run_cli("--version", env=CLOSED, cwd=tmp_path, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("audiomesh ")


def _stderr_until(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    """Read ``proc``'s stderr lines until one matches ``pattern`` (bounded); the match."""
    import re
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if not selector.select(timeout=0.5):
            continue
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if match := re.search(pattern, line):
            return match.group(1)
    raise AssertionError(f"no {pattern!r} within {timeout} s in: {''.join(seen)[-2000:]}")


def test_detach_download_ctrl_c_cancel_and_retry_by_short_ids(file_mesh, tmp_path):
    """--detach prints how to fetch; `download PREFIX` waits and fetches; Ctrl-C during
    `process` cancels its job on the server; a job cancelled elsewhere ends `process` with a
    plain line; `retry PREFIX` follows the job to its end and fetches its tracks."""
    import signal

    env = mesh_env(file_mesh)
    write_song(tmp_path / "quick.wav", 1.0)
    detached = run_cli("process", "--detach", "-o", "dl", "quick.wav", env=env, cwd=tmp_path, timeout=60)
    assert detached.returncode == 0, detached.stderr[-2000:]
    hint = detached.stdout.split("`audiomesh ", 1)[1].split("`", 1)[0].split()
    assert hint[0] == "download" and len(hint[1]) == 8 and hint[2:] == ["-o", "dl"]
    fetched = run_cli(*hint, env=env, cwd=tmp_path, timeout=120)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    assert {"vocals.wav", "main.wav", "manifest.json"} <= {p.name for p in (tmp_path / "dl" / "quick").iterdir()}

    write_song(tmp_path / "long.wav", 6.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "audiomesh.cli", "process", "long.wav", "-o", "out"],
        env={**os.environ, **env},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job_id = _stderr_until(proc, r"long\.wav: job ([0-9a-f-]{36})", 60)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert "interrupted: cancelling 1 job (--detach leaves jobs running)" in rest
    assert f"long.wav: job {job_id} cancelled" in rest and "Traceback" not in rest
    shown = run_cli("show", job_id[:8], env=env, cwd=tmp_path, timeout=60)
    assert json.loads(shown.stdout)["state"] == "JOB_STATE_CANCELLED"

    write_song(tmp_path / "other.wav", 6.0, seed=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "audiomesh.cli", "process", "other.wav", "-o", "out"],
        env={**os.environ, **env},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        other_id = _stderr_until(proc, r"other\.wav: job ([0-9a-f-]{36})", 60)
        cancelled = run_cli("cancel", other_id[:8], env=env, cwd=tmp_path, timeout=60)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert cancelled.stdout.strip() == f"{other_id} CANCELLED"
    assert proc.returncode == 1
    assert f"error: other.wav: job {other_id} cancelled" in rest and "CANCELLED: :" not in rest

    retried = run_cli("retry", job_id[:8], "-o", "again", env=env, cwd=tmp_path, timeout=120)
    assert retried.returncode == 0, retried.stderr[-2000:]
    assert f"long.wav: job {job_id} " in retried.stderr and " again" in retried.stderr
    assert "Done in" in retried.stderr
    assert {"vocals.wav", "manifest.json"} <= {p.name for p in (tmp_path / "again" / "long").iterdir()}
    listed = run_cli("jobs", env=env, cwd=tmp_path, timeout=60)
    assert listed.stdout.splitlines()[0].split() == ["JOB", "ID", "STATE", "CREATED", "(UTC)", "DONE", "INPUT"]
    models = run_cli("models", env=env, cwd=tmp_path, timeout=60)
    assert models.stdout.splitlines()[0].split() == ["MODEL", "KIND", "ORIGIN", "WEIGHTS", "RUNS", "STEMS"]
    rows = [line.lstrip("* ").split()[:2] for line in models.stdout.splitlines()]
    assert ["demucs_unittest", "demucs"] in rows, models.stdout


def listing_orchestrator(ids: list[str]):
    from audiomesh.v1 import orchestrator_pb2_grpc

    class Listing(ListingOrchestrator, orchestrator_pb2_grpc.OrchestratorServiceServicer):
        pass

    return Listing(ids)


class ListingOrchestrator:
    """An orchestrator that lists a fixed set of jobs newest first, ``per_page`` at a time,
    and never runs out when ``endless`` (to check the CLI's bound on paging)."""

    def __init__(self, ids: list[str], *, endless: bool = False) -> None:
        self.ids = ids
        self.endless = endless
        self.pages = 0

    async def ListJobs(self, request, context):
        from audiomesh.v1 import common_pb2, orchestrator_pb2

        self.pages += 1
        start = int(request.page_token or 0)
        ids = self.ids[start : start + request.page_size]
        if self.endless:  # other jobs than these, page after page
            ids = ["0" * 8 + i[8:] for i in self.ids[: request.page_size]]
        jobs = [
            orchestrator_pb2.Job(job_id=i, state=common_pb2.JOB_STATE_SUCCEEDED, input={"name": f"{i[:4]}.wav"})
            for i in ids
        ]
        more = self.endless or start + request.page_size < len(self.ids)
        return orchestrator_pb2.ListJobsResponse(jobs=jobs, next_page_token=str(start + len(ids)) if more else "")

    async def GetJob(self, request, context):
        import grpc

        from audiomesh.v1 import common_pb2, orchestrator_pb2

        if request.job_id not in self.ids:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id} not found")
        job = orchestrator_pb2.Job(job_id=request.job_id, state=common_pb2.JOB_STATE_SUCCEEDED)
        return orchestrator_pb2.GetJobResponse(job=job)


async def run_cli_async(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audiomesh.cli", *args,
        env={**os.environ, **env}, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_short_ids_resolve_uniquely_or_say_why(tmp_path):
    """A unique start of an id stands for it; one that starts several names them; none is
    NOT_FOUND; the newest jobs are searched a bounded number of pages."""

    from audiomesh.cli_jobs import PREFIX_PAGE, PREFIX_PAGES

    ids = [f"{n:08x}-0000-4000-8000-000000000000" for n in range(450)]
    ids += ["cc26e1bc-1111-4000-8000-000000000000", "cc26e1bd-2222-4000-8000-000000000000"]
    listing = listing_orchestrator(ids)
    async with orchestrator_standing_in(listing) as env:
        code, out, err = await run_cli_async("show", "CC26E1BD", env=env, cwd=tmp_path)
        assert code == 0, err
        assert json.loads(out)["jobId"] == "cc26e1bd-2222-4000-8000-000000000000"
        assert listing.pages == 3  # 452 jobs, 200 a page: the prefix was found on the last page

        code, out, err = await run_cli_async("show", "cc26e1b", env=env, cwd=tmp_path)
        assert code == 2
        assert "'cc26e1b' starts more than one job id; give more of it" in err
        assert "cc26e1bc-1111-4000-8000-000000000000" in err and "cc26e1bd-2222-4000-8000-000000000000" in err

        code, out, err = await run_cli_async("cancel", "ffff", env=env, cwd=tmp_path)
        assert (code, err.strip()) == (2, "error: no job whose id starts with 'ffff': `audiomesh jobs` lists them")
        code, out, err = await run_cli_async("download", "cc26e1bc-z", env=env, cwd=tmp_path)
        assert code == 2 and "is not a job id or the start of one" in err

        listing.endless, listing.pages = True, 0
        code, out, err = await run_cli_async("show", "ffff", env=env, cwd=tmp_path)
        assert code == 2 and f"among the newest {PREFIX_PAGE * PREFIX_PAGES} jobs" in err
        assert listing.pages == PREFIX_PAGES


async def test_a_short_prefix_is_not_taken_as_unique_when_older_jobs_went_unsearched(tmp_path):
    """Past the newest PREFIX_PAGES pages a one-match prefix may still name an older job too:
    a short one is refused (saying so), one as long as the CLI's own hints is taken."""

    from audiomesh.cli_jobs import PREFIX_PAGE, PREFIX_PAGES, SAFE_PREFIX

    wanted = "cc26e1bc-1111-4000-8000-000000000000"
    older = [f"{n:08x}-0000-4000-8000-000000000000" for n in range(PREFIX_PAGE * PREFIX_PAGES)]
    listing = listing_orchestrator([wanted, *older])  # one page more than is searched
    async with orchestrator_standing_in(listing) as env:
        code, out, err = await run_cli_async("show", "cc2", env=env, cwd=tmp_path)
        assert code == 2 and out == "", err
        assert err.strip() == (
            f"error: 'cc2' starts job {wanted} among the newest {PREFIX_PAGE * PREFIX_PAGES} jobs, but older"
            f" ones were not searched: give at least {SAFE_PREFIX} characters of the id"
        )
        code, out, err = await run_cli_async("show", wanted[:SAFE_PREFIX], env=env, cwd=tmp_path)
        assert code == 0, err
        assert json.loads(out)["jobId"] == wanted


def test_an_output_folder_that_cannot_be_written_is_said_before_anything_runs(file_mesh, tmp_path):
    """`-o` onto a file is one line and exit 2 before any upload (process), any wait (download)
    or any rerun (retry); a folder that fails only while writing ends with a line that says
    the job is done and how to fetch it, exit 1, no traceback."""
    env = mesh_env(file_mesh)
    write_song(tmp_path / "song.wav", 1.0)
    (tmp_path / "blocker").write_text("a file where a folder would go")
    blocked = "error: -o blocker: blocker is a file, not a folder"

    done = run_cli("process", "song.wav", "-o", "blocker", env=env, cwd=tmp_path, timeout=60)
    assert (done.returncode, done.stderr.strip()) == (2, blocked), done.stderr[-2000:]

    submitted = run_cli("process", "--detach", "song.wav", env=env, cwd=tmp_path, timeout=60)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    short = submitted.stdout.split("`audiomesh download ", 1)[1].split()[0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "song").write_text("a file where the job's folder would go")
    done = run_cli("download", short, "-o", "out", env=env, cwd=tmp_path, timeout=60)
    assert (done.returncode, done.stderr.strip()) == (2, "error: -o out: out/song is a file, not a folder")

    # Only writing can tell: a folder name longer than the file system allows.
    long_name = "x" * 300
    done = run_cli("download", short, "-o", long_name, "-q", env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: song.wav: cannot write {long_name}/song: ") and "File name too long" in line
    assert line.endswith(f"the job is done: `audiomesh download {short} -o DIR` fetches it")

    done = run_cli("retry", short, "-o", "blocker", env=env, cwd=tmp_path, timeout=60)
    assert (done.returncode, done.stderr.strip()) == (2, blocked)


def test_options_the_model_cannot_take_fail_once_before_any_upload(file_mesh, tmp_path):
    """A Demucs flag the chosen model cannot honour is one line and exit 2 for the whole
    batch, before any file is uploaded (not the same refusal once per file)."""
    env = mesh_env(file_mesh)
    files = [str(write_song(tmp_path / f"{n}.wav", 0.5, seed=n)) for n in range(2)]
    cases = [
        (["--two-stems", "guitar"], "error: two_stems must be one of the sources of model 'demucs_unittest'"),
        (["-n", "htdemucs", "--segment", "30"], "error: segment must be <= 7.8 s for model 'htdemucs'"),
        (["-n", "nosuch"], "error: unknown model 'nosuch'; available: demucs_unittest, "),
    ]
    for flags, says in cases:
        done = run_cli("process", *flags, *files, env=env, cwd=tmp_path, timeout=60)
        assert done.returncode == 2, (flags, done.stderr[-2000:])
        (line,) = done.stderr.splitlines()
        assert line.startswith(says), (flags, line)
    assert not (tmp_path / "out").exists()


class ModelListingOrchestrator:
    """An orchestrator whose one model separates at ``rate`` Hz, and which counts uploads."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.uploads = 0

    async def ListModels(self, request, context):
        from audiomesh.v1 import separation_pb2

        model = separation_pb2.ModelInfo(
            name="hi_rate", sources=["vocals", "drums", "bass", "other"], sample_rate=self.rate, audio_channels=2,
            origin="local_repo", available=True,
        )  # fmt: skip
        return separation_pb2.ListModelsResponse(models=[model], default_model="hi_rate")

    async def UploadAudio(self, request_iterator, context):
        import grpc

        self.uploads += 1
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this test's orchestrator takes no uploads")


async def test_mp3_from_a_model_whose_rate_mp3_cannot_store_is_refused_before_upload(tmp_path):
    """`--mp3` with a model that separates at 96 kHz: one line naming the rate and the way out,
    exit 2, nothing uploaded. (An orchestrator that lists such a model stands in for a mesh with
    one in its model repository: only its ListModels answer matters here.)"""
    from audiomesh.v1 import orchestrator_pb2_grpc

    class Orchestrator(ModelListingOrchestrator, orchestrator_pb2_grpc.OrchestratorServiceServicer):
        pass

    orchestrator = Orchestrator(96000)
    async with orchestrator_standing_in(orchestrator) as env:
        write_song(tmp_path / "a.wav", 0.5)
        code, out, err = await run_cli_async("process", "--mp3", "a.wav", env=env, cwd=tmp_path)
        assert code == 2, err
        assert err.strip() == (
            "error: MP3 output (encoding AUDIO_ENCODING_MP3): model 'hi_rate' separates at 96000 Hz; MP3 stores sample rates of 8000, 11025, 12000,"
            " 16000, 22050, 24000, 32000, 44100, 48000 Hz, not 96000 Hz: choose WAV or FLAC"
        )
        assert orchestrator.uploads == 0
        orchestrator.rate = 48000  # a rate MP3 stores: the check passes and the upload is tried
        code, out, err = await run_cli_async("process", "--mp3", "a.wav", "-q", env=env, cwd=tmp_path)
        assert code == 1 and "UNIMPLEMENTED: this test's orchestrator takes no uploads" in err, err
        assert orchestrator.uploads == 1
