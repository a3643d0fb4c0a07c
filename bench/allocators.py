"""glibc malloc, jemalloc and mimalloc on the bench's raw path, interleaved (BENCHMARKS.md, *Allocator*).

Each configuration runs in its own process (``LD_PRELOAD``): ``demucs.apply.apply_model`` with
the released HTDemucs configuration (random weights) on a 11 s mix (2 chunks, ``split=True,
overlap=0.25, shifts=1``), one warm-up call and two timed ones. Reported per chunk: wall time and
the process's CPU time (user + sys). With ``--threads 1`` (no OpenMP spin-waiting) CPU time hardly
moves with other load on the machine, so it is the figure to compare on a shared machine.

Usage: ``python bench/allocators.py --rounds 3 --threads 1`` (about 12 minutes on 2 cores).
jemalloc needs Debian's ``libjemalloc2``; mimalloc comes from the ``cmeel-mimalloc`` wheel.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

CHUNKS = 2  # 11 s at 7.8 s chunks every 5.85 s


def configs() -> dict[str, dict[str, str]]:
    from audiomesh.memory import JEMALLOC_CONF, MIMALLOC_PURGE_DELAY_MS, mimalloc_library

    mimalloc = str(mimalloc_library())
    return {
        "glibc": {},
        "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": JEMALLOC_CONF},
        "mimalloc": {"LD_PRELOAD": mimalloc, "MIMALLOC_PURGE_DELAY": MIMALLOC_PURGE_DELAY_MS},  # what the launcher sets
        "mimalloc_default": {"LD_PRELOAD": mimalloc},  # purges after 1 s
    }


def child(threads: int) -> dict:
    import numpy as np
    import torch
    from demucs.apply import apply_model

    from audiomesh.memory import allocator
    from audiomesh.separation.repo import build_htdemucs

    torch.set_num_threads(threads)
    model = build_htdemucs(seed=0)
    mix = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 2, 44100 * 11)).astype(np.float32) * 0.3)
    wall, cpu = [], []
    with torch.inference_mode():
        for _ in range(3):
            random.seed(1)
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            apply_model(model, mix, shifts=1, split=True, overlap=0.25, device="cpu", num_workers=0)
            after = resource.getrusage(resource.RUSAGE_SELF)
            wall.append((time.perf_counter() - started) / CHUNKS)
            cpu.append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / CHUNKS)
    status = open("/proc/self/status").read()  # noqa: SIM115
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024 / 1e6
    return {"allocator": allocator(), "wall": wall[1:], "cpu": cpu[1:], "peak_rss_mb": peak, "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated configurations (default: all)")
    args = parser.parse_args()
    table = configs()
    names = [n for n in args.only.split(",") if n] or list(table)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:  # interleaved, alternating order
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(args.threads)],
                env={**os.environ, **table[name]},
                capture_output=True,
                text=True,
                timeout=1800,
                check=True,
            )
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(name, json.dumps(results[name][-1]), flush=True)
    print(f"per chunk, threads={args.threads}: median (min) over {args.rounds} rounds x 2 calls")
    for name, runs in results.items():
        wall = [x for r in runs for x in r["wall"]]
        cpu = [x for r in runs for x in r["cpu"]]
        peaks = [round(r["peak_rss_mb"]) for r in runs]
        print(
            f"{name:17s} {runs[0]['allocator']:8s} wall {statistics.median(wall):.2f} ({min(wall):.2f}) s  "
            f"cpu {statistics.median(cpu):.2f} ({min(cpu):.2f}) s  peak RSS {peaks} MB"
        )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]))))
    else:
        main()
