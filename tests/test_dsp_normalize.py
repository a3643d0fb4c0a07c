"""audiomesh.dsp.normalize and composite: linked and per-track gains, the true-peak ceiling, mixing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from audiomesh.dsp.composite import mix
from audiomesh.dsp.loudness import Measurement, measure
from audiomesh.dsp.normalize import (
    MODES,
    Gains,
    after_gain,
    apply_gain_db,
    choose_reference,
    linked_gain_db,
    normalize_gains,
    per_track_gain_db,
)
from audiomesh.errors import InvalidInput

SR = 44100


def stems(seconds: float = 3.0, seed: int = 0, drum_level: float = 0.3) -> dict[str, np.ndarray]:
    """Quiet stereo float32 stems: bass and chord tones, decaying noise bursts as drums."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    bass = 0.1 * np.sin(2 * np.pi * 55 * t)
    other = sum(0.03 * np.sin(2 * np.pi * f * t + i) for i, f in enumerate((261.6, 329.6, 392.0)))
    drums = np.zeros(n)
    burst = int(0.05 * SR)
    for start in range(0, n - burst, SR // 4):
        drums[start : start + burst] += (
            drum_level * rng.standard_normal(burst) * np.exp(-np.arange(burst) / (0.01 * SR))
        )
    return {
        "bass": np.stack([bass, bass]).astype(np.float32),
        "other": np.stack([other, 0.6 * other]).astype(np.float32),
        "drums": np.stack([drums, 0.9 * drums]).astype(np.float32),
    }


# --------------------------------------------------------------------------- linked


@pytest.mark.parametrize("target", [-14.0, -23.0])
def test_linked_gain_keeps_stems_summing_to_the_mix(target: float) -> None:
    tracks = stems(drum_level=0.05)  # soft drums: the ceiling does not bind
    mixed = mix(tracks)
    reference = measure(mixed, SR)
    gain = linked_gain_db(reference, [measure(s, SR) for s in tracks.values()], target=target)
    assert gain == pytest.approx(target - reference.integrated_lufs)
    normalized_mix = apply_gain_db(mixed, gain)
    normalized_stems = {name: apply_gain_db(s, gain) for name, s in tracks.items()}
    assert np.abs(mix(normalized_stems) - normalized_mix).max() <= 1e-6
    assert measure(normalized_mix, SR).integrated_lufs == pytest.approx(target, abs=0.1)


def test_ceiling_lowers_the_linked_gain() -> None:
    tracks = stems(drum_level=0.9)  # peaky drums: the loudness target would push them past -1 dBTP
    mixed = mix(tracks)
    reference = measure(mixed, SR)
    measured = [measure(s, SR) for s in tracks.values()]
    gain = linked_gain_db(reference, measured, target=-14.0, ceiling_dbtp=-1.0)
    assert gain < -14.0 - reference.integrated_lufs - 0.5
    for y in [mixed, *tracks.values()]:
        assert measure(apply_gain_db(y, gain), SR).true_peak_dbtp <= -1.0 + 1e-3
    loudest = max(m.true_peak_dbtp for m in [reference, *measured])
    assert gain == pytest.approx(-1.0 - loudest)
    # without a ceiling the target wins
    assert linked_gain_db(reference, measured, ceiling_dbtp=None) == pytest.approx(-14.0 - reference.integrated_lufs)


def test_silent_reference_gets_zero_gain_and_silent_tracks_never_limit() -> None:
    silent = Measurement(-math.inf, -math.inf, -math.inf)
    quiet = Measurement(-30.0, -12.0, -11.5)
    assert linked_gain_db(silent, [silent]) == 0.0
    assert linked_gain_db(silent, [quiet]) == 0.0
    assert linked_gain_db(quiet, [silent]) == pytest.approx(10.5)  # -1 - (-11.5) < -14 - (-30)
    loud = Measurement(-10.0, 0.5, 1.0)  # already past the ceiling: the ceiling still applies
    assert linked_gain_db(silent, [loud]) == pytest.approx(-2.0)


# --------------------------------------------------------------------------- per track


@pytest.mark.parametrize("target", [-14.0, -18.0, -23.0])
@pytest.mark.parametrize("name", ["bass", "other", "drums"])
def test_per_track_reaches_the_loudness_target(name: str, target: float) -> None:
    y = stems(drum_level=0.1)[name]
    gain = per_track_gain_db(measure(y, SR), mode="loudness", target=target, ceiling_dbtp=None)
    assert measure(apply_gain_db(y, gain), SR).integrated_lufs == pytest.approx(target, abs=0.1)


@pytest.mark.parametrize("target", [-1.0, -6.0, -12.0])
def test_peak_mode_reaches_the_target_peak(target: float) -> None:
    y = mix(stems())
    gain = per_track_gain_db(measure(y, SR), mode="peak", target=target, ceiling_dbtp=None)
    assert measure(apply_gain_db(y, gain), SR).sample_peak_dbfs == pytest.approx(target, abs=1e-3)


def test_per_track_ceiling() -> None:
    m = Measurement(integrated_lufs=-20.0, sample_peak_dbfs=-4.0, true_peak_dbtp=-3.5)
    assert per_track_gain_db(m) == pytest.approx(2.5)
    assert per_track_gain_db(m, ceiling_dbtp=None) == pytest.approx(6.0)
    assert per_track_gain_db(m, mode="peak", target=-6.0) == pytest.approx(-2.0)
    assert per_track_gain_db(Measurement(-math.inf, -math.inf, -math.inf)) == 0.0


# --------------------------------------------------------------------------- the worker's policy

SILENT = Measurement(-math.inf, -math.inf, -math.inf)
MIX = Measurement(-20.0, -9.0, -8.8)
DRUMS = Measurement(-24.0, -4.2, -4.0)  # +6 dB would put them at +2 dBTP
BASS = Measurement(-26.0, -12.0, -11.5)


def test_off_keeps_every_level_whatever_the_ceiling() -> None:
    loud = Measurement(-5.0, 3.0, 3.5)  # far past any ceiling: off still leaves it alone
    for linked in (True, False):
        gains = normalize_gains([loud, BASS, SILENT], MIX, mode="off", target=-14.0, ceiling_dbtp=-1.0, linked=linked)
        assert gains == Gains((0.0, 0.0, 0.0), 0.0, False)
    with pytest.raises(InvalidInput, match=r"tracks\[0\] must be a Measurement"):
        normalize_gains([-14.0], MIX, mode="off")  # type: ignore[list-item]


@pytest.mark.parametrize("mode", MODES)
def test_linked_gives_every_track_the_reference_gain_when_the_ceiling_allows(mode: str) -> None:
    target = -14.0 if mode == "loudness" else -3.0
    level = MIX.integrated_lufs if mode == "loudness" else MIX.sample_peak_dbfs
    gains = normalize_gains([BASS, SILENT], MIX, mode=mode, target=target, ceiling_dbtp=-1.0)
    assert gains.linked_gain_db == pytest.approx(target - level)
    assert gains.gains_db == (gains.linked_gain_db, gains.linked_gain_db)
    assert gains.limited_by_ceiling is False


def test_linked_ceiling_lowers_the_shared_gain_and_says_so() -> None:
    gains = normalize_gains([BASS, DRUMS], MIX, target=-14.0, ceiling_dbtp=-1.0)
    assert gains.linked_gain_db == pytest.approx(3.0)  # -1 - (-4.0), not -14 - (-20)
    assert gains.gains_db == (gains.linked_gain_db,) * 2 and gains.limited_by_ceiling is True
    # the reference's own true peak counts too
    hot_mix = Measurement(-20.0, -2.0, -1.5)
    assert normalize_gains([BASS], hot_mix, target=-14.0, ceiling_dbtp=-1.0).limited_by_ceiling is True
    # no ceiling, no limit
    assert normalize_gains([BASS, DRUMS], MIX, ceiling_dbtp=None) == Gains((6.0, 6.0), 6.0, False)


@pytest.mark.parametrize(("ceiling", "limited"), [(2.0, False), (1.9999, True), (2.5, False), (0.0, True)])
def test_limited_exactly_when_the_ceiling_lowered_the_linked_gain(ceiling: float, limited: bool) -> None:
    # Target gain +6 dB puts DRUMS at +2.0 dBTP: a ceiling at 2.0 or above leaves it, any lower cuts it.
    gains = normalize_gains([DRUMS], MIX, target=-14.0, ceiling_dbtp=ceiling)
    assert gains.limited_by_ceiling is limited
    assert gains.linked_gain_db == pytest.approx(min(6.0, ceiling + 4.0))


def test_per_track_gives_each_track_its_own_gain_and_never_reports_a_limit() -> None:
    gains = normalize_gains([BASS, DRUMS, SILENT], MIX, target=-14.0, ceiling_dbtp=-1.0, linked=False)
    assert gains.gains_db == pytest.approx((10.5, 3.0, 0.0))  # bass by the ceiling, drums too, silence 0
    assert gains.linked_gain_db == 0.0 and gains.limited_by_ceiling is False
    assert gains.gains_db == tuple(per_track_gain_db(m, target=-14.0, ceiling_dbtp=-1.0) for m in [BASS, DRUMS, SILENT])


def test_silent_inputs() -> None:
    # A silent reference has no gain that reaches the target: 0 dB, not limited ...
    assert normalize_gains([SILENT, BASS], SILENT) == Gains((0.0, 0.0), 0.0, False)
    # ... but loud tracks under it are still held under the ceiling, and that is a limit.
    loud = Measurement(-10.0, 0.5, 1.0)
    assert normalize_gains([loud], SILENT, ceiling_dbtp=-1.0) == Gains((-2.0,), -2.0, True)
    assert normalize_gains([], MIX, target=-14.0) == Gains((), 6.0, False)


def test_choose_reference() -> None:
    keys = ["drums.wav", "mix.wav", "mix.wav"]
    assert choose_reference(keys, "mix.wav") == ("mix.wav", 1)  # the first item with the key
    assert choose_reference(keys) == ("drums.wav", 0)  # none asked for: the first item's input
    assert choose_reference(keys, "song.wav") == ("song.wav", None)  # not an item: measure it alone
    with pytest.raises(InvalidInput, match="at least one input key"):
        choose_reference([], "mix.wav")


def test_after_gain_adds_the_gain_to_the_true_peak_but_never_below_the_sample_peak() -> None:
    measured = Measurement(-14.0, -3.0, -3.0)  # measured without true peak: true peak = sample peak
    assert after_gain(DRUMS, 2.0, measured) == Measurement(-14.0, -3.0, -2.0)
    assert after_gain(Measurement(-30.0, -10.0, -10.0), 5.0, measured).true_peak_dbtp == -3.0
    assert after_gain(SILENT, 0.0, SILENT) == SILENT


def test_normalize_gains_on_measured_arrays_keeps_the_sum() -> None:
    tracks = stems(drum_level=0.9)
    mixed = mix(tracks)
    gains = normalize_gains([measure(y, SR) for y in tracks.values()], measure(mixed, SR))
    assert gains.limited_by_ceiling  # peaky drums
    out = {name: apply_gain_db(y, g) for (name, y), g in zip(tracks.items(), gains.gains_db, strict=True)}
    assert np.abs(mix(out) - apply_gain_db(mixed, gains.linked_gain_db)).max() <= 1e-6
    assert max(measure(y, SR).true_peak_dbtp for y in out.values()) <= -1.0 + 1e-3


# --------------------------------------------------------------------------- apply_gain_db and mix


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_gain_db_keeps_dtype(dtype: type) -> None:
    y = np.array([[0.5, -0.25]], dtype=dtype)
    out = apply_gain_db(y, 20 * math.log10(0.5))
    assert out.dtype == dtype and np.allclose(out, [[0.25, -0.125]])
    assert out is not y


def test_mix_sums_in_float64_and_keeps_float32() -> None:
    tracks = stems()
    out = mix(tracks)
    assert out.dtype == np.float32
    expected = sum(s.astype(np.float64) for s in tracks.values()).astype(np.float32)
    assert np.array_equal(out, expected)
    assert np.array_equal(mix(list(tracks.values())), out)
    assert mix([tracks["bass"], tracks["drums"].astype(np.float64)]).dtype == np.float64


# --------------------------------------------------------------------------- rules


M = Measurement(-20.0, -6.0, -5.5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: per_track_gain_db(M, mode="rms"), r"mode must be one of 'loudness', 'peak'; got 'rms'"),
        (lambda: linked_gain_db(M, [M], mode="LUFS"), r"mode must be one of 'loudness', 'peak'"),
        (lambda: per_track_gain_db(M, target=float("nan")), r"target must be a finite level in LUFS"),
        (lambda: per_track_gain_db(M, mode="peak", target=math.inf), r"target must be a finite level in dBFS"),
        (lambda: linked_gain_db(M, [M], ceiling_dbtp=math.nan), r"ceiling_dbtp must be a finite level in dBTP or None"),
        (lambda: linked_gain_db(M, M), r"tracks must be a sequence of Measurement"),
        (lambda: linked_gain_db(M, [M, -14.0]), r"tracks\[1\] must be a Measurement, got float"),
        (
            lambda: per_track_gain_db(Measurement(math.nan, 0.0, 0.0)),
            r"m\.integrated_lufs must be a finite level or -inf",
        ),
        (lambda: apply_gain_db(np.zeros(3), math.inf), r"gain_db must be a finite number"),
        (lambda: apply_gain_db(np.zeros(3, dtype=np.int16), 0.0), r"floating-point numpy\.ndarray"),
        (lambda: mix({}), r"mix needs at least one input signal"),
        (lambda: mix([]), r"mix needs at least one input signal"),
        (
            lambda: mix({"bass": np.zeros((2, 10)), "drums": np.zeros((1, 10))}),
            r"input 'drums' has 1 channels but 'bass' has 2",
        ),
        (
            lambda: mix({"bass": np.zeros((2, 10)), "drums": np.zeros((2, 10)), "other": np.zeros((2, 11))}),
            r"input 'other' has 11 samples but 'bass' has 10",
        ),
        (lambda: mix([np.zeros((2, 10)), np.zeros(10)]), r"input 'signals\[1\]' has shape \(10,\)"),
        (lambda: mix({"vocals": np.zeros(3, dtype=np.int32)}), r"input 'vocals' must be a floating-point"),
        (lambda: normalize_gains([M], M, mode="rms"), r"mode must be one of 'loudness', 'peak'; got 'rms'"),
        (lambda: normalize_gains(M, M), r"tracks must be a sequence of Measurement"),
        (lambda: normalize_gains([M], M, linked=False, target=math.nan), r"target must be a finite level"),
    ],
)
def test_invalid_input_raises(call, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        call()


def test_modes_are_documented() -> None:
    assert MODES == ("loudness", "peak")
