"""Separation scaled to zero (KEDA minReplicas 0): a job is still accepted, waits QUEUED — the
signal the chart's ScaledObject reads (audiomesh_jobs{state="queued"}) — and runs once a
separation worker comes up. An in-process orchestrator whose separation address has nothing
behind it yet, the shared mesh's other workers, then a real separation process on that port."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

from prometheus_client import REGISTRY

from audiomesh.v1 import common_pb2
from tests.helpers.mesh import SUCCEEDED, until_job, upload, wait_for, write_song
from tests.test_cluster import replicas


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_job_waits_queued_for_a_separation_worker_and_then_runs(file_mesh, tmp_path):
    port = _free_port()
    song = write_song(tmp_path / "song.wav", 3.0, seed=31).read_bytes()
    async with replicas(file_mesh, "zero", separation_addr=f"127.0.0.1:{port}", unavailable_budget_seconds=120) as (
        orch,
    ):
        job_id = (await upload(orch.stub, song, "song.wav")).job.job_id
        queued = await until_job(orch.stub, job_id, lambda j: bool(j.job_id), 10, "the job was not created")
        assert queued.state == common_pb2.JOB_STATE_QUEUED
        assert (REGISTRY.get_sample_value("audiomesh_jobs", {"state": "queued"}) or 0) >= 1
        # KEDA's part, by hand: a separation worker starts on the address the orchestrator dials.
        worker = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "audiomesh.cli", "serve", "separation", "--port", str(port)),
            env={**os.environ, **file_mesh.env, "AUDIOMESH_METRICS_PORT": "0"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            job, _ = await wait_for(orch.stub, job_id, timeout=180)
        finally:
            worker.terminate()
            await asyncio.wait_for(worker.wait(), 60)
    assert job.state == SUCCEEDED, job.error
