"""Synthetic test audio (no downloads) and deliberately broken files.

``synth_song`` builds a short, deterministic "song" with the parts a separator looks for:
chords, a bass line, drums (noise bursts and a pitch-swept kick) and a buzzy, vowel-like
"voice" (a pulse train through formant resonators, with vibrato).
"""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf
from scipy.signal import lfilter

__all__ = [
    "synth_song",
    "sine",
    "write_wav",
    "write_empty",
    "write_text_as_wav",
    "write_truncated_wav",
    "write_zero_frame_wav",
    "write_nan_wav",
    "write_fake_m4a",
]

_BPM = 120.0
# Chord roots (MIDI) of a C - G - Am - F progression, one chord per two beats.
_CHORDS = [(60, 64, 67), (55, 59, 62), (57, 60, 64), (53, 57, 60)]
_MELODY = [72, 74, 76, 79, 76, 74, 72, 67]  # one note per beat
# Formants (Hz, bandwidth Hz) of the vowels /a/ and /i/.
_VOWELS = {
    "a": [(730, 90), (1090, 110), (2440, 170)],
    "i": [(270, 60), (2290, 100), (3010, 150)],
}


def _hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def _env(n: int, sr: int, attack: float, decay: float) -> np.ndarray:
    t = np.arange(n) / sr
    return np.minimum(t / max(attack, 1e-4), 1.0) * np.exp(-t / decay)


def sine(freq: float, duration_s: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A mono sine, float32 shape (frames,)."""
    t = np.arange(int(round(duration_s * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _resonate(x: np.ndarray, sr: int, formants: list[tuple[float, float]]) -> np.ndarray:
    out = np.zeros_like(x)
    for freq, bw in formants:
        r = np.exp(-np.pi * bw / sr)
        theta = 2 * np.pi * freq / sr
        a = [1.0, -2 * r * np.cos(theta), r * r]
        out += lfilter([1 - r], a, x)
    return out


def synth_song(duration_s: float = 4.0, sample_rate: int = 44100, channels: int = 2, seed: int = 0) -> np.ndarray:
    """A deterministic synthetic song, float32 ``(channels, frames)``, peak 0.9.

    Parameters
    ----------
    duration_s : float
    sample_rate : int
    channels : int
        1 (mono), 2 (stereo: parts panned), or more (stereo pattern repeated).
    seed : int
        Seeds the drum noise and small timing/level variations.
    """
    rng = np.random.default_rng(seed)
    sr = sample_rate
    n = int(round(duration_s * sr))
    beat = int(round(60.0 / _BPM * sr))
    t = np.arange(n) / sr
    left = np.zeros(n)
    right = np.zeros(n)

    # Chords: additive tones with a few harmonics, one chord per two beats.
    for start in range(0, n, 2 * beat):
        chord = _CHORDS[(start // (2 * beat)) % len(_CHORDS)]
        m = min(2 * beat, n - start)
        tt = t[:m]
        env = _env(m, sr, 0.02, 0.9)
        for i, note in enumerate(chord):
            f = _hz(note) * (1 + 0.001 * rng.standard_normal())
            tone = sum(np.sin(2 * np.pi * k * f * tt) / k**1.5 for k in (1, 2, 3))
            pan = 0.3 + 0.2 * i
            left[start : start + m] += 0.08 * env * tone * (1 - pan)
            right[start : start + m] += 0.08 * env * tone * pan

    # Bass: root two octaves down, a note per beat.
    bass = np.zeros(n)
    for start in range(0, n, beat):
        root = _CHORDS[(start // (2 * beat)) % len(_CHORDS)][0] - 24
        m = min(beat, n - start)
        tt = t[:m]
        f = _hz(root)
        bass[start : start + m] += _env(m, sr, 0.005, 0.35) * (
            np.sin(2 * np.pi * f * tt) + 0.3 * np.sin(2 * np.pi * 2 * f * tt)
        )
    left += 0.25 * bass
    right += 0.25 * bass

    # Drums: kick on beats 1/3, snare on 2/4, hi-hat every eighth note.
    for i, start in enumerate(range(0, n, beat // 2)):
        m = min(beat // 2, n - start)
        tt = t[:m]
        if i % 4 == 0:
            sweep = 2 * np.pi * np.cumsum(50 + 70 * np.exp(-tt / 0.03)) / sr
            kick = np.sin(sweep) * _env(m, sr, 0.001, 0.12)
            left[start : start + m] += 0.5 * kick
            right[start : start + m] += 0.5 * kick
        elif i % 4 == 2:
            noise = rng.standard_normal(m)
            snare = (0.6 * noise + 0.4 * np.sin(2 * np.pi * 185 * tt)) * _env(m, sr, 0.001, 0.07)
            left[start : start + m] += 0.25 * snare
            right[start : start + m] += 0.25 * snare
        hat = np.diff(rng.standard_normal(m + 1)) * _env(m, sr, 0.0005, 0.015)
        left[start : start + m] += 0.04 * hat
        right[start : start + m] += 0.07 * hat

    # Voice: a pulse train at the melody's pitch with vibrato, through vowel formants.
    f0 = np.empty(n)
    for j, start in enumerate(range(0, n, beat)):
        f0[start : start + beat] = _hz(_MELODY[j % len(_MELODY)] - 12)
    f0 *= 1 + 0.01 * np.sin(2 * np.pi * 5.5 * t)
    phase = np.cumsum(f0) / sr
    pulses = np.diff(np.floor(phase), prepend=0.0)  # 1 at each glottal period
    half = n // 2
    voice = np.concatenate([_resonate(pulses, sr, _VOWELS["a"])[:half], _resonate(pulses, sr, _VOWELS["i"])[half:]])
    voice *= np.clip(np.sin(np.pi * (t % (60 / _BPM)) / (60 / _BPM)) * 3, 0, 1)  # phrase per beat
    voice /= np.max(np.abs(voice)) + 1e-12
    left += 0.3 * voice
    right += 0.3 * voice

    stereo = np.stack([left, right])
    stereo *= 0.9 / (np.max(np.abs(stereo)) + 1e-12)
    if channels == 1:
        out = stereo.mean(axis=0, keepdims=True)
        out *= 0.9 / (np.max(np.abs(out)) + 1e-12)
    else:
        out = stereo[[c % 2 for c in range(channels)]]
    return out.astype(np.float32)


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
