"""Settings: defaults for a laptop, environment over .env, errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from audiomesh.config import load_settings
from audiomesh.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(__import__("os").environ):
        if name.startswith("AUDIOMESH_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_suit_one_laptop(tmp_path):
    s = load_settings()
    assert s.store_url == (tmp_path / "data").resolve().as_uri()
    assert s.orchestrator_addr == "127.0.0.1:50051"
    assert s.max_upload_bytes == 500 * 1024 * 1024
    assert (s.target_db, s.true_peak_ceiling_db, s.gain_linking) == (-14.0, -1.0, "linked")


def test_environment_wins_over_dotenv(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("AUDIOMESH_TARGET_DB=-16\nAUDIOMESH_DEFAULT_MODEL=from_dotenv\n")
    monkeypatch.setenv("AUDIOMESH_TARGET_DB", "-18")
    s = load_settings()
    assert s.target_db == -18.0
    assert s.default_model == "from_dotenv"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AUDIOMESH_TARGET_DB", "loud"),
        ("AUDIOMESH_TARGET_DB", "3"),
        ("AUDIOMESH_DEVICE", "tpu"),
        ("AUDIOMESH_STORE_URL", "ftp://x"),
        ("AUDIOMESH_HPSS_ADDR", "nohostport"),
        ("AUDIOMESH_MAX_UPLOAD_BYTES", "0"),
        ("AUDIOMESH_LOG_FORMAT", "xml"),
        ("AUDIOMESH_API_KEYS", "alice=plaintext-key"),
    ],
)
def test_invalid_value_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_lists_and_secrets(monkeypatch):
    from audiomesh.auth import hash_key

    monkeypatch.setenv("AUDIOMESH_API_KEYS", f"alice=sha256:{hash_key('k1')}, sha256:{hash_key('k2')}")
    monkeypatch.setenv("AUDIOMESH_CORS_ORIGINS", "http://a.example,http://b.example")
    monkeypatch.setenv("AUDIOMESH_S3_SECRET_KEY", "hunter2")
    s = load_settings()
    assert s.key_ring().principal("Bearer k1") == "alice"
    assert s.key_ring().principal("Bearer k2").startswith("key-")
    assert s.cors_origins == ["http://a.example", "http://b.example"]
    public = s.public_dict()
    assert "hunter2" not in str(public) and hash_key("k1") not in str(public)
    assert public["api_keys_configured"] == 2


@pytest.mark.parametrize("name", [".", "..", "-x", "a/b", "x" * 65])
def test_principal_names_that_cannot_be_a_key_segment_are_refused(monkeypatch, name):
    """A principal names a folder of the store (uploads/<principal>/…): "." or ".." would escape it."""
    from audiomesh.auth import hash_key

    monkeypatch.setenv("AUDIOMESH_API_KEYS", f"{name}=sha256:{hash_key('k1')}")
    with pytest.raises(ConfigError, match="AUDIOMESH_API_KEYS"):
        load_settings().key_ring()


def test_invalid_settings_stop_a_service_at_start(monkeypatch):
    """`audiomesh serve` exits with a message naming the variable (no traceback)."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "AUDIOMESH_WORKER_CONCURRENCY": "none"}
    done = subprocess.run(
        [sys.executable, "-m", "audiomesh.cli", "serve", "composite", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "AUDIOMESH_WORKER_CONCURRENCY" in done.stderr and "Traceback" not in done.stderr
    assert Path.cwd().exists()


async def test_page_size_has_one_range_read_by_the_orchestrator_and_the_openapi_document(tmp_path):
    """ListJobs' page size lives in audiomesh.ranges only: the orchestrator refuses what the
    OpenAPI schema excludes, with the rule in the message, and accepts its bounds."""
    import asyncio

    import grpc

    from audiomesh.gateway.app import ORCHESTRATOR
    from audiomesh.gateway.openapi import openapi_document
    from audiomesh.gateway.routes import http_routes
    from audiomesh.ranges import PAGE_SIZE
    from audiomesh.rpc.server import start_server
    from audiomesh.services.orchestrator.server import build
    from audiomesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    schemas = openapi_document(http_routes(ORCHESTRATOR))["components"]["schemas"]
    page_size = schemas["audiomesh.v1.ListJobsRequest"]["properties"]["pageSize"]
    assert page_size == page_size | PAGE_SIZE.schema()  # the range's keywords, description included
    spec = build(load_settings(store_url=f"file://{tmp_path / 'store'}"))
    server = await start_server(spec.registrations, service="orchestrator", warmup=spec.warmup)
    try:
        await asyncio.wait_for(server.ready.wait(), 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            for size in (0, 1, int(PAGE_SIZE.maximum)):
                await stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=size))
            for size in (-1, int(PAGE_SIZE.maximum) + 1):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=size))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details() == f"page_size must be {PAGE_SIZE.describe()}, got {size}"
    finally:
        await spec.on_stop()
        await server.stop(1)
