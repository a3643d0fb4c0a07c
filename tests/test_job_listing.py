"""ListJobs pages by cursor and WatchJob sends only changes a watcher can see (#14.10, #14.11)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from audiomesh import manifest
from audiomesh.config import load_settings
from audiomesh.rpc.server import start_server
from audiomesh.services.orchestrator.server import build
from audiomesh.store import ObjectStore
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.mesh import upload, wait_for, write_song

BASE = datetime(2026, 1, 1, tzinfo=UTC)


def write_job(store: ObjectStore, created: datetime, job_id: str | None = None) -> str:
    """A finished job's manifest, as an earlier orchestrator would have left it."""
    job_id = job_id or str(uuid.uuid4())
    job = orchestrator_pb2.Job(
        job_id=job_id, state=common_pb2.JOB_STATE_SUCCEEDED, manifest_key=f"jobs/{job_id}/manifest.json"
    )
    job.create_time.FromDatetime(created)
    job.update_time.FromDatetime(created)
    job.input.name = "x.wav"
    doc = orchestrator_pb2.Manifest(schema_version=manifest.SCHEMA_VERSION, job=job)
    store.put_bytes(job.manifest_key, manifest.dumps(doc))
    return job_id


def settings_beside(file_mesh, store_dir):
    """The mesh's settings (its workers) with an own, empty file store."""
    env = {k.removeprefix("AUDIOMESH_").lower(): v for k, v in file_mesh.env.items() if k.startswith("AUDIOMESH_")}
    return load_settings(**{**env, "store_url": f"file://{store_dir}"})


async def serve(settings):
    """An orchestrator in this process, once SERVING."""
    spec = build(settings)
    server = await start_server(spec.registrations, service="orchestrator", warmup=spec.warmup)
    await asyncio.wait_for(server.ready.wait(), 30)
    return spec, server


async def test_list_pages_do_not_shift_when_jobs_are_created_between_calls(file_mesh, tmp_path):
    settings = settings_beside(file_mesh, tmp_path / "store")
    store = settings.open_store()
    # Seven older jobs; two share a create time, so the job id must break the tie.
    tied = sorted(str(uuid.uuid4()) for _ in range(2))
    seeded = [write_job(store, BASE + timedelta(minutes=i)) for i in range(5)]
    seeded += [write_job(store, BASE + timedelta(minutes=9), job_id) for job_id in tied]
    spec, server = await serve(settings)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            first = await stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=2))
            assert [j.job_id for j in first.jobs] == [tied[1], tied[0]]
            # Two new jobs, newer than everything listed so far (real uploads).
            song = write_song(tmp_path / "s.wav", 1.0).read_bytes()
            new = [(await upload(stub, song, f"new{i}.wav")).job.job_id for i in range(2)]
            listed = [j.job_id for j in first.jobs]
            token = first.next_page_token
            for _ in range(10):  # bounded: 7 jobs in pages of 2 or 3
                page = await stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=3, page_token=token))
                listed += [j.job_id for j in page.jobs]
                token = page.next_page_token
                if not token:
                    break
            expected = [*tied[::-1], *seeded[4::-1]]
            assert listed == expected  # no duplicates, nothing skipped, newest first
            assert not set(new) & set(listed)
            # A fresh listing starts with the new jobs.
            fresh = await stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=2))
            assert {j.job_id for j in fresh.jobs} == set(new)
    finally:
        await spec.on_stop()
        await server.stop(1)


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        base64.urlsafe_b64encode(b"o:2").decode(),  # an old offset token
        base64.urlsafe_b64encode(b'{"v":1,"t":-1,"id":"00000000-0000-4000-8000-000000000000"}').decode(),
        base64.urlsafe_b64encode(b'{"v":1,"t":5,"id":"../x"}').decode(),
        base64.urlsafe_b64encode(b"[1,2]").decode(),
    ],
)
async def test_a_token_that_is_not_a_cursor_is_invalid_argument(orchestrator, token):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await orchestrator.ListJobs(orchestrator_pb2.ListJobsRequest(page_token=token))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in err.value.details()


async def test_watch_sends_only_visible_changes_and_running_always_names_a_stage(orchestrator, tmp_path):
    song = write_song(tmp_path / "w.wav", 2.0).read_bytes()
    job = (await upload(orchestrator, song, "w.wav")).job
    final, seen = await wait_for(orchestrator, job.job_id, timeout=120)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    running = [m for m in seen if m.state == common_pb2.JOB_STATE_RUNNING]
    assert running, "no RUNNING message was sent"
    assert all(m.current_stage for m in running), [m.current_stage for m in running]
    visible = [_without_update_time(m) for m in seen]
    repeats = [i for i in range(1, len(visible)) if visible[i] == visible[i - 1]]
    assert not repeats, f"messages {repeats} repeat the one before apart from update_time"


def _without_update_time(job: orchestrator_pb2.Job) -> orchestrator_pb2.Job:
    out = orchestrator_pb2.Job()
    out.CopyFrom(job)
    out.ClearField("update_time")
    return out
