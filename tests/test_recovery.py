"""Cancellation and crash recovery with real processes."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import jsonschema

from audiomesh import manifest
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.mesh import SUCCEEDED, start_mesh, upload, wait_for, write_song

# With an 8 s song, a separation of ~10 s with demucs_unittest on 2 cores (4 passes): long enough
# to stop it mid-way, short enough that what runs after it stays cheap.
SLOW = orchestrator_pb2.JobOptions()
SLOW.separation.shifts = 4


async def wait_until_running(stub, job_id: str, node: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    async for msg in stub.WatchJob(orchestrator_pb2.WatchJobRequest(job_id=job_id)):
        states = {n.name: n for n in msg.job.nodes}
        if node in states and states[node].state == common_pb2.NODE_STATE_RUNNING and states[node].fraction > 0:
            return
        assert msg.job.state not in (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED), msg.job
        assert time.monotonic() < deadline, f"{node} never ran"
    raise AssertionError("stream ended before the node ran")


async def test_cancel_mid_separation_stops_the_workers(orchestrator, file_mesh, tmp_path):
    song = write_song(tmp_path / "long.wav", 12.0)
    job = (await upload(orchestrator, song.read_bytes(), "long.wav", SLOW)).job
    await wait_until_running(orchestrator, job.job_id, "separation")
    started = time.monotonic()
    resp = await orchestrator.CancelJob(orchestrator_pb2.CancelJobRequest(job_id=job.job_id))
    assert resp.job.state == common_pb2.JOB_STATE_CANCELLED
    assert time.monotonic() - started < 15
    final, _ = await wait_for(orchestrator, job.job_id, timeout=10)
    sep = next(n for n in final.nodes if n.name == "separation")
    assert sep.state == common_pb2.NODE_STATE_CANCELLED
    root = Path(file_mesh.env["AUDIOMESH_STORE_URL"].removeprefix("file://"))
    # No half-written stems, and the manifest says what happened.
    assert not (root / f"jobs/{job.job_id}/separation").exists()
    doc = json.loads((root / final.manifest_key).read_bytes())
    assert doc["job"]["state"] == "JOB_STATE_CANCELLED"
    assert any("cancelled" in e for e in doc["events"])
    # The worker is free again: a new job runs to the end.
    short = write_song(tmp_path / "short.wav", 2.0)
    again = (await upload(orchestrator, short.read_bytes(), "short.wav")).job
    done, _ = await wait_for(orchestrator, again.job_id)
    assert done.state == SUCCEEDED


async def test_orchestrator_killed_mid_job_resumes_after_restart(tmp_path):
    mesh = start_mesh(tmp_path)
    try:
        async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            song = write_song(tmp_path / "song.wav", 8.0)
            job = (await upload(stub, song.read_bytes(), "song.wav", SLOW)).job
            await wait_until_running(stub, job.job_id, "separation")
        mesh.kill("orchestrator")  # SIGKILL: no chance to write anything more
        mesh.restart("orchestrator")
        async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            final, _ = await wait_for(stub, job.job_id, timeout=300)
        assert final.state == SUCCEEDED, final.error
        assert len(final.tracks) == 9
        root = Path(mesh.env["AUDIOMESH_STORE_URL"].removeprefix("file://"))
        doc = json.loads((root / final.manifest_key).read_bytes())
        jsonschema.validate(doc, manifest.schema())
        assert any("resumed" in e for e in doc["events"])
        decode = next(n for n in final.nodes if n.name == "decode")
        assert decode.attempts == 1  # reused, not run again
    finally:
        await asyncio.to_thread(mesh.stop)
