"""audiomesh.memory: freed memory goes back to the system, under glibc and under jemalloc."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

PROGRAM = """
import json, numpy as np
from audiomesh.memory import allocator, release_memory
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
blocks = [np.ones(5_000_000) for _ in range(8)]  # 320 MB in 40 MB blocks
allocated = rss()
del blocks
freed = rss()
released = release_memory()
print(json.dumps({"jemalloc": allocator() == "jemalloc", "allocated": allocated, "freed": freed,
                  "released": released, "after": rss()}))
"""


def run(env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_release_memory_works_under_glibc() -> None:
    report = run({})
    assert not report["jemalloc"]
    assert report["after"] < report["allocated"] - 250


@pytest.mark.skipif(not ctypes.util.find_library("jemalloc"), reason="libjemalloc2 not installed (.ci/run installs it)")
def test_release_memory_purges_jemalloc_that_keeps_its_pages() -> None:
    report = run({"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"})
    assert report["jemalloc"] and report["released"]
    assert report["freed"] > report["allocated"] - 50  # jemalloc as configured keeps freed pages...
    assert report["after"] < report["allocated"] - 250  # ...until release_memory() purges them
