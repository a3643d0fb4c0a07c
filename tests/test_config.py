"""Settings: defaults for a laptop, environment over .env, errors that name the variable; the
launcher reads them once and derives each child's settings from them."""

from __future__ import annotations

import contextlib
import ctypes.util
import json
import os
from pathlib import Path

import pytest

from audiomesh.config import load_settings
from audiomesh.errors import ConfigError
from audiomesh.memory import mimalloc_library
from audiomesh.parallel import usable_cores


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
        ("AUDIOMESH_COMPILE_NICE", "20"),
        ("AUDIOMESH_COMPILE_NICE", "-5"),
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


def _child(name: str, env: dict[str, str] | None = None, *, cores: int = 8):
    """What the launcher starts worker ``name`` with, and the settings that worker reads from it
    (same folder, so the same ``.env``)."""
    from audiomesh.launcher import thread_env

    started = thread_env(name, load_settings(environ=env or {}), env or {}, cores=cores)
    return started, load_settings(environ=started)


def test_thread_budget_fills_in_only_what_no_source_set(tmp_path):
    """The launcher derives each worker's thread settings from Settings: the budget where the user
    set nothing, and a value from ``.env`` or the environment otherwise (it used to read only the
    environment, so ``.env`` lost to the budget)."""
    env, hpss = _child("hpss")
    assert (hpss.hpss_threads, hpss.worker_concurrency, env["OMP_NUM_THREADS"]) == (1, 16, "1")
    env, separation = _child("separation")
    assert (separation.torch_threads, env["OMP_NUM_THREADS"], env["NUMBA_NUM_THREADS"]) == (8, "8", "8")
    assert _child("composite")[1].worker_concurrency == 2  # the default: the budget leaves it

    (tmp_path / ".env").write_text(
        "AUDIOMESH_HPSS_THREADS=3\nAUDIOMESH_WORKER_CONCURRENCY=5\nAUDIOMESH_TORCH_THREADS=0\n"
    )
    assert (_child("hpss")[1].hpss_threads, _child("hpss")[1].worker_concurrency) == (3, 5)
    assert _child("separation")[1].torch_threads == 0  # set to torch's default on purpose: kept
    assert _child("hpss", {"AUDIOMESH_HPSS_THREADS": "4"})[1].hpss_threads == 4  # environment > .env
    assert _child("hpss", {"OMP_NUM_THREADS": "6"})[0]["OMP_NUM_THREADS"] == "6"  # process-level: set wins

    (tmp_path / ".env").write_text("AUDIOMESH_THREAD_BUDGET=false\n")
    env, separation = _child("separation")
    assert separation.torch_threads == 0 and "OMP_NUM_THREADS" not in env and "LD_PRELOAD" not in env


def test_separation_gets_jemalloc_and_every_core(monkeypatch):
    # find_library is replaced (the one stand-in here): the result must not depend on whether
    # this machine has libjemalloc installed.
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libjemalloc.so.2" if name == "jemalloc" else None)
    separation, _ = _child("separation", cores=len(os.sched_getaffinity(0)))
    assert separation["LD_PRELOAD"] == "libjemalloc.so.2"
    assert separation["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert separation["AUDIOMESH_TORCH_THREADS"] == str(len(os.sched_getaffinity(0)))
    assert _child("separation", {"LD_PRELOAD": "mine.so"})[0]["LD_PRELOAD"] == "mine.so"  # set wins
    hpss, _ = _child("hpss")
    assert "LD_PRELOAD" not in hpss and hpss["OMP_NUM_THREADS"] == "1"
    # Without jemalloc: mimalloc from the cmeel-mimalloc wheel (a dependency), keeping its pages.
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    separation, _ = _child("separation")
    assert separation["LD_PRELOAD"] == str(mimalloc_library()) and "MALLOC_CONF" not in separation
    assert separation["MIMALLOC_PURGE_DELAY"] == "100000"


def _log_events(path: Path) -> list[dict]:
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return [e for e in events if isinstance(e, dict)]


def test_dotenv_and_environment_each_reach_every_service_under_the_launcher(monkeypatch, tmp_path):
    """A Mesh started in a folder with a ``.env``: its values and the environment's each reach every
    service, the thread settings included. Observed in each child: the settings it logs at start,
    GetConfig (orchestrator), the concurrency bound each worker's server applies, and torch's
    thread count in separation."""
    import grpc
    from google.protobuf import json_format

    from audiomesh.launcher import WORKERS, Mesh
    from audiomesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    torch_threads = usable_cores() + 1  # never the budget's pick (every core)
    (tmp_path / ".env").write_text(
        "AUDIOMESH_HPSS_THREADS=2\n"  # the budget's pick: 1
        "AUDIOMESH_WORKER_CONCURRENCY=3\n"  # the budget's pick for HPSS: at least 4
        f"AUDIOMESH_TORCH_THREADS={torch_threads}\n"
        "AUDIOMESH_RATE_LIMIT_PER_MINUTE=123\n"
        "AUDIOMESH_MAX_QUEUED_JOBS=77\n"
    )
    monkeypatch.setenv("AUDIOMESH_MAX_QUEUED_JOBS", "88")  # the environment wins over .env
    monkeypatch.setenv("AUDIOMESH_MAX_ACTIVE_JOBS_PER_PRINCIPAL", "9")
    expected = {
        "hpss_threads": 2,
        "worker_concurrency": 3,
        "torch_threads": torch_threads,
        "rate_limit_per_minute": 123,
        "max_queued_jobs": 88,
        "max_active_jobs_per_principal": 9,
    }
    env = {
        "AUDIOMESH_DEFAULT_MODEL": "demucs_unittest",
        "AUDIOMESH_LOG_FORMAT": "json",
        "AUDIOMESH_STORE_URL": f"file://{tmp_path / 'data'}",
        "AUDIOMESH_RETENTION_HOURS": "0",
        "HF_HUB_OFFLINE": "1",
    }
    logs = tmp_path / "logs"
    mesh = Mesh(env=env, log_dir=logs, gateway=True).start(timeout=240)
    try:
        with grpc.insecure_channel(mesh.orchestrator) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            reply = stub.GetConfig(orchestrator_pb2.GetConfigRequest(), timeout=30)
    finally:
        mesh.stop()
    config = json_format.MessageToDict(reply.config)
    assert {k: config[k] for k in expected} == expected
    for name in ("orchestrator", *WORKERS, "gateway"):
        events = _log_events(logs / f"{name}.log")
        logged = next(e["settings"] for e in events if e.get("event") == "settings")
        assert {k: logged[k] for k in expected} == expected, name
        if name in WORKERS:
            assert next(e for e in events if e.get("event") == "listening")["concurrency"] == 3, name
    torch = next(e for e in _log_events(logs / "separation.log") if e.get("event") == "torch")
    assert torch["threads"] == torch_threads


@pytest.mark.parametrize(
    ("host", "reached_at"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "127.0.0.1"),
        ("::", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.2"),
        ("::1", "[::1]"),
    ],
)
def test_the_mesh_reaches_its_children_where_they_bind(host, reached_at):
    """AUDIOMESH_HOST (env or .env) is what every child binds; the mesh's own clients reach them
    there (loopback for a wildcard), not at a hard-coded 127.0.0.1 they may not listen on."""
    from audiomesh.launcher import Mesh

    mesh = Mesh(settings=load_settings(host=host))
    try:
        assert mesh.client_host == reached_at
    finally:
        mesh.stop()
