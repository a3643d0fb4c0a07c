"""Keep a long-running worker's resident memory near its working set (glibc malloc tuning).

glibc gives every thread that allocates its own arena (up to 8 per core) and keeps freed memory
in it. A worker runs each request on whichever executor thread is free, and torch's OpenMP
threads allocate too, so after a few requests the process holds the peak of several arenas:
measured on the separation worker (HTDemucs, 20 s songs), peak RSS went 1.46 → 1.85 → 1.94 GB
over three requests on three threads. Two arenas and a trim after each request keep it at
1.26 GB, request after request, at the same speed. (A fixed mmap threshold returns large blocks
at once, but page faults made separation 1.8x slower.)

Within one long request glibc's peak still creeps up chunk after chunk (1.4 → 1.7 GB over 60 s
of HTDemucs; trimming between chunks does not help): where jemalloc is installed the launcher
preloads it into the separation worker instead (see :func:`audiomesh.launcher.thread_env`);
these calls then do nothing harmful (they act on glibc's unused arenas).

Both calls do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["limit_arenas", "release_memory"]

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

    glibc: ``malloc_trim(0)``. Under a preloaded jemalloc (which otherwise keeps its pages, see
    :func:`audiomesh.launcher.thread_env`): purge every arena's unused pages, so what a request
    or the model's loading freed does not stay resident while the worker waits.
    """
    released = False
    if (mallctl := _jemalloc_mallctl()) is not None:
        released = mallctl(f"arena.{_MALLCTL_ARENAS_ALL}.purge".encode(), None, None, None, 0) == 0
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0)) or released


_MALLCTL_ARENAS_ALL = 4096  # jemalloc's MALLCTL_ARENAS_ALL


def allocator() -> str:
    """``"jemalloc"`` when it is this process's allocator (preloaded), else ``"libc"``."""
    return "jemalloc" if _jemalloc_mallctl() is not None else "libc"


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
