"""Keep a long-running worker's resident memory near its working set (glibc malloc tuning).

glibc gives every thread that allocates its own arena (up to 8 per core) and keeps freed memory
in it. A worker runs each request on whichever executor thread is free, and torch's OpenMP
threads allocate too, so after a few requests the process holds the peak of several arenas:
measured on the separation worker (HTDemucs, 20 s songs), peak RSS went 1.46 → 1.85 → 1.94 GB
over three requests on three threads. Two arenas and a trim after each request keep it at
1.26 GB, request after request, at the same speed. (A fixed mmap threshold returns large blocks
at once, but page faults made separation 1.8x slower.)

Within one long request glibc's peak still creeps up chunk after chunk (1.4 → 1.7 GB over 60 s
of HTDemucs; trimming between chunks does not help), and a chunk runs 1.26x slower than on an
allocator that keeps its pages: the launcher preloads one into the separation worker instead
(:func:`preload_env`, used by :func:`audiomesh.launcher.thread_env`): jemalloc where the system
has it (Debian's ``libjemalloc2``), else mimalloc from the ``cmeel-mimalloc`` wheel, a dependency
of audiomesh, so a fresh ``pip install`` gets the fast path too (same speed as jemalloc within
2 %, BENCHMARKS.md). The glibc calls then do nothing harmful (they act on unused arenas).

Both calls do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

__all__ = ["allocator", "limit_arenas", "mimalloc_library", "preload_env", "release_memory"]

#: jemalloc keeping its pages within a request (they are purged after it: :func:`release_memory`).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
#: mimalloc likewise: its default 1 s purge delay gives pages back between a chunk's forwards and
#: faults them in again (a chunk 1.6x slower than with the pages kept, measured); 100 s outlasts
#: any chunk, and :func:`release_memory` purges at once after a request. (-1, "never", would keep
#: them even then: ``mi_collect`` only runs purges that are scheduled.)
MIMALLOC_PURGE_DELAY_MS = "100000"

_M_ARENA_MAX = -8


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def limit_arenas(count: int = 2) -> bool:
    """Cap the number of malloc arenas (call at start, before threads allocate); True if applied."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, int(count)) == 1)


def release_memory() -> bool:
    """Return freed memory of every arena to the system; True if any was.

    glibc: ``malloc_trim(0)``. Under a preloaded jemalloc or mimalloc (which otherwise keep their
    pages, see :func:`preload_env`): purge every arena's unused pages (``mi_collect(true)``), so
    what a request or the model's loading freed does not stay resident while the worker waits.
    """
    released = False
    if (mallctl := _jemalloc_mallctl()) is not None:
        released = mallctl(f"arena.{_MALLCTL_ARENAS_ALL}.purge".encode(), None, None, None, 0) == 0
    elif (collect := _mimalloc_collect()) is not None:
        collect(True)  # returns nothing: count it as released
        released = True
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0)) or released


_MALLCTL_ARENAS_ALL = 4096  # jemalloc's MALLCTL_ARENAS_ALL


def allocator() -> str:
    """``"jemalloc"`` or ``"mimalloc"`` when one is this process's allocator (preloaded), else ``"libc"``."""
    if _jemalloc_mallctl() is not None:
        return "jemalloc"
    return "mimalloc" if _mimalloc_collect() is not None else "libc"


def preload_env() -> dict[str, str]:
    """The environment that preloads a fast allocator into a process started with it (Linux):
    jemalloc where the system has it, else mimalloc from the ``cmeel-mimalloc`` wheel; ``{}``
    when neither is there (or not on Linux). Both keep their pages within a request; see
    :data:`JEMALLOC_CONF`, :data:`MIMALLOC_PURGE_DELAY_MS`.
    """
    if not sys.platform.startswith("linux"):
        return {}
    if jemalloc := ctypes.util.find_library("jemalloc"):
        return {"LD_PRELOAD": jemalloc, "MALLOC_CONF": JEMALLOC_CONF}
    if (mimalloc := mimalloc_library()) is not None:
        return {"LD_PRELOAD": str(mimalloc), "MIMALLOC_PURGE_DELAY": MIMALLOC_PURGE_DELAY_MS}
    return {}


def mimalloc_library() -> Path | None:
    """``libmimalloc.so`` as the ``cmeel-mimalloc`` wheel installed it in this environment, or None."""
    try:
        files = metadata.distribution("cmeel-mimalloc").files or []
    except metadata.PackageNotFoundError:
        return None
    names = sorted((f for f in files if re.fullmatch(r"libmimalloc\.so(\.\d+)*", f.name)), key=lambda f: len(f.name))
    for name in names:
        if (path := Path(str(name.locate()))).is_file():
            return path
    return None


@functools.cache
def _mimalloc_collect() -> Callable[[bool], None] | None:
    """mimalloc's ``mi_collect`` when mimalloc is this process's allocator (LD_PRELOAD), else None."""
    try:
        collect = ctypes.CDLL(None).mi_collect
    except (OSError, AttributeError):
        return None
    collect.restype = None
    collect.argtypes = [ctypes.c_bool]
    return collect


@functools.cache
def _jemalloc_mallctl() -> Callable[..., int] | None:
    """jemalloc's ``mallctl`` when jemalloc is this process's allocator (LD_PRELOAD), else None."""
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):
        return None
    mallctl.restype = ctypes.c_int
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return mallctl
