"""Time audiomesh.dsp.hpss against librosa.effects.hpss on a synthetic stereo song.

Usage: ``python bench/hpss_bench.py [--duration 30] [--sample-rate 44100] [--repeat 3]``.
Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import time

import librosa
import numpy as np

from audiomesh.dsp.hpss import hpss, warmup


def synthetic_song(duration: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Stereo float32 "song": a few sustained tones plus noise-burst drums every half second."""
    rng = np.random.default_rng(seed)
    n = int(duration * sample_rate)
    t = np.arange(n) / sample_rate
    tones = sum(0.1 * np.sin(2 * np.pi * f * t + p) for f, p in ((110.0, 0.0), (220.0, 1.0), (329.6, 2.0)))
    drums = np.zeros(n)
    burst = int(0.05 * sample_rate)
    envelope = np.exp(-np.linspace(0.0, 8.0, burst))
    for start in range(0, n - burst, sample_rate // 2):
        drums[start : start + burst] += 0.5 * rng.standard_normal(burst) * envelope
    left = tones + drums + 0.01 * rng.standard_normal(n)
    right = 0.8 * tones + drums + 0.01 * rng.standard_normal(n)
    return np.stack([left, right]).astype(np.float32)


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of audio (default 30)")
    parser.add_argument("--sample-rate", type=int, default=44100)
    parser.add_argument("--repeat", type=int, default=3, help="runs per implementation; best is shown")
    parser.add_argument("--max-workers", type=int, default=None)
    args = parser.parse_args()

    y = synthetic_song(args.duration, args.sample_rate)
    warmup()
    librosa.effects.hpss(y[:, : args.sample_rate])  # JIT librosa's own path too

    t_ref, (h_ref, p_ref) = best_of(lambda: librosa.effects.hpss(y), args.repeat)
    t_ours, (h, p) = best_of(lambda: hpss(y, max_workers=args.max_workers), args.repeat)
    diff = max(float(np.abs(h - h_ref).max()), float(np.abs(p - p_ref).max()))

    print(f"signal        : stereo {args.duration:g} s at {args.sample_rate} Hz, float32, cpus={os.cpu_count()}")
    print(f"librosa       : {t_ref:.3f} s")
    print(f"audiomesh     : {t_ours:.3f} s")
    print(f"speedup       : {t_ref / t_ours:.2f}x")
    print(f"max abs diff  : {diff:.3g}")


if __name__ == "__main__":
    main()
