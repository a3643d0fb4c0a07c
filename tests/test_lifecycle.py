"""Service lifecycle: SIGTERM drains in-flight work; the retention sweeper deletes old jobs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc

from audiomesh import manifest
from audiomesh.config import load_settings
from audiomesh.demo import synth_song
from audiomesh.rpc.server import start_server
from audiomesh.services.orchestrator.jobs import JobRegistry
from audiomesh.services.orchestrator.server import build as build_orchestrator
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, separation_pb2, separation_pb2_grpc
from tests.helpers.mesh import BASE_ENV


class Service:
    """``audiomesh serve NAME`` as a child process on a free port; its JSON log lines are
    collected as they come, each with the monotonic time it was read."""

    def __init__(self, name: str, tmp_path, **env: str) -> None:
        ready = tmp_path / f"{name}.ready.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "audiomesh.cli", "serve", name, "--port", "0", "--ready-file", str(ready)],
            env={**os.environ, **BASE_ENV, "AUDIOMESH_STORE_URL": f"file://{tmp_path / 'store'}", **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[tuple[float, dict]] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, f"{name} did not start: {self.lines}"
            time.sleep(0.1)
        self.address = f"127.0.0.1:{json.loads(ready.read_text())['port']}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with contextlib.suppress(ValueError):
                self.lines.append((time.monotonic(), json.loads(line)))

    def logged(self, event: str, **fields: object) -> list[tuple[float, dict]]:
        return [(t, r) for t, r in self.lines if r.get("event") == event and fields.items() <= r.items()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _song(tmp_path, seconds: float) -> str:
    path = tmp_path / "store" / "in" / "song.wav"
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, synth_song(seconds).T, 44100, subtype="FLOAT")
    return "in/song.wav"


SEPARATE = "/audiomesh.v1.SeparationService/Separate"


async def test_sigterm_drains_the_running_separation_and_refuses_new_calls(tmp_path):
    """SIGTERM mid-separation: health turns NOT_SERVING, new calls (on the caller's channel and on a
    new one) get UNAVAILABLE so the orchestrator retries elsewhere, the running call completes,
    and the process exits 0 — with the AUDIOMESH_DRAIN_SECONDS grace, not a fixed one."""
    key = _song(tmp_path, 20.0)
    worker = Service("separation", tmp_path, AUDIOMESH_DRAIN_SECONDS="90")
    full_name = separation_pb2.DESCRIPTOR.services_by_name["SeparationService"].full_name
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = separation_pb2_grpc.SeparationServiceStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=full_name))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            request = separation_pb2.SeparateRequest(
                input_key=key, output_prefix="out", options=common_pb2.SeparationOptions(shifts=3)
            )
            call = stub.Separate(request)
            async for msg in call:
                if msg.HasField("progress") and msg.progress.fraction > 0:
                    worker.proc.send_signal(signal.SIGTERM)  # mid-separation
                    break
            # The health stream already open sees the drain (a new Check would be refused).
            status = await asyncio.wait_for(watch.read(), 10)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # a Watch is an in-flight call too: it would hold the drain open
            refused = []
            for _ in range(50):  # NOT_SERVING comes just before the server stops taking calls
                try:
                    await stub.ListModels(separation_pb2.ListModelsRequest(), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    refused.append(exc.code())
                    break
                await asyncio.sleep(0.1)
            assert refused == [grpc.StatusCode.UNAVAILABLE], refused
            async with grpc.aio.insecure_channel(worker.address) as fresh:
                with pytest.raises(grpc.aio.AioRpcError) as new_call:
                    async for _ in separation_pb2_grpc.SeparationServiceStub(fresh).Separate(request, timeout=5):
                        pass
                assert new_call.value.code() == grpc.StatusCode.UNAVAILABLE, new_call.value
            assert worker.proc.poll() is None, "the worker stopped before its call finished"
            result = None
            async for msg in call:
                if msg.HasField("result"):
                    result = msg.result
        assert isinstance(result, separation_pb2.SeparateResult), "the in-flight call did not complete"
        assert {t.name for t in result.stems} == {"drums", "bass", "other", "vocals"}
        assert all((tmp_path / "store" / t.key).is_file() for t in result.stems)
        assert worker.proc.wait(timeout=60) == 0
        assert worker.logged("draining", grace_s=90.0), "the drain did not use AUDIOMESH_DRAIN_SECONDS"
        # The refused call never reached a handler: one Separate ran, and it ended OK.
        assert [r["code"] for _, r in worker.logged("rpc", method=SEPARATE)] == ["OK"]
    finally:
        worker.close()


async def test_the_drain_ends_after_drain_seconds_and_cancels_what_still_runs(tmp_path):
    """AUDIOMESH_DRAIN_SECONDS bounds the drain: a separation still running when it ends is
    cancelled (its caller retries the node on another worker) and the process exits 0 soon after."""
    key = _song(tmp_path, 30.0)
    worker = Service("separation", tmp_path, AUDIOMESH_DRAIN_SECONDS="1")
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = separation_pb2_grpc.SeparationServiceStub(channel)
            request = separation_pb2.SeparateRequest(
                input_key=key, output_prefix="out", options=common_pb2.SeparationOptions(shifts=20, segment_seconds=1.0)
            )
            signalled = 0.0
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async for msg in stub.Separate(request, timeout=120):
                    if msg.HasField("progress") and msg.progress.fraction > 0 and not signalled:
                        worker.proc.send_signal(signal.SIGTERM)
                        signalled = time.monotonic()
            assert signalled, "the call ended before it could be interrupted"
            cut = time.monotonic() - signalled
        assert ended.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), ended.value
        assert worker.proc.wait(timeout=30) == 0
        exited = time.monotonic() - signalled
        print(f"1 s drain: call cut {cut:.2f} s, process exited {exited:.2f} s after SIGTERM")
        assert cut < 10, f"the call ran {cut:.1f} s past SIGTERM with a 1 s drain"
        assert [r["code"] for _, r in worker.logged("rpc", method=SEPARATE)] == ["CANCELLED"]
    finally:
        worker.close()


# A caller in its own process, so the test can freeze it: it prints "started" at the first progress
# message of a long separation (20 passes; 1 s segments, so the worker checks for cancellation often),
# then reads on.
CALLER = """
import asyncio, sys
import grpc
from audiomesh.rpc.client import CHANNEL_OPTIONS
from audiomesh.v1 import common_pb2, separation_pb2, separation_pb2_grpc

async def main():
    async with grpc.aio.insecure_channel(sys.argv[1], options=CHANNEL_OPTIONS) as channel:
        stub = separation_pb2_grpc.SeparationServiceStub(channel)
        request = separation_pb2.SeparateRequest(
            input_key=sys.argv[2], output_prefix="out", options=common_pb2.SeparationOptions(shifts=20, segment_seconds=1.0)
        )
        async for msg in stub.Separate(request):
            if msg.HasField("progress") and msg.progress.fraction > 0:
                print("started", flush=True)

asyncio.run(main())
"""


async def test_a_frozen_callers_call_is_cancelled_within_seconds(tmp_path):
    """The server's keepalive notices a caller that stopped answering (SIGSTOP: the kernel still
    acks TCP, the process acks no HTTP/2 ping) and cancels its call, so the separation stops well
    within an orchestrator lease's 2/3 TTL (10 s of the default 15 s)."""
    key = _song(tmp_path, 30.0)
    worker = Service("separation", tmp_path, AUDIOMESH_DRAIN_SECONDS="5")
    caller = subprocess.Popen(  # noqa: ASYNC220 - a child for the test's whole life
        [sys.executable, "-c", CALLER, worker.address, key],
        env={**os.environ, **BASE_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert caller.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(caller.stdout.readline), 60)
        assert line.strip() == "started", caller.stderr.read() if caller.stderr else ""
        caller.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        deadline = frozen + 15
        while not worker.logged("rpc", method=SEPARATE) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ended = worker.logged("rpc", method=SEPARATE)
        assert ended, f"the frozen caller's separation was still running after 15 s: {worker.lines[-3:]}"
        seconds = ended[0][0] - frozen
        print(f"frozen caller's call cancelled {seconds:.2f} s after SIGSTOP")
        assert ended[0][1]["code"] == "CANCELLED", ended[0][1]
        # ~4.2 s on a quiet machine (2 s ping + 2 s to answer + the chunk being computed); 6.4 s seen
        # with the suite's other worker busy. Without the keepalive it is never cancelled (above).
        assert seconds < 10.0, f"cancelled {seconds:.2f} s after the caller froze (budget 10 s)"
        assert worker.proc.poll() is None  # the worker lives on, free for the next call
    finally:
        caller.kill()  # a stopped process dies on SIGKILL too
        caller.wait()
        worker.close()


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


async def test_retention_deletes_job_folders_a_crash_left_without_a_manifest(tmp_path):
    """An orchestrator killed between storing an upload (and its lease) and writing the job's first
    manifest leaves a folder nothing refers to: swept after the period; a fresh one stays (a job
    being created right now looks the same)."""
    settings = load_settings(store_url=f"file://{tmp_path / 'store'}", retention_hours=24)
    store = settings.open_store()
    old = datetime.now(UTC) - timedelta(hours=30)
    stale, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    for job_id, when in ((stale, old), (fresh, datetime.now(UTC))):
        for key in (f"jobs/{job_id}/input/song.wav", f"jobs/{job_id}/lease.json"):
            store.put_bytes(key, b"x")
            os.utime(tmp_path / "store" / key, (when.timestamp(), when.timestamp()))
    kept = _write_job(store, age=timedelta(hours=1), state=common_pb2.JOB_STATE_SUCCEEDED)
    registry = JobRegistry(store, {})
    await registry.load_all()
    assert await registry.sweep(settings.retention_hours) == (0, 2)
    assert not list(store.list(f"jobs/{stale}/"))
    assert len(list(store.list(f"jobs/{fresh}/"))) == 2 and store.exists(f"jobs/{kept}/manifest.json")
