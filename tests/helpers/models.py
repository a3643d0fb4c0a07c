"""Small separation models and test audio for tests (no downloads, seconds to run)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from audiomesh.separation.repo import build_htdemucs, save_model_to_repo

SAMPLE_RATE = 44100

#: An HTDemucs with the real architecture, shrunk: 8 channels, 1 Transformer layer,
#: 1 s segments (0.38 M parameters; ~0.1 s per second of audio on 2 cores).
#: depth stays 4: with fewer layers the Transformer attends over many frequency
#: bins and is slower than this.
TINY_HTDEMUCS: dict[str, Any] = {
    "channels": 8,
    "bottom_channels": 0,
    "t_layers": 1,
    "segment": Fraction(1),
}


def make_tiny_htdemucs(seed: int = 0, **overrides: Any):
    """A tiny random HTDemucs in eval mode."""
    return build_htdemucs(seed=seed, **{**TINY_HTDEMUCS, **overrides})


def make_tiny_repo(folder: Path, name: str = "tiny_ht", seed: int = 0, **overrides: Any) -> tuple[Path, str]:
    """Save a tiny HTDemucs as ``folder/NAME.th``; return ``(folder, name)``."""
    save_model_to_repo(make_tiny_htdemucs(seed, **overrides), name, folder)
    return folder, name


def synth_mix(seconds: float = 2.0, sample_rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """A stereo test mix, float32 (2, frames): bass and lead tones, a chord, noise bursts as drums."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    bass = 0.3 * np.sin(2 * np.pi * 55.0 * t)
    lead = 0.2 * np.sin(2 * np.pi * 440.0 * t + 3 * np.sin(2 * np.pi * 5.0 * t))
    chord = sum(0.08 * np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0))
    drums = np.zeros_like(t)
    for start in np.arange(0.0, seconds, 0.25):
        i = int(start * sample_rate)
        n = min(int(0.05 * sample_rate), len(t) - i)
        drums[i : i + n] += 0.4 * rng.standard_normal(n) * np.exp(-np.arange(n) / (0.01 * sample_rate))
    left = bass + 0.8 * lead + chord + drums
    right = bass + 0.5 * lead + 1.2 * chord + drums
    return np.stack([left, right]).astype(np.float32)
