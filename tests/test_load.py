"""Load: 20 jobs submitted at once; then 20 more with half of them cancelled mid-run.

Bounded: every wait has a deadline; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import jsonschema

from audiomesh import manifest
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.mesh import start_mesh, upload, wait_for, write_song

JOBS = 20


async def test_twenty_jobs_at_once_then_half_cancelled(tmp_path):
    mesh = start_mesh(tmp_path, AUDIOMESH_MAX_RUNNING_JOBS="4")
    root = Path(mesh.env["AUDIOMESH_STORE_URL"].removeprefix("file://"))
    song = write_song(tmp_path / "s.wav", 1.0).read_bytes()
    try:
        async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            # 1. All at once: every job finishes, none lost, manifests consistent.
            jobs = await asyncio.gather(*(upload(stub, song, f"s{i}.wav") for i in range(JOBS)))
            ids = [r.job.job_id for r in jobs]
            assert len(set(ids)) == JOBS
            finals = await asyncio.gather(*(wait_for(stub, i, timeout=600) for i in ids))
            assert all(job.state == common_pb2.JOB_STATE_SUCCEEDED for job, _ in finals)
            listed = await stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=200))
            assert set(ids) <= {j.job_id for j in listed.jobs}
            for job, _ in finals:
                doc = json.loads((root / job.manifest_key).read_bytes())
                jsonschema.validate(doc, manifest.schema())
                assert doc["job"]["state"] == "JOB_STATE_SUCCEEDED" and len(doc["job"]["tracks"]) == 9
                assert all((root / t["key"]).is_file() for t in doc["job"]["tracks"])

            # 2. Again, cancelling every other job while they run or wait.
            slow = orchestrator_pb2.JobOptions()
            slow.separation.shifts = 2
            jobs = await asyncio.gather(*(upload(stub, song, f"c{i}.wav", slow) for i in range(JOBS)))
            ids = [r.job.job_id for r in jobs]
            cancel, keep = ids[::2], ids[1::2]
            await asyncio.sleep(1.0)
            await asyncio.gather(*(stub.CancelJob(orchestrator_pb2.CancelJobRequest(job_id=i)) for i in cancel))
            results = dict(zip(ids, await asyncio.gather(*(wait_for(stub, i, timeout=600) for i in ids)), strict=True))
        for job_id in cancel:
            job, _ = results[job_id]
            # Cancelled, unless it had already finished before the cancel arrived.
            assert job.state in (common_pb2.JOB_STATE_CANCELLED, common_pb2.JOB_STATE_SUCCEEDED)
            doc = json.loads((root / job.manifest_key).read_bytes())
            assert doc["job"]["state"] == common_pb2.JobState.Name(job.state)
        assert sum(results[i][0].state == common_pb2.JOB_STATE_CANCELLED for i in cancel) >= JOBS // 4
        assert all(results[i][0].state == common_pb2.JOB_STATE_SUCCEEDED for i in keep)
    finally:
        await asyncio.to_thread(mesh.stop)
