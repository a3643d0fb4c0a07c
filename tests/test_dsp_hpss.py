"""audiomesh.dsp.hpss: equal to librosa.effects.hpss, parts that sum back, rules that raise."""

from __future__ import annotations

import json
import subprocess
import sys

import librosa
import numpy as np
import pytest
import scipy.ndimage

from audiomesh.dsp import hpss as hpss_module
from audiomesh.dsp.hpss import hpss
from audiomesh.errors import InvalidInput

TOLERANCE = 1e-5


# --------------------------------------------------------------------------- test audio


def white_noise(sr: int, seconds: float, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal((channels, int(sr * seconds)))).astype(np.float32)


def tones(sr: int, seconds: float, channels: int, seed: int = 0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    rows = [
        sum(0.2 / (k + 1) * np.sin(2 * np.pi * f * (1 + 0.01 * c) * t + k) for k, f in enumerate((220, 330, 440, 1250)))
        for c in range(channels)
    ]
    return np.asarray(rows, dtype=np.float32)


def song(sr: int, seconds: float, channels: int, seed: int = 0) -> np.ndarray:
    """Tones plus noise-burst drums every 1/4 s (decaying), a different pan per channel."""
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    drums = np.zeros(n)
    burst = int(0.06 * sr)
    for start in range(0, n - burst, sr // 4):
        drums[start : start + burst] += 0.5 * rng.standard_normal(burst) * np.exp(-np.arange(burst) / (0.01 * sr))
    harmonic = tones(sr, seconds, channels).astype(np.float64)
    return np.asarray(
        [(1 - 0.2 * c) * harmonic[c] + (0.6 + 0.4 * c) * drums for c in range(channels)], dtype=np.float32
    )


SIGNALS = {"noise": white_noise, "tones": tones, "song": song}

SETTINGS = [
    {},
    {"kernel_size": (13, 31), "margin": (1.0, 5.0)},
    {"margin": 3.0, "power": 1.0},
    {"kernel_size": 17, "power": np.inf},
    {"kernel_size": 30},  # even: librosa allows it (scipy's upper median)
    {"n_fft": 1024, "hop_length": 256},
    {"n_fft": 512, "hop_length": 100, "win_length": 400, "pad_mode": "reflect"},
    {"n_fft": 1024, "hop_length": 256, "center": False},
]


def _as_layout(y: np.ndarray, layout: str) -> np.ndarray:
    return y[0] if layout == "mono" else y


# --------------------------------------------------------------------------- equality with librosa


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
@pytest.mark.parametrize("layout", ["mono", "stereo"])
@pytest.mark.parametrize("signal", sorted(SIGNALS))
def test_hpss_matches_librosa(signal: str, layout: str, settings: dict) -> None:
    y = _as_layout(SIGNALS[signal](22050, 1.5, 2), layout)
    h_ref, p_ref = librosa.effects.hpss(y, **settings)
    h, p = hpss(y, **settings)
    assert h.shape == p.shape == y.shape
    assert h.dtype == p.dtype == y.dtype
    assert np.abs(h - h_ref).max() <= TOLERANCE
    assert np.abs(p - p_ref).max() <= TOLERANCE


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hpss_matches_librosa_song_44k(dtype: type) -> None:
    y = song(44100, 3.0, 2).astype(dtype)
    h_ref, p_ref = librosa.effects.hpss(y)
    h, p = hpss(y)
    assert h.dtype == dtype
    assert max(np.abs(h - h_ref).max(), np.abs(p - p_ref).max()) <= TOLERANCE


@pytest.mark.parametrize(
    "settings",
    [{"window": "hamming"}, {"n_fft": 1023}, {"n_fft": 512, "hop_length": 1024}],
    ids=["hamming", "odd-n_fft", "hop>n_fft"],
)
def test_hpss_matches_stft_decompose_istft(settings: dict) -> None:
    """Where librosa.effects.hpss drops an option (window, odd n_fft), compare to its parts."""
    y = song(22050, 1.5, 2)
    stft = librosa.stft(y, **settings)
    h_spec, p_spec = librosa.decompose.hpss(stft)
    h_ref = librosa.istft(h_spec, length=y.shape[-1], **settings)
    p_ref = librosa.istft(p_spec, length=y.shape[-1], **settings)
    h, p = hpss(y, **settings)
    assert max(np.abs(h - h_ref).max(), np.abs(p - p_ref).max()) <= TOLERANCE


@pytest.mark.parametrize("max_workers", [1, 2, 3, 8])
def test_hpss_same_result_for_any_worker_count(max_workers: int) -> None:
    y = song(22050, 1.5, 2)
    h_ref, p_ref = hpss(y, max_workers=1)
    h, p = hpss(y, max_workers=max_workers)
    assert np.array_equal(h, h_ref) and np.array_equal(p, p_ref)


def test_hpss_leading_dimensions_are_channels() -> None:
    y = song(22050, 1.0, 2)
    batch = np.stack([y, y[::-1]])  # (2, 2, n)
    h, p = hpss(batch)
    assert h.shape == batch.shape
    h0, p0 = hpss(y[::-1].copy())
    assert np.array_equal(h[1], h0) and np.array_equal(p[1], p0)


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize(
    "settings", [{}, {"kernel_size": (7, 51)}, {"power": 1.0}, {"power": 4.0}, {"n_fft": 1024, "hop_length": 256}]
)
@pytest.mark.parametrize("signal", sorted(SIGNALS))
def test_margin_one_parts_sum_to_input(signal: str, settings: dict) -> None:
    y = SIGNALS[signal](22050, 1.5, 2)
    stft_args = {k: v for k, v in settings.items() if k in ("n_fft", "hop_length")}
    round_trip = librosa.istft(librosa.stft(y, **stft_args), length=y.shape[-1], **stft_args)
    h, p = hpss(y, margin=1.0, **settings)
    assert np.abs(h + p - round_trip).max() <= 1e-4
    assert np.abs(h + p - y).max() <= np.abs(round_trip - y).max() + 1e-4


def test_larger_margin_leaves_a_residual() -> None:
    y = song(22050, 1.5, 1)[0]
    h1, p1 = hpss(y, margin=1.0)
    h3, p3 = hpss(y, margin=3.0)
    assert np.sum(h3**2) < np.sum(h1**2) and np.sum(p3**2) < np.sum(p1**2)


def test_tones_are_harmonic_and_clicks_percussive() -> None:
    sr = 22050
    t = np.arange(2 * sr) / sr
    tone = 0.3 * np.sin(2 * np.pi * 440.0 * t)
    clicks = np.zeros_like(t)
    clicks[sr // 8 :: sr // 4] = 1.0
    h, p = hpss(tone.astype(np.float32))
    assert np.sum(h**2) > 100 * np.sum(p**2)
    h, p = hpss(clicks.astype(np.float32))
    assert np.sum(p**2) > 100 * np.sum(h**2)


@pytest.mark.parametrize("size", [1, 3, 4, 31, 32])
@pytest.mark.parametrize("axis", [-1, -2])
def test_median_filter_equals_scipy_reflect(size: int, axis: int) -> None:
    x = np.random.default_rng(size).random((40, 57), dtype=np.float32)
    shape = [1, 1]
    shape[axis] = size
    expected = scipy.ndimage.median_filter(x, size=shape, mode="reflect")
    assert np.array_equal(hpss_module._median_filter(x, size, axis), expected)


_WARMUP_CHILD = """
import json
import librosa.core.spectrum
import numpy as np
from audiomesh.dsp import hpss as m

kernels = [vars(librosa.core.spectrum)["__overlap_add"], m._fused_masks_kernel()]
def compiled():
    return sorted(str(sig) for kernel in kernels for sig in kernel.signatures)
before = compiled()
m.warmup()
warm = compiled()
y = np.random.default_rng(1).standard_normal((2, 44100)).astype(np.float32) * 0.1
for channels in (1, 2):
    for workers in (1, 2, 4):
        for block_frames in (None, 16):
            list(m.hpss_blocks(m._Array(y[:channels]), max_workers=workers, block_frames=block_frames))
print(json.dumps({"before": before, "warm": warm, "new": sorted(set(compiled()) - set(warm))}))
"""


def test_warmup_leaves_every_kernel_the_worker_calls_compiled() -> None:
    """In a fresh process (numba's compiled signatures are per process): after `warmup`, the
    hpss worker's calls (`hpss_blocks` on float32 mono/stereo, whole and in blocks, 1-4 threads)
    find every numba kernel already specialised for their array types, so no job compiles."""
    child = subprocess.run(
        [sys.executable, "-c", _WARMUP_CHILD], capture_output=True, text=True, timeout=240, check=True
    )
    seen = json.loads(child.stdout.splitlines()[-1])
    assert seen["before"] == []  # a fresh process: what follows is warmup's doing
    assert any("float32" in sig for sig in seen["warm"]) and any("float64" in sig for sig in seen["warm"])
    assert seen["new"] == [], "compiled during the first job, not at warmup"


# --------------------------------------------------------------------------- rules


Y = white_noise(22050, 0.5, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"margin": 0.5}, r"Margins must be >= 1\.0"),
        ({"margin": (1.0, 0.9)}, r"Margins must be >= 1\.0"),
        ({"margin": float("nan")}, r"margin must be a finite number"),
        ({"margin": (1.0, 2.0, 3.0)}, r"margin must be a scalar or a \(harmonic, percussive\) pair"),
        ({"kernel_size": 0}, r"kernel_size must be a positive integer"),
        ({"kernel_size": (31, -1)}, r"kernel_size must be a positive integer"),
        ({"kernel_size": 3.5}, r"kernel_size must be a positive integer"),
        ({"power": 0}, r"power must be > 0"),
        ({"power": -2.0}, r"power must be > 0"),
        ({"power": float("nan")}, r"power must be > 0"),
        ({"n_fft": 0}, r"n_fft must be a positive integer"),
        ({"hop_length": 0}, r"hop_length must be a positive integer"),
        ({"win_length": 4096}, r"win_length must be an integer in 1\.\.n_fft=2048"),
        ({"window": "no-such-window"}, r"window must be a valid window specification"),
        ({"pad_mode": "wrap"}, r"pad_mode must be one of constant, edge"),
        ({"max_workers": 0}, r"max_workers must be a positive integer or None"),
        ({"n_fft": 65536}, r"hpss needs at least n_fft=65536 samples per channel, got 11025"),
    ],
)
def test_invalid_options_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        hpss(Y, **kwargs)


@pytest.mark.parametrize(
    ("y", "message"),
    [
        ([0.0] * 4096, r"y must be a numpy\.ndarray, got list"),
        (np.zeros(4096, dtype=np.int16), r"y must be float32 or float64 audio, got dtype int16"),
        (np.full(4096, np.nan, dtype=np.float32), r"y must be finite everywhere"),
        (np.array(0.0, dtype=np.float32), r"at least one dimension"),
        (np.zeros((0, 4096), dtype=np.float32), r"y must have at least one channel"),
        (np.zeros(100, dtype=np.float32), r"hpss needs at least n_fft=2048 samples per channel, got 100"),
    ],
    ids=["list", "int16", "nan", "scalar", "no-channels", "too-short"],
)
def test_invalid_audio_raises(y: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        hpss(y)  # type: ignore[arg-type]
