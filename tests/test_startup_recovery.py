"""An orchestrator recovers its jobs before it serves them (#14.13): it retries a store that
does not answer at start, stays NOT_SERVING until every manifest is loaded, and answers job
RPCs UNAVAILABLE (not NOT_FOUND) until then."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moto.server import ThreadedMotoServer

from audiomesh.config import load_settings
from audiomesh.rpc.server import start_server
from audiomesh.services.orchestrator.server import build
from audiomesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.s3 import ACCESS_KEY, REGION, SECRET_KEY, closed_port, open_test_store
from tests.test_job_listing import write_job

NOW = datetime.now(UTC)


async def health_status(channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return reply.status


async def assert_loading(stub, job_id: str) -> None:
    """Job RPCs answer UNAVAILABLE (retry) while the store does not: ListJobs says the registry is
    loading; a job asked for by id is read from the store on demand, so the message names the store."""
    calls = {
        "GetJob": stub.GetJob(orchestrator_pb2.GetJobRequest(job_id=job_id), timeout=10),
        "ListJobs": stub.ListJobs(orchestrator_pb2.ListJobsRequest(), timeout=10),
        "CancelJob": stub.CancelJob(orchestrator_pb2.CancelJobRequest(job_id=job_id), timeout=10),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (name, err.value)
        expected = "loading jobs from the store" if name == "ListJobs" else "cannot reach S3 endpoint"
        assert expected in err.value.details(), name


async def list_when_loaded(stub, wait: float = 10.0) -> orchestrator_pb2.ListJobsResponse:
    """ListJobs, retried while it says the manifests are still loading (bounded)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return await stub.ListJobs(orchestrator_pb2.ListJobsRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
            await asyncio.sleep(0.1)


async def test_store_down_at_start_is_retried_until_it_answers(s3_server, tmp_path):
    seeding = open_test_store(s3_server)  # the session's moto server; a second one shares its data
    jobs = [write_job(seeding, NOW - timedelta(minutes=i)) for i in range(3)]
    port = closed_port()  # the orchestrator's store: nothing listens here yet
    settings = load_settings(
        store_url=f"s3://{seeding.bucket}",
        s3_endpoint=f"127.0.0.1:{port}",
        s3_access_key=ACCESS_KEY,
        s3_secret_key=SECRET_KEY,
        s3_region=REGION,
        retention_hours=0,
    )
    spec = build(settings)  # does not contact the store
    server = await start_server(spec.registrations, service="orchestrator", warmup=spec.warmup)
    s3 = None
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            await asyncio.sleep(1.5)  # a failed attempt (a refused connection, retried by urllib3) and a wait
            assert not server.ready.is_set()
            assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            await assert_loading(stub, jobs[0])
            s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            s3.start()
            started = time.monotonic()
            await asyncio.wait_for(server.ready.wait(), 15)  # next attempt within 2 s (+ urllib3's retries)
            assert time.monotonic() - started < 15
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            listed = await list_when_loaded(stub)
            assert [j.job_id for j in listed.jobs] == jobs
            got = await stub.GetJob(orchestrator_pb2.GetJobRequest(job_id=jobs[1]))
            assert got.job.job_id == jobs[1]
    finally:
        await spec.on_stop()
        await server.stop(1)
        if s3 is not None:
            s3.stop()
        seeding.close()


class GatedStore:
    """A wrapper (in-process, to make loading slow deterministically): the file store, except
    that reading a second manifest waits until the test opens the gate."""

    def __init__(self, store) -> None:
        self._store = store
        self.reads = 0
        self.waiting = threading.Event()
        self.gate = threading.Event()

    def read(self, key: str):
        self.reads += 1
        if key.endswith("/manifest.json") and self.reads == 2:
            self.waiting.set()
            assert self.gate.wait(20), "the test never opened the gate"
        return self._store.read(key)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


async def test_serving_before_every_manifest_is_loaded(tmp_path):
    """Readiness does not wait for thousands of manifests: SERVING once the store answers; ListJobs
    says "loading, retry" until every manifest was read, while a job asked for by id is read on demand."""
    settings = load_settings(store_url=f"file://{tmp_path / 'store'}", retention_hours=0)
    real = settings.open_store()
    jobs = [write_job(real, NOW - timedelta(minutes=i)) for i in range(2)]
    store = GatedStore(real)
    spec = build(settings, store=store)
    server = await start_server(spec.registrations, service="orchestrator", warmup=spec.warmup)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            assert await asyncio.to_thread(store.waiting.wait, 10), "loading never reached the second manifest"
            await asyncio.wait_for(server.ready.wait(), 10)
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListJobs(orchestrator_pb2.ListJobsRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading jobs from the store" in err.value.details()
            for job_id in jobs:  # one manifest read, one pending: both are found by id
                got = await stub.GetJob(orchestrator_pb2.GetJobRequest(job_id=job_id), timeout=5)
                assert got.job.job_id == job_id
            store.gate.set()
            listed = await list_when_loaded(stub)
            assert [j.job_id for j in listed.jobs] == jobs
    finally:
        store.gate.set()
        await spec.on_stop()
        await server.stop(1)
