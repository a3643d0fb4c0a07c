"""The `audiomesh` command as a user runs it (subprocesses, real mesh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from audiomesh import manifest
from tests.helpers.mesh import BASE_ENV, write_song

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
