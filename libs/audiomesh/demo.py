"""The synthetic song of the CLI's demo, the bench and the tests: no downloads, deterministic for a seed."""

from __future__ import annotations

import numpy as np


def synth_song(duration_s: float = 10.0, sample_rate: int = 44100, channels: int = 2, *, seed: int = 0) -> np.ndarray:
    """Chords, a bass line, noise-burst drums and a buzzy vowel "voice", float32 ``(channels, n)``, peak 0.9.

    ``n`` is ``round(duration_s * sample_rate)``. In stereo each part sits at its own place in
    the field so separations have something to find; ``channels=1`` is the two sides' mean,
    more than 2 repeat left, right, left, ... ``seed`` picks the drums' noise.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    rng = np.random.default_rng(seed)
    n = int(round(duration_s * sample_rate))
    t = np.arange(n) / sample_rate
    beat = 0.5  # 120 bpm
    out = np.zeros((2, n), dtype=np.float64)
    # Chords: a I-vi-IV-V progression, one per bar.
    roots = [261.63, 220.0, 174.61, 196.0]
    bar = (t // (4 * beat)).astype(int) % len(roots)
    for ratio in (1.0, 1.26, 1.5):
        f = np.take(roots, bar) * ratio
        phase = 2 * np.pi * np.cumsum(f) / sample_rate
        out += 0.08 * np.sin(phase) * np.array([[0.8], [0.5]])
    # Bass: root an octave down, plucked every beat.
    f_bass = np.take(roots, bar) / 2
    env = np.exp(-((t % beat) / 0.25))
    out += 0.25 * env * np.sin(2 * np.pi * np.cumsum(f_bass) / sample_rate)
    # Drums: kick on beats (decaying low sine), hats as short noise bursts on off-beats.
    kick_t = t % beat
    out += 0.5 * np.exp(-kick_t / 0.06) * np.sin(2 * np.pi * 55 * kick_t)
    hat_t = (t + beat / 2) % beat
    hats = rng.standard_normal(n) * np.exp(-hat_t / 0.02)
    out += 0.08 * hats * np.array([[0.4], [0.9]])
    # Voice: a vowel-like buzz with vibrato, phrases of two bars with rests.
    f_voice = 330 * (1 + 0.01 * np.sin(2 * np.pi * 5 * t)) * np.where((t // (8 * beat)) % 2 == 0, 1.0, 1.122)
    phase = 2 * np.pi * np.cumsum(f_voice) / sample_rate
    voice = sum(np.sin(k * phase) / k * np.exp(-((k * 330 - 700) ** 2) / 2e5) for k in range(1, 12))
    gate = ((t % (8 * beat)) < 6 * beat).astype(float)
    out += 0.3 * voice * gate
    out /= max(1.0, np.abs(out).max() / 0.9)
    if channels == 1:
        out = out.mean(axis=0, keepdims=True)
        out *= 0.9 / (np.abs(out).max() + 1e-12)
    else:
        out = out[[c % 2 for c in range(channels)]]
    return out.astype(np.float32)
