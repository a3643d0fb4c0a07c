"""Small separation models for tests (no downloads, seconds to run); songs come from audiomesh.demo."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

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
