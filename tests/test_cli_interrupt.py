"""Ctrl-C and the ``audiomesh`` command: while it is still importing (the console script and
``python -m audiomesh``, real subprocesses), and after a file's upload went but before the
orchestrator answered with its job (``process`` in this process against a real orchestrator on
port 0 and the shared mesh's real workers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from audiomesh.cli import build_parser
from audiomesh.cli_process import process_files
from audiomesh.config import Settings, load_settings
from audiomesh.rpc.server import start_server
from audiomesh.services.orchestrator.server import build
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.mesh import SUCCEEDED, wait_for, write_song

# A sitecustomize that makes the import of one module raise KeyboardInterrupt, as a Ctrl-C
# landing while the CLI imports it would: deterministic, where a real SIGINT's timing is not.
INTERRUPTING_IMPORT = """
import sys

class _Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, _Interrupt())
"""


@pytest.mark.parametrize("module", ["grpc", "google.protobuf.json_format", "audiomesh.cli_process"])
@pytest.mark.parametrize("how", ["console script", "python -m audiomesh"])
def test_ctrl_c_while_the_cli_imports_exits_130_without_a_traceback(tmp_path, module, how):
    """The interrupt is injected at an import (see INTERRUPTING_IMPORT); without it, ``--version``
    would exit 0, so the exit code also shows the interrupt happened."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(INTERRUPTING_IMPORT.format(module=module)))
    script = Path(sys.executable).with_name("audiomesh")  # what pyproject's [project.scripts] installed
    command = [str(script)] if how == "console script" else [sys.executable, "-m", "audiomesh"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([*command, "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert not done.stdout


def test_the_cli_still_runs_through_both_entry_points():
    for command in ([str(Path(sys.executable).with_name("audiomesh"))], [sys.executable, "-m", "audiomesh"]):
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith("audiomesh "), (command, done.stdout, done.stderr)


class ManifestHeld:
    """The orchestrator's real store, except that the first write of a new job's manifest (inside
    UploadAudio, after every chunk was received and stored, before the answer) waits until
    ``release`` is set. An injected delay: it holds the call in the window between "the whole
    file went" and "the job's id came back", which a real Ctrl-C hits only by chance."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.holding = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def put_if(self, key: str, data: bytes, **kwargs: Any) -> Any:
        if key.endswith("/manifest.json") and kwargs.get("if_none_match") and not self.holding.is_set():
            self.holding.set()
            self.release.wait(30)
        return self._store.put_if(key, data, **kwargs)


@contextlib.asynccontextmanager
async def held_orchestrator(
    file_mesh, held: type[ManifestHeld] = ManifestHeld, **overrides: Any
) -> AsyncIterator[tuple[ManifestHeld, Settings, Any]]:
    """An orchestrator in this process on the shared mesh's store and workers, its store wrapped
    in ``held``; the CLI's settings pointing at it, and a stub to check jobs."""
    env = {k.removeprefix("AUDIOMESH_").lower(): v for k, v in file_mesh.env.items() if k.startswith("AUDIOMESH_")}
    settings = load_settings(**{**env, "replica_id": "cli-interrupt", **overrides})
    store = held(settings.open_store(create_bucket=False))
    spec = build(settings, store=store)
    server = await start_server(spec.registrations, service="orchestrator", warmup=spec.warmup)
    try:
        await asyncio.wait_for(server.ready.wait(), 30)
        async with grpc.aio.insecure_channel(server.address) as channel:
            cli_settings = load_settings(**{**env, "orchestrator_addr": server.address})
            yield store, cli_settings, orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    finally:
        store.release.set()
        await spec.on_stop()
        await server.stop(1)


async def ctrl_c_once_the_file_went(store: ManifestHeld, settings: Settings, argv: list[str], song: Path) -> None:
    """``process`` as a task, cancelled (what Ctrl-C does under asyncio.run) while the
    orchestrator holds the upload's answer; then the answer is let go."""
    args = build_parser().parse_args(["process", *argv, str(song)])
    task = asyncio.ensure_future(process_files(args, settings, settings.orchestrator_addr, [song], []))
    assert await asyncio.to_thread(store.holding.wait, 30), "the orchestrator never began creating the job"
    assert not task.done()
    task.cancel()
    await asyncio.sleep(0.5)  # the cancellation reaches the upload before the answer can come
    assert not task.done()  # waiting for the answer, not gone
    store.release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 60)


async def test_ctrl_c_after_the_upload_went_cancels_the_job_it_created(file_mesh, tmp_path, capsys):
    song = write_song(tmp_path / "late.wav", 1.0, seed=31)
    async with held_orchestrator(file_mesh) as (store, settings, stub):
        await ctrl_c_once_the_file_went(store, settings, ["-o", str(tmp_path / "out")], song)
        err = capsys.readouterr().err
        found = re.search(r"late\.wav: job ([0-9a-f-]{36})\n", err)
        assert found, err
        job_id = found[1]
        assert "interrupted: cancelling 1 job" in err and f"late.wav: job {job_id} cancelled" in err, err
        job = (await stub.GetJob(orchestrator_pb2.GetJobRequest(job_id=job_id))).job
        assert job.state == common_pb2.JOB_STATE_CANCELLED, job


async def test_ctrl_c_after_the_upload_went_with_detach_says_how_to_fetch_the_job(file_mesh, tmp_path, capsys):
    song = write_song(tmp_path / "late.wav", 1.0, seed=32)
    async with held_orchestrator(file_mesh) as (store, settings, stub):
        await ctrl_c_once_the_file_went(store, settings, ["--detach", "-o", "dl"], song)
        captured = capsys.readouterr()
        found = re.search(r"late\.wav: job ([0-9a-f-]{36}) submitted; .*`audiomesh download (\S+) -o dl`", captured.out)
        assert found and found[1].startswith(found[2]), captured
        assert "interrupted: jobs submitted above go on" in captured.err
        assert "cancelling" not in captured.err
        job, _ = await wait_for(stub, found[1], timeout=120)  # left to run: it ends on its own
        assert job.state == SUCCEEDED, job.error


class UploadHeld(ManifestHeld):
    """The real store, except that the first stream into a job's input waits for ``release``
    before reading any of it: an injected delay that keeps most of a large upload unsent (gRPC's
    flow control stops the client while nothing is read)."""

    def put_stream(self, key: str, source: Any, **kwargs: Any) -> Any:
        if "/input/" in key and not self.holding.is_set():
            self.holding.set()
            self.release.wait(30)
        return self._store.put_stream(key, source, **kwargs)


async def test_ctrl_c_while_the_upload_goes_cancels_the_call_and_no_job_is_made(file_mesh, tmp_path, capsys):
    """The file (16 MB) is several times what gRPC lets a client send while nothing is read (about
    3 MB here), so it is still going when Ctrl-C comes."""
    song = write_song(tmp_path / "early.wav", 90.0, seed=33)
    async with held_orchestrator(file_mesh, UploadHeld, max_upload_bytes=32 << 20) as (store, settings, stub):
        args = build_parser().parse_args(["process", "-o", str(tmp_path / "out"), str(song)])
        task = asyncio.ensure_future(process_files(args, settings, settings.orchestrator_addr, [song], []))
        assert await asyncio.to_thread(store.holding.wait, 30), "the upload never reached the store"
        await asyncio.sleep(0.5)  # the client sends what flow control lets it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)  # no wait for an answer: the call itself was cancelled
        store.release.set()
        err = capsys.readouterr().err
        assert "job" not in err, err
        listed = await stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=200))
        assert "early.wav" not in [j.input.name for j in listed.jobs]
