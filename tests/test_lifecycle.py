"""Service lifecycle: SIGTERM drains in-flight work; the retention sweeper deletes old jobs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import soundfile as sf

from audiomesh import manifest
from audiomesh.config import load_settings
from audiomesh.demo import synth_song
from audiomesh.rpc.server import start_server
from audiomesh.services.orchestrator.jobs import JobRegistry
from audiomesh.services.orchestrator.server import build as build_orchestrator
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, separation_pb2, separation_pb2_grpc
from tests.helpers.mesh import BASE_ENV


async def test_sigterm_lets_the_running_separation_finish(tmp_path):
    store = tmp_path / "store"
    (store / "in").mkdir(parents=True)
    sf.write(store / "in/long.wav", synth_song(20.0).T, 44100, subtype="FLOAT")
    ready = tmp_path / "ready.json"
    env = {**os.environ, **BASE_ENV, "AUDIOMESH_STORE_URL": f"file://{store}"}
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child service for the test's whole life
        [sys.executable, "-m", "audiomesh.cli", "serve", "separation", "--port", "0", "--ready-file", str(ready)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "separation did not start"
            await asyncio.sleep(0.1)
        port = json.loads(ready.read_text())["port"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = separation_pb2_grpc.SeparationServiceStub(channel)
            request = separation_pb2.SeparateRequest(
                input_key="in/long.wav", output_prefix="out", options=common_pb2.SeparationOptions(shifts=3)
            )
            result = None
            async for msg in stub.Separate(request):
                if msg.HasField("progress") and msg.progress.fraction > 0 and proc.poll() is None:
                    if not result:
                        proc.send_signal(signal.SIGTERM)  # mid-separation
                        result = "signalled"
                elif msg.HasField("result"):
                    result = msg.result
        assert isinstance(result, separation_pb2.SeparateResult), "the in-flight call did not complete"
        assert {t.name for t in result.stems} == {"drums", "bass", "other", "vocals"}
        assert all((store / t.key).is_file() for t in result.stems)
        assert proc.wait(timeout=60) == 0
        assert b"draining" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _write_job(store, *, age: timedelta, state: int, input_key: str = "") -> str:
    job_id = str(uuid.uuid4())
    job = orchestrator_pb2.Job(job_id=job_id, state=state, manifest_key=f"jobs/{job_id}/manifest.json")
    job.create_time.FromDatetime(datetime.now(UTC) - age)
    job.update_time.CopyFrom(job.create_time)
    job.input.name = "x.wav"
    job.input.key = input_key
    store.put_bytes(f"jobs/{job_id}/output/main.wav", b"RIFF")
    doc = orchestrator_pb2.Manifest(schema_version=manifest.SCHEMA_VERSION, job=job)
    store.put_bytes(job.manifest_key, manifest.dumps(doc))
    return job_id


async def test_retention_deletes_orphaned_uploads_older_than_the_period(tmp_path):
    """Uploads without a job (UploadAudio, create_job false) that no job uses are swept after the
    retention period; one a live job uses stays; an expired job takes the upload it used along."""
    settings = load_settings(store_url=f"file://{tmp_path / 'store'}", retention_hours=24)
    store = settings.open_store()
    old = datetime.now(UTC) - timedelta(hours=30)

    def upload(name: str, when: datetime) -> str:
        key = f"uploads/alice/{uuid.uuid4()}/{name}"
        store.put_bytes(key, b"RIFF")
        os.utime(tmp_path / "store" / key, (when.timestamp(), when.timestamp()))
        return key

    orphan, fresh, used, used_by_expired = (
        upload("orphan.wav", old),
        upload("fresh.wav", datetime.now(UTC)),
        upload("used.wav", old),
        upload("gone.wav", old),
    )
    _write_job(store, age=timedelta(hours=1), state=common_pb2.JOB_STATE_SUCCEEDED, input_key=used)
    expired = _write_job(
        store, age=timedelta(hours=30), state=common_pb2.JOB_STATE_SUCCEEDED, input_key=used_by_expired
    )
    registry = JobRegistry(store, {})
    await registry.load_all()
    assert await registry.sweep(settings.retention_hours) == (1, 1)  # gone.wav went with its job
    assert not store.exists(orphan) and not store.exists(used_by_expired) and expired not in registry.records
    assert store.exists(fresh) and store.exists(used)
    assert await registry.sweep(0) == (0, 0)  # 0 hours keeps everything


async def test_retention_deletes_finished_jobs_older_than_the_period(tmp_path):
    settings = load_settings(store_url=f"file://{tmp_path / 'store'}", retention_hours=24)
    store = settings.open_store()
    old = _write_job(store, age=timedelta(hours=30), state=common_pb2.JOB_STATE_SUCCEEDED)
    fresh = _write_job(store, age=timedelta(hours=1), state=common_pb2.JOB_STATE_FAILED)
    spec = build_orchestrator(settings)
    server = await start_server(spec.registrations, service="orchestrator", warmup=spec.warmup)
    try:
        await asyncio.wait_for(server.ready.wait(), 30)
        deadline = time.monotonic() + 10
        while list(store.list(f"jobs/{old}/")) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not list(store.list(f"jobs/{old}/"))
        assert store.exists(f"jobs/{fresh}/output/main.wav")
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            jobs = (await stub.ListJobs(orchestrator_pb2.ListJobsRequest())).jobs
            assert [j.job_id for j in jobs] == [fresh]
    finally:
        await spec.on_stop()
        await server.stop(1)
