"""One worker service in the test process, on a real port (0): a running server, a channel to it,
and its file store; fixtures for each worker with default settings."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import soundfile as sf

from audiomesh.config import load_settings
from audiomesh.rpc.server import ServiceSpec, start_server
from audiomesh.services.composite.server import build as build_composite
from audiomesh.services.hpss.server import build as build_hpss
from audiomesh.services.normalize.server import build as build_normalize
from audiomesh.services.separation.server import build as build_separation
from audiomesh.v1 import common_pb2
from tests.helpers.models import make_tiny_repo

F32 = common_pb2.AUDIO_ENCODING_WAV_FLOAT32


@dataclass
class Worker:
    channel: grpc.aio.Channel
    address: str
    root: Path  # the file store's folder
    full_name: str  # the gRPC service
    servicer: Any

    def put(self, key: str, y: np.ndarray, rate: int = 44100) -> str:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, y.T, rate, subtype="FLOAT")
        return key

    def get(self, key: str) -> np.ndarray:
        y, _ = sf.read(self.root / key, dtype="float32", always_2d=True)
        return y.T


@contextlib.asynccontextmanager
async def running_worker(build: Callable[..., ServiceSpec], tmp_path: Path, **overrides) -> AsyncIterator[Worker]:
    """``build(settings)`` served until the block ends (a file store under ``tmp_path``)."""
    root = tmp_path / "store"
    settings = load_settings(**{"store_url": f"file://{root}", "default_model": "demucs_unittest", **overrides})
    spec = build(settings)
    server = await start_server(
        spec.registrations,
        service=build.__module__.split(".")[-2],  # audiomesh.services.<name>.server: labels its metrics
        warmup=spec.warmup,
        concurrency=spec.concurrency,
        light_methods=spec.light_methods,
    )
    try:
        await asyncio.wait_for(server.ready.wait(), 120)
        async with grpc.aio.insecure_channel(server.address) as channel:
            registration = spec.registrations[0]
            yield Worker(channel, server.address, root, registration.full_name, registration.servicer)
    finally:
        if spec.on_stop is not None:
            await spec.on_stop()
        await server.stop(1)


@pytest.fixture
async def separation(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    make_tiny_repo(repo, "tiny_ht")
    async with running_worker(build_separation, tmp_path, model_repo=str(repo), worker_concurrency=1) as w:
        yield w


@pytest.fixture
async def hpss(tmp_path):
    async with running_worker(build_hpss, tmp_path) as w:
        yield w


@pytest.fixture
async def composite(tmp_path):
    async with running_worker(build_composite, tmp_path) as w:
        yield w


@pytest.fixture
async def normalize(tmp_path):
    async with running_worker(build_normalize, tmp_path) as w:
        yield w
