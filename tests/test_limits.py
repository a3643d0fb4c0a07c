"""Limits: requests per key, jobs per principal, the queue bound — RESOURCE_EXHAUSTED / 429
with a retry hint (google.rpc.RetryInfo, HTTP Retry-After)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpc
import httpx
import pytest

from audiomesh.config import load_settings
from audiomesh.gateway.app import create_app
from audiomesh.launcher import auth_policy
from audiomesh.rpc.client import rich_status
from audiomesh.rpc.server import start_server
from audiomesh.services.orchestrator.server import build
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.mesh import upload, write_song


@contextlib.asynccontextmanager
async def orchestrator(file_mesh, tmp_path, **overrides):
    """An orchestrator in this process, with its own store, using the shared mesh's workers."""
    env = {k.removeprefix("AUDIOMESH_").lower(): v for k, v in file_mesh.env.items() if k.startswith("AUDIOMESH_")}
    env.update(store_url=f"file://{tmp_path / 'store'}", **overrides)
    settings = load_settings(**env)
    spec = build(settings)
    server = await start_server(
        spec.registrations, service="orchestrator", warmup=spec.warmup, auth=auth_policy(settings, "orchestrator")
    )
    try:
        await asyncio.wait_for(server.ready.wait(), 30)
        yield server, settings
    finally:
        await spec.on_stop()
        await server.stop(1)


def retry_delay(exc: grpc.aio.AioRpcError) -> float:
    from google.rpc import error_details_pb2

    for detail in rich_status(exc).details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToMilliseconds() / 1000
    raise AssertionError("no RetryInfo detail")


async def test_rate_limit_per_key(file_mesh, tmp_path):
    async with orchestrator(file_mesh, tmp_path, rate_limit_per_minute=3) as (server, settings):
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            for _ in range(3):
                await stub.GetConfig(orchestrator_pb2.GetConfigRequest())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetConfig(orchestrator_pb2.GetConfigRequest())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "rate limit" in err.value.details()
            assert 0 < retry_delay(err.value) <= 20
        # The HTTP facade turns the hint into Retry-After.
        app = create_app(settings.model_copy(update={"orchestrator_addr": server.address}))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            resp = await http.get("/v1/config")
            assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 1
            assert resp.json()["code"] == 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_jobs_per_principal_and_queue_bound(file_mesh, tmp_path):
    """Jobs that stay active however loaded the machine is: the separation address has nothing
    behind it, so every job waits QUEUED for a worker (within a budget far past the test). A
    job that ran would fail here at once — this orchestrator's store is not its workers' — and
    free its slot before the next upload (CI once saw exactly that)."""
    song = write_song(tmp_path / "s.wav", 1.0).read_bytes()
    nowhere = {"separation_addr": f"127.0.0.1:{_free_port()}", "unavailable_budget_seconds": 600}
    async with orchestrator(
        file_mesh, tmp_path, max_active_jobs_per_principal=2, max_running_jobs=1, rate_limit_per_minute=0, **nowhere
    ) as (server, _):
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            first = (await upload(stub, song, "a.wav")).job
            await upload(stub, song, "b.wav")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await upload(stub, song, "c.wav")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit 2" in err.value.details() and retry_delay(err.value) > 0
            await stub.CancelJob(orchestrator_pb2.CancelJobRequest(job_id=first.job_id))
            await upload(stub, song, "d.wav")  # a slot is free again
    async with orchestrator(
        file_mesh, tmp_path / "q", max_queued_jobs=2, max_running_jobs=1, rate_limit_per_minute=0, **nowhere
    ) as (server, _):
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            first = (await upload(stub, song, "a.wav")).job  # holds the one runner slot, waiting for a worker
            await upload(stub, song, "b.wav")  # waits for the slot
            jobs = (await stub.ListJobs(orchestrator_pb2.ListJobsRequest())).jobs
            assert len(jobs) == 2
            for job in jobs:
                assert job.state == common_pb2.JOB_STATE_QUEUED, job
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await upload(stub, song, "c.wav")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()
            assert retry_delay(err.value) > 0
            await stub.CancelJob(orchestrator_pb2.CancelJobRequest(job_id=first.job_id))
            await upload(stub, song, "c.wav")  # room in the queue again
