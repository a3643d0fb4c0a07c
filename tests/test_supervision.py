"""Mesh.supervise (what `audiomesh up` runs): a dead child comes back on its port, jobs go on,
and a crash loop stops the mesh naming the child and why."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from audiomesh.launcher import CrashLoop, Mesh
from audiomesh.v1 import orchestrator_pb2_grpc
from tests.helpers.mesh import SUCCEEDED, start_mesh, upload, wait_for, write_song


class Supervisor:
    def __init__(self, mesh: Mesh) -> None:
        self.stop = threading.Event()
        self.failure: BaseException | None = None
        # Short backoffs and a low crash limit keep the test quick; `up` uses 1 s … 30 s and 5.
        self.thread = threading.Thread(target=self._run, args=(mesh,), daemon=True)
        self.thread.start()

    def _run(self, mesh: Mesh) -> None:
        try:
            mesh.supervise(self.stop, backoff=0.5, max_backoff=2.0, crash_limit=3, crash_window=120.0)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.failure = exc


@pytest.fixture(scope="module")
def supervised(tmp_path_factory) -> Iterator[tuple[Mesh, Supervisor]]:
    mesh = start_mesh(tmp_path_factory.mktemp("supervised"))
    supervisor = Supervisor(mesh)
    try:
        yield mesh, supervisor
    finally:
        supervisor.stop.set()
        supervisor.thread.join(timeout=30)
        mesh.stop()


async def serving(address: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.3)
    return False


async def test_a_killed_worker_comes_back_on_its_port_and_the_job_succeeds(supervised, tmp_path):
    mesh, supervisor = supervised
    address = mesh.addresses["separation"]
    old_pid = mesh.procs["separation"].pid
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        song = write_song(tmp_path / "s.wav", 2.0)
        job = (await upload(stub, song.read_bytes(), "s.wav")).job
        # kill -9 while the job is in flight: its separation call fails UNAVAILABLE and the
        # orchestrator retries it until the worker is back.
        mesh.kill("separation")
        assert await serving(address, 120), "separation did not come back"
        assert mesh.addresses["separation"] == address and mesh.procs["separation"].pid != old_pid
        job, _ = await wait_for(stub, job.job_id)
    assert job.state == SUCCEEDED, job.error
    assert {r["service"] for r in mesh.restarts} == {"separation"}
    assert mesh.restarts[0]["exit_code"] == -9
    # A restart may find its port briefly taken (CI saw an outgoing connection of another test
    # get it as its source port) and exit 1; the supervisor then starts it again on that port.
    assert all(r["exit_code"] == 1 for r in mesh.restarts[1:]), mesh.restarts
    assert supervisor.failure is None and supervisor.thread.is_alive()


def test_a_crash_loop_stops_the_mesh_and_names_the_child(supervised):
    mesh, supervisor = supervised
    # From now on normalize cannot start: a bad value it reads at start.
    mesh.envs["normalize"] = {**mesh.envs["normalize"], "AUDIOMESH_MAX_UPLOAD_BYTES": "lots"}
    mesh.kill("normalize")
    supervisor.thread.join(timeout=90)
    assert not supervisor.thread.is_alive(), "supervision did not give up"
    assert isinstance(supervisor.failure, CrashLoop), supervisor.failure
    message = str(supervisor.failure)
    assert "normalize crashed 3 times" in message and "exit code 2" in message
    assert "AUDIOMESH_MAX_UPLOAD_BYTES" in message  # the tail of its log says why
    assert all(proc.poll() is not None for proc in mesh.procs.values())  # the mesh is stopped
