"""audiomesh.dsp.loudness: BS.1770-4 loudness (EBU Tech 3341 checks), sample and true peak."""

from __future__ import annotations

import math

import numpy as np
import pyloudnorm
import pytest
import scipy.signal
from scipy.signal.windows import tukey

from audiomesh.dsp.loudness import (
    Measurement,
    integrated_loudness,
    measure,
    sample_peak_dbfs,
    true_peak_dbtp,
    upsampled_peak,
)
from audiomesh.errors import InvalidInput


def sine(freq: float, seconds: float, sr: int, peak_dbfs: float, channels: int = 2, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    tone = 10 ** (peak_dbfs / 20) * np.sin(2 * np.pi * freq * t + phase)
    return np.tile(tone, (channels, 1))


def song(sr: int = 44100, seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    t = np.arange(n) / sr
    tones = 0.2 * np.sin(2 * np.pi * 110 * t) + 0.1 * np.sin(2 * np.pi * 660 * t + 1)
    drums = np.zeros(n)
    burst = int(0.05 * sr)
    for start in range(0, n - burst, sr // 4):
        drums[start : start + burst] += 0.4 * rng.standard_normal(burst) * np.exp(-np.arange(burst) / (0.01 * sr))
    return np.stack([tones + drums, 0.7 * tones + drums])


# --------------------------------------------------------------------------- integrated loudness


@pytest.mark.parametrize("sr", [44100, 48000])
@pytest.mark.parametrize("level", [-23.0, -33.0])
def test_ebu_3341_stereo_997hz_sine(sr: int, level: float) -> None:
    """Tech 3341 cases 1-2: a stereo 997 Hz sine at L dBFS peak per channel reads L LUFS."""
    y = sine(997.0, 10.0, sr, level).astype(np.float32)
    assert integrated_loudness(y, sr) == pytest.approx(level, abs=0.1)


@pytest.mark.parametrize("sr", [22050, 44100, 48000])
def test_equals_pyloudnorm(sr: int) -> None:
    y = song(sr)
    expected = pyloudnorm.Meter(sr).integrated_loudness(y.T)
    assert integrated_loudness(y, sr) == expected
    # float32 audio is measured in float64: within float32 rounding of the reference
    assert integrated_loudness(y.astype(np.float32), sr) == pytest.approx(expected, abs=1e-4)


def test_mono_shapes_agree() -> None:
    y = song()[0]
    assert integrated_loudness(y, 44100) == integrated_loudness(y[np.newaxis], 44100)


def test_five_channels_weight_surrounds() -> None:
    y = sine(997.0, 2.0, 48000, -23.0, channels=5)
    assert integrated_loudness(y, 48000) == pytest.approx(pyloudnorm.Meter(48000).integrated_loudness(y.T))


@pytest.mark.parametrize(
    "y",
    [np.zeros((2, 44100)), np.zeros((2, 100)), sine(997.0, 0.39, 44100, -3.0), sine(997.0, 2.0, 44100, -90.0)],
    ids=["silence", "short-silence", "shorter-than-a-block", "below-absolute-gate"],
)
def test_nothing_measurable_is_minus_inf(y: np.ndarray) -> None:
    assert integrated_loudness(y, 44100) == -math.inf


def test_exactly_one_block_is_measured() -> None:
    y = sine(997.0, 0.5, 48000, -23.0)
    assert math.isfinite(integrated_loudness(y, 48000))


# --------------------------------------------------------------------------- peaks


@pytest.mark.parametrize("level", [0.0, -6.0, -20.0])
def test_sample_peak(level: float) -> None:
    y = np.zeros((2, 1000))
    y[1, 500] = -(10 ** (level / 20))
    assert sample_peak_dbfs(y) == pytest.approx(level, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_true_peak_is_at_least_sample_peak(seed: int) -> None:
    y = np.random.default_rng(seed).uniform(-0.5, 0.5, size=(2, 4410))
    assert true_peak_dbtp(y, 44100) >= sample_peak_dbfs(y)


@pytest.mark.parametrize("sr", [44100, 48000])
def test_inter_sample_peak_of_quarter_rate_sine(sr: int) -> None:
    """fs/4 sine at 45°: samples at ±0.707 (−3.01 dBFS), waveform peaks at 1.0 (0 dBTP)."""
    n = np.arange(sr)
    y = (0.5 * np.sin(np.pi / 2 * n + np.pi / 4) * tukey(n.size, 0.1))[np.newaxis]
    sample, true = sample_peak_dbfs(y), true_peak_dbtp(y, sr)
    assert sample == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=1e-6)
    assert true - sample == pytest.approx(3.01, abs=0.1)
    assert true_peak_dbtp(y, sr, oversample=1) == sample


def test_silence_peaks_are_minus_inf() -> None:
    y = np.zeros((2, 1000), dtype=np.float32)
    assert sample_peak_dbfs(y) == -math.inf
    assert true_peak_dbtp(y, 44100) == -math.inf
    assert sample_peak_dbfs(np.zeros((2, 0))) == -math.inf


def test_measure_collects_the_three_levels() -> None:
    y = song().astype(np.float32)
    m = measure(y, 44100)
    assert m == Measurement(integrated_loudness(y, 44100), sample_peak_dbfs(y), true_peak_dbtp(y, 44100))
    assert m.to_dict().keys() == {"integrated_lufs", "sample_peak_dbfs", "true_peak_dbtp"}
    assert measure(np.zeros((2, 44100)), 44100) == Measurement(-math.inf, -math.inf, -math.inf)


# --------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: integrated_loudness(np.zeros((6, 44100)), 44100), r"at most 5 channels \(L, R, C, Ls, Rs\), got 6"),
        (lambda: integrated_loudness(np.zeros((2, 44100)), 4000), r"sample_rate must be a number >= 8000 Hz"),
        (lambda: integrated_loudness(np.zeros((2, 44100)), float("nan")), r"sample_rate must be a number >= 8000"),
        (lambda: integrated_loudness(np.zeros((2, 44100), dtype=np.int16), 44100), r"floating-point audio"),
        (lambda: integrated_loudness(np.full((2, 44100), np.nan), 44100), r"must be finite everywhere"),
        (lambda: sample_peak_dbfs(np.zeros((1, 2, 3))), r"shape \(channels, n\) or \(n,\), got \(1, 2, 3\)"),
        (lambda: true_peak_dbtp(np.zeros((2, 10)), 44100, oversample=0), r"oversample must be a positive integer"),
        (lambda: measure([0.0, 1.0], 44100), r"y must be a numpy\.ndarray, got list"),
    ],
    ids=["channels", "low-rate", "nan-rate", "int16", "nan", "3d", "oversample", "list"],
)
def test_invalid_input_raises(call, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        call()


@pytest.mark.parametrize("up", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 11, 21, 1001])
def test_upsampled_peak_equals_resample_poly_without_building_it(up: int, n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n)
    reference = np.abs(scipy.signal.resample_poly(x, up, 1))
    for start, stop in [(0, n), (0, max(1, n // 2)), (n // 3, n)]:
        expected = float(np.max(reference[up * start : up * stop]))
        assert upsampled_peak(x, up, start, stop) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert upsampled_peak(x, up, 3, 3) == 0.0  # nothing asked
