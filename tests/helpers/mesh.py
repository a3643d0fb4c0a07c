"""The whole mesh as real processes on 127.0.0.1 (port 0), for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf

from audiomesh.demo import synth_song
from audiomesh.launcher import Mesh
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

# Small and quick: demucs_unittest is a tiny built-in Demucs (random weights) that runs
# the real apply_model path; one thread per worker keeps 2-core CI machines responsive.
BASE_ENV = {
    "AUDIOMESH_DEFAULT_MODEL": "demucs_unittest",
    "AUDIOMESH_LOG_FORMAT": "json",
    "AUDIOMESH_LOG_LEVEL": "info",
    "AUDIOMESH_TORCH_THREADS": "1",
    "AUDIOMESH_RETENTION_HOURS": "0",
    # Short leases: a killed orchestrator's jobs are taken over within seconds.
    "AUDIOMESH_LEASE_TTL_SECONDS": "6",
    "HF_HUB_OFFLINE": "1",
}


def start_mesh(tmp: Path, *, gateway: bool = False, **env: str) -> Mesh:
    data = tmp / "data"
    settings_env = {**BASE_ENV, "AUDIOMESH_STORE_URL": f"file://{data}", **env}
    return Mesh(env=settings_env, log_dir=tmp / "logs", gateway=gateway).start(timeout=240)


@pytest.fixture(scope="session")
def file_mesh(tmp_path_factory, otlp_collector) -> Iterator[Mesh]:
    """The shared mesh; its services export spans to the session's OTLP collector."""
    _, endpoint = otlp_collector
    mesh = start_mesh(
        tmp_path_factory.mktemp("mesh"),
        gateway=True,
        AUDIOMESH_OTLP_ENDPOINT=endpoint,
        OTEL_BSP_SCHEDULE_DELAY="200",
        AUDIOMESH_MAX_UPLOAD_BYTES=str(8 * 1024 * 1024),
    )
    try:
        yield mesh
    finally:
        mesh.stop()


def stored_files(mesh: Mesh) -> set[Path]:
    """Every file in a file-backed mesh's store. os.walk, not rglob: other tests' job folders
    may vanish mid-walk (DeleteJob, retention), and a vanished folder is simply not listed."""
    root = mesh.env["AUDIOMESH_STORE_URL"].removeprefix("file://")
    return {Path(folder, name) for folder, _, names in os.walk(root) for name in names}


def new_stored_files(mesh: Mesh, before: set[Path]) -> set[Path]:
    """Files written since `before` was listed: a refused request must leave none. Files that
    went away meanwhile are other tests' jobs being deleted, not this request's doing."""
    return stored_files(mesh) - before


@pytest.fixture(scope="session")
def gateway_url(file_mesh: Mesh) -> str:
    """The HTTP facade in front of the shared mesh (a real uvicorn process)."""
    return file_mesh.url


@pytest.fixture
async def orchestrator(file_mesh: Mesh) -> AsyncIterator[orchestrator_pb2_grpc.OrchestratorServiceStub]:
    async with grpc.aio.insecure_channel(file_mesh.orchestrator) as channel:
        yield orchestrator_pb2_grpc.OrchestratorServiceStub(channel)


def write_song(path: Path, seconds: float = 6.0, *, rate: int = 44100, seed: int = 0) -> Path:
    y = synth_song(seconds, rate, seed=seed)
    sf.write(path, y.T, rate, subtype="PCM_16")
    return path


async def upload(stub, data: bytes, filename: str, options=None, *, chunk: int = 256 * 1024):
    async def messages():
        yield orchestrator_pb2.UploadAudioRequest(
            metadata=orchestrator_pb2.UploadMetadata(
                filename=filename, options=options or orchestrator_pb2.JobOptions(), create_job=True
            )
        )
        for start in range(0, len(data), chunk):
            yield orchestrator_pb2.UploadAudioRequest(chunk=data[start : start + chunk])

    return await stub.UploadAudio(messages())


async def wait_for(stub, job_id: str, *, timeout: float = 240.0) -> tuple[orchestrator_pb2.Job, list]:
    """Follow WatchJob to the end; return the final job and every snapshot seen."""
    seen = []

    async def follow():
        async for msg in stub.WatchJob(orchestrator_pb2.WatchJobRequest(job_id=job_id)):
            seen.append(msg.job)
        return seen[-1]

    job = await asyncio.wait_for(follow(), timeout)
    return job, seen


async def until_job(
    stub, job_id: str, test: Callable[[orchestrator_pb2.Job], bool], wait: float, what: str
) -> orchestrator_pb2.Job:
    """Poll GetJob every 0.1 s until ``test(job)`` holds; AssertionError "``what`` within ``wait`` s"."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        job = (await stub.GetJob(orchestrator_pb2.GetJobRequest(job_id=job_id))).job
        if test(job):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} within {wait} s")


def read(path: Path) -> np.ndarray:
    y, _ = sf.read(path, dtype="float32", always_2d=True)
    return y.T


SUCCEEDED = common_pb2.JOB_STATE_SUCCEEDED
