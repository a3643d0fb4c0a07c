"""Scratch folders: a process's own goes on a clean stop; those of dead processes are swept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from audiomesh import scratch


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # tempfile caches gettempdir()
    yield tmp_path


def test_workdir_lives_under_the_process_folder_and_goes_away(tmpdir_env):
    with scratch.workdir("x-") as work:
        (work / "partial.wav").write_bytes(b"...")
        assert work.parent == scratch.process_dir() == tmpdir_env / "audiomesh-scratch" / str(os.getpid())
    assert not work.exists()
    with pytest.raises(RuntimeError), scratch.workdir("x-") as work:
        (work / "partial.wav").write_bytes(b"...")
        raise RuntimeError("the request failed")
    assert not work.exists()


def test_sweep_removes_only_folders_of_processes_that_are_gone(tmpdir_env):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_dir = scratch.root() / dead.stdout.strip()
    (dead_dir / "sep-abc").mkdir(parents=True)
    (dead_dir / "sep-abc" / "in.wav").write_bytes(b"left by a SIGKILL")
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        alive_dir = scratch.root() / str(parent.pid)
        alive_dir.mkdir()
        other = scratch.root() / "not-a-pid"
        other.mkdir()
        own = scratch.process_dir()
        assert scratch.sweep() == [dead_dir]
        assert not dead_dir.exists() and alive_dir.exists() and other.exists() and own.exists()
    finally:
        parent.kill()
        parent.wait()
    scratch.remove_own()
    assert not own.exists()
