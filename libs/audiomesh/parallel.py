"""Run independent pieces of one request on a few threads (numpy, scipy and libsndfile release
the GIL), e.g. the three composites of a job or the ten tracks a normalize request writes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def map_threads(fn: Callable[[T], R], items: Iterable[T], *, max_workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``max_workers`` threads (default: usable cores).

    Every call finishes (none is abandoned half-way) before the first exception, in item
    order, is raised: callers clean up after all of them at once.
    """
    items = list(items)
    workers = max(1, min(len(items), max_workers or usable_cores()))
    if workers == 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="request-part") as pool:
        futures = [pool.submit(fn, x) for x in items]
        wait(futures)
    for future in futures:
        if (error := future.exception()) is not None:
            raise error
    return [future.result() for future in futures]
