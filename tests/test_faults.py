"""Faults with real processes: a worker killed mid-stage, a worker gone past the retry budget
(then RetryJob), the S3 server stopped and restarted mid-job, a full file store."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid

import grpc
import pytest

from audiomesh import manifest
from audiomesh.store.file import LOCK_NAME
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.mesh import SUCCEEDED, start_mesh, upload, wait_for, write_song
from tests.test_recovery import SLOW, wait_until_running


@pytest.fixture
def mesh(tmp_path):
    (tmp_path / "tmp").mkdir()  # the services' temp folder, to see what they leave there
    mesh = start_mesh(tmp_path, AUDIOMESH_UNAVAILABLE_BUDGET_SECONDS="60", TMPDIR=str(tmp_path / "tmp"))
    try:
        yield mesh
    finally:
        mesh.stop()


async def test_worker_killed_mid_stage_is_retried_on_its_restart(mesh, tmp_path):
    scratch_root = tmp_path / "tmp" / "audiomesh-scratch"
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        job = (await upload(stub, write_song(tmp_path / "s.wav", 8.0).read_bytes(), "s.wav", SLOW)).job
        await wait_until_running(stub, job.job_id, "separation")
        killed = scratch_root / str(mesh.procs["separation"].pid)
        assert any(killed.rglob("*")), "separation works in its scratch folder"
        mesh.kill("separation")  # SIGKILL mid-separation: its request's scratch stays behind...
        assert any(killed.rglob("*"))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(mesh.restart, "separation")
        assert not killed.exists()  # ...until a service starts and sweeps it
        final, _ = await wait_for(stub, job.job_id, timeout=300)
    assert final.state == SUCCEEDED, final.error
    separation = next(n for n in final.nodes if n.name == "separation")
    assert separation.attempts >= 2
    await asyncio.to_thread(mesh.stop)
    assert list(scratch_root.iterdir()) == []  # each service removes its own on a clean stop
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == ["audiomesh-scratch"]


async def test_worker_gone_past_the_budget_fails_clearly_then_retry_resumes(tmp_path):
    mesh = start_mesh(tmp_path, AUDIOMESH_UNAVAILABLE_BUDGET_SECONDS="2")
    try:
        async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            mesh.kill("hpss")
            job = (await upload(stub, write_song(tmp_path / "s.wav", 2.0).read_bytes(), "s.wav")).job
            failed, _ = await wait_for(stub, job.job_id, timeout=120)
            assert failed.state == common_pb2.JOB_STATE_FAILED
            assert failed.error.code == "UNAVAILABLE" and failed.error.node.startswith("hpss")
            assert "hpss" in failed.error.message or "unavailable" in failed.error.message.lower()
            separation = next(n for n in failed.nodes if n.name == "separation")
            await asyncio.to_thread(mesh.restart, "hpss")
            retried = await stub.RetryJob(orchestrator_pb2.RetryJobRequest(job_id=job.job_id))
            assert retried.job.state == common_pb2.JOB_STATE_QUEUED
            final, _ = await wait_for(stub, job.job_id, timeout=120)
        assert final.state == SUCCEEDED, final.error
        again = next(n for n in final.nodes if n.name == "separation")
        if separation.state == common_pb2.NODE_STATE_SUCCEEDED:
            assert again.attempts == separation.attempts  # reused, not run again
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
                await orchestrator_pb2_grpc.OrchestratorServiceStub(channel).RetryJob(
                    orchestrator_pb2.RetryJobRequest(job_id=job.job_id)
                )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        mesh.stop()


async def test_s3_server_stopped_and_restarted_mid_job(s3_server, tmp_path):
    """The session's moto server is restarted on the same port while a job runs (moto keeps
    its objects in this process, so they survive the restart like a real store's would)."""
    from tests.helpers import s3 as s3_helper

    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    mesh = start_mesh(
        tmp_path,
        AUDIOMESH_STORE_URL=f"s3://{bucket}",
        AUDIOMESH_S3_ENDPOINT=s3_server,
        AUDIOMESH_S3_ACCESS_KEY=s3_helper.ACCESS_KEY,
        AUDIOMESH_S3_SECRET_KEY=s3_helper.SECRET_KEY,
        AUDIOMESH_S3_REGION=s3_helper.REGION,
        AUDIOMESH_UNAVAILABLE_BUDGET_SECONDS="90",
    )
    try:
        async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            job = (await upload(stub, write_song(tmp_path / "s.wav", 8.0).read_bytes(), "s.wav", SLOW)).job
            await wait_until_running(stub, job.job_id, "separation")
            await asyncio.to_thread(s3_helper.restart_server, downtime=4.0)
            final, _ = await wait_for(stub, job.job_id, timeout=300)
        assert final.state == SUCCEEDED, final.error
        doc = json.loads(
            s3_helper.boto3_client(s3_server).get_object(Bucket=bucket, Key=final.manifest_key)["Body"].read()
        )
        manifest.validate(doc)
        assert doc["job"]["state"] == "JOB_STATE_SUCCEEDED"
    finally:
        mesh.stop()


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the disk-full test: {done.stderr.decode()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_full_file_store_fails_clearly_and_keeps_the_manifest_whole(small_disk, tmp_path):
    mesh = start_mesh(tmp_path, AUDIOMESH_STORE_URL=f"file://{small_disk}", AUDIOMESH_NODE_ATTEMPTS="1")
    try:
        async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            # 1.6 MB of input fits; its float intermediates and stems do not.
            job = (await upload(stub, write_song(tmp_path / "s.wav", 9.0).read_bytes(), "s.wav")).job
            final, _ = await wait_for(stub, job.job_id, timeout=120)
        assert final.state == common_pb2.JOB_STATE_FAILED
        assert "full" in final.error.message and final.error.code == "RESOURCE_EXHAUSTED"
        doc = json.loads((small_disk / final.manifest_key).read_bytes())  # parses: not corrupt
        manifest.validate(doc)
        # No temp files left (the file store's lock file for conditional writes is not one: it stays).
        assert not [p for p in small_disk.rglob("*") if p.name.startswith(".amtmp-") and p.name != LOCK_NAME]
    finally:
        mesh.stop()


async def test_orchestrator_restarted_before_its_workers_waits_for_them(mesh, tmp_path):
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        job = (await upload(stub, write_song(tmp_path / "s.wav", 8.0).read_bytes(), "s.wav", SLOW)).job
        await wait_until_running(stub, job.job_id, "separation")
    mesh.kill("orchestrator")
    mesh.kill("separation")
    await asyncio.to_thread(mesh.restart, "orchestrator")  # resumes the job; separation is still down
    await asyncio.sleep(3.0)
    await asyncio.to_thread(mesh.restart, "separation")
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        final, _ = await wait_for(stub, job.job_id, timeout=300)
    assert final.state == SUCCEEDED, final.error
