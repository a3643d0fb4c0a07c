"""The separation worker's allocator as the launcher starts it: jemalloc where the system has it,
else mimalloc from the cmeel-mimalloc wheel (a dependency); either way the worker reports it,
does not warn, and gives freed pages back after a request (``release_memory``).

Each case starts a real process with the environment ``thread_env`` gives the separation worker
and runs the worker's own start-up report (``log_runtime``) in it. ``ctypes.util.find_library``
is replaced in this process (the one stand-in) so the mimalloc case does not depend on whether
this machine has libjemalloc installed.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from audiomesh.config import load_settings
from audiomesh.launcher import thread_env
from audiomesh.memory import mimalloc_library

PROGRAM = """
import json, numpy as np
from audiomesh.memory import release_memory
from audiomesh.separation.registry import log_runtime
from audiomesh.telemetry import configure_logging
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
configure_logging("separation", fmt="json")
log_runtime(compile_mode="off")
blocks = [np.ones(5_000_000) for _ in range(8)]  # 320 MB in 40 MB blocks, as a request's buffers
allocated = rss()
del blocks
kept = rss()
released = release_memory()
print(json.dumps({"allocated": allocated, "kept": kept, "released": released, "after": rss()}))
"""


def run_worker_start(env: dict[str, str]) -> tuple[dict, list[dict]]:
    """(memory figures, the log events) of PROGRAM run with ``env``."""
    proc = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = []
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return json.loads(proc.stdout.strip().splitlines()[-1]), events


def separation_env(monkeypatch: pytest.MonkeyPatch, jemalloc: str | None) -> dict[str, str]:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: jemalloc if name == "jemalloc" else None)
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "MIMALLOC_PURGE_DELAY")}
    return thread_env("separation", load_settings(environ={}), base, cores=1)


def check(figures: dict, events: list[dict], expected: str) -> None:
    runtime = [e for e in events if e.get("event") == "torch"]
    assert [e["allocator"] for e in runtime] == [expected]
    assert not [e for e in events if e.get("level") == "warning"], events
    # Pages kept while the request runs (no refaulting between chunks), given back after it.
    assert figures["kept"] > figures["allocated"] - 50
    assert figures["released"] and figures["after"] < figures["allocated"] - 250


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD: Linux only")
def test_without_jemalloc_the_worker_runs_on_mimalloc_from_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    library = mimalloc_library()
    assert library is not None, "cmeel-mimalloc (a dependency of audiomesh) is not installed"
    env = separation_env(monkeypatch, None)
    assert env["LD_PRELOAD"] == str(library)
    check(*run_worker_start(env), "mimalloc")


@pytest.mark.skipif(not ctypes.util.find_library("jemalloc"), reason="libjemalloc2 not installed (.ci/run installs it)")
def test_with_jemalloc_the_worker_runs_on_jemalloc(monkeypatch: pytest.MonkeyPatch) -> None:
    env = separation_env(monkeypatch, ctypes.util.find_library("jemalloc"))
    assert "jemalloc" in env["LD_PRELOAD"] and "MIMALLOC_PURGE_DELAY" not in env
    check(*run_worker_start(env), "jemalloc")


def test_the_c_librarys_malloc_is_reported_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    env = separation_env(monkeypatch, None)
    del env["LD_PRELOAD"], env["MIMALLOC_PURGE_DELAY"]
    _figures, events = run_worker_start(env)
    assert [e["allocator"] for e in events if e.get("event") == "torch"] == ["libc"]
    assert any(e.get("level") == "warning" and "mimalloc" in e["event"] for e in events)
