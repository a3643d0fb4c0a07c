"""Test audio (no downloads) and deliberately broken files.

Songs come from :func:`audiomesh.demo.synth_song`, the one generator of the CLI's demo, the
bench and the tests; this module adds a sine and files that are broken on purpose.
"""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf

from audiomesh.demo import synth_song

__all__ = [
    "sine",
    "write_wav",
    "write_empty",
    "write_text_as_wav",
    "write_truncated_wav",
    "write_zero_frame_wav",
    "write_nan_wav",
    "write_fake_m4a",
]


def sine(freq: float, duration_s: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A mono sine, float32 shape (frames,)."""
    t = np.arange(int(round(duration_s * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: str | os.PathLike[str], y: np.ndarray, sr: int, subtype: str = "PCM_16") -> str:
    """Write ``y`` (``(channels, frames)`` or ``(frames,)``) as WAV; return the path."""
    y = np.asarray(y)
    sf.write(os.fspath(path), y.T if y.ndim == 2 else y, sr, format="WAV", subtype=subtype)
    return os.fspath(path)


def write_empty(path: str | os.PathLike[str]) -> str:
    open(path, "wb").close()
    return os.fspath(path)


def write_text_as_wav(path: str | os.PathLike[str]) -> str:
    """A text file with an audio name."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("This is not audio, it is a shopping list: eggs, flour, milk.\n" * 4)
    return os.fspath(path)


def write_truncated_wav(path: str | os.PathLike[str], sr: int = 44100, keep: float = 0.5) -> str:
    """A valid 1 s stereo WAV cut to ``keep`` of its size (header intact, data short)."""
    write_wav(path, synth_song(1.0, sr, 2), sr)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))
    return os.fspath(path)


def write_zero_frame_wav(path: str | os.PathLike[str], sr: int = 44100) -> str:
    """A well-formed WAV header with no samples."""
    sf.write(os.fspath(path), np.zeros((0, 2), np.float32), sr, format="WAV", subtype="PCM_16")
    return os.fspath(path)


def write_nan_wav(path: str | os.PathLike[str], sr: int = 44100) -> str:
    """A float WAV with NaN and Inf samples in it."""
    y = sine(440, 0.5, sr)
    y[100] = np.nan
    y[200] = np.inf
    sf.write(os.fspath(path), y, sr, format="WAV", subtype="FLOAT")
    return os.fspath(path)


def write_fake_m4a(path: str | os.PathLike[str]) -> str:
    """The first bytes of an MP4/M4A container (libsndfile cannot read it)."""
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00M4A isommp42" + bytes(range(256)) * 8)
    return os.fspath(path)
