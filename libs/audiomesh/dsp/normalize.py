"""Gain rules for loudness/peak normalization with a true-peak ceiling.

Two modes set the level a signal is brought to:

- ``"loudness"``: integrated loudness (ITU-R BS.1770-4) reaches ``target`` LUFS (default −14);
- ``"peak"``: the sample peak reaches ``target`` dBFS.

Either way the gain is then lowered, if needed, so that the true peak (4× oversampled)
stays at or below ``ceiling_dbtp`` (default −1 dBTP). Gains are never raised to meet the
ceiling.

*Linked* normalization (the default of a job) computes one gain from a reference — the mix
— and applies it to every track, so stems that summed to the mix still sum to the
normalized mix; *per-track* normalization gives each track its own gain.

The functions take `audiomesh.dsp.loudness.Measurement` values, not audio: measure once,
decide gains, apply with `apply_gain_db`. Pure functions, no I/O. `normalize_gains` is the
whole policy of the normalize worker (modes including ``"off"``, linked or per-track, whether
the ceiling lowered the linked gain); `choose_reference` says which input is the reference.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from audiomesh.dsp.loudness import Measurement
from audiomesh.errors import InvalidInput

__all__ = [
    "MODES",
    "DEFAULT_TARGET_LUFS",
    "DEFAULT_CEILING_DBTP",
    "OFF",
    "Gains",
    "after_gain",
    "apply_gain_db",
    "choose_reference",
    "linked_gain_db",
    "normalize_gains",
    "per_track_gain_db",
]

#: Normalization modes, in the order they are documented.
MODES = ("loudness", "peak")
DEFAULT_TARGET_LUFS = -14.0
DEFAULT_CEILING_DBTP = -1.0
#: The mode of a job that keeps its levels (every gain 0 dB); `normalize_gains` accepts it.
OFF = "off"


def per_track_gain_db(
    m: Measurement,
    *,
    mode: str = "loudness",
    target: float = DEFAULT_TARGET_LUFS,
    ceiling_dbtp: float | None = DEFAULT_CEILING_DBTP,
) -> float:
    """Gain in dB that brings one track to ``target``, limited by the true-peak ceiling.

    Parameters
    ----------
    m : Measurement
        The track's levels before gain.
    mode : {"loudness", "peak"}
        ``"loudness"``: reach ``target`` LUFS integrated; ``"peak"``: reach ``target`` dBFS
        sample peak.
    target : float, finite
        Target level in LUFS (``"loudness"``) or dBFS (``"peak"``).
    ceiling_dbtp : float, finite, or None
        The true peak after gain must not exceed this (dBTP); ``None`` disables the ceiling.

    Returns
    -------
    gain_db : float
        ``min(target - level, ceiling_dbtp - m.true_peak_dbtp)``. A track whose level is
        ``-inf`` (silence, or too short to measure) gets 0 dB.

    Raises
    ------
    audiomesh.errors.InvalidInput
        If ``mode`` is not one of `MODES` or a level is not finite.

    Examples
    --------
    >>> from audiomesh.dsp.loudness import Measurement
    >>> from audiomesh.dsp.normalize import per_track_gain_db
    >>> quiet = Measurement(integrated_lufs=-20.0, sample_peak_dbfs=-8.0, true_peak_dbtp=-7.5)
    >>> per_track_gain_db(quiet)
    6.0
    >>> per_track_gain_db(quiet, mode="peak", target=-1.0)  # +7 dB would pass -1 dBTP
    6.5
    """
    mode, target, ceiling_dbtp = check_options(mode, target, ceiling_dbtp)
    _check_measurement(m, "m")
    return _gain(_level(m, mode), target, [m], ceiling_dbtp)


def linked_gain_db(
    reference: Measurement,
    tracks: Sequence[Measurement],
    *,
    mode: str = "loudness",
    target: float = DEFAULT_TARGET_LUFS,
    ceiling_dbtp: float | None = DEFAULT_CEILING_DBTP,
) -> float:
    """One gain in dB for a reference and all its tracks, limited by the true-peak ceiling.

    Parameters
    ----------
    reference : Measurement
        Levels of the signal the target applies to — the mix.
    tracks : sequence of Measurement
        Levels of every track that will receive the same gain (stems, composites).
    mode : {"loudness", "peak"}
        ``"loudness"``: the reference reaches ``target`` LUFS; ``"peak"``: its sample peak
        reaches ``target`` dBFS.
    target : float, finite
        Target level in LUFS or dBFS.
    ceiling_dbtp : float, finite, or None
        No track, nor the reference, may have a true peak above this after gain (dBTP);
        ``None`` disables the ceiling.

    Returns
    -------
    gain_db : float
        ``min(target - level(reference), ceiling_dbtp - max true peak)``.

    Raises
    ------
    audiomesh.errors.InvalidInput
        If ``mode`` is not one of `MODES` or a level is not finite.

    Notes
    -----
    A reference whose level is ``-inf`` (silent, or too short to measure) has no gain that
    reaches the target: its base gain is 0 dB. The ceiling still applies — a silent mix
    of loud stems (e.g. stems that cancel) is attenuated so the stems stay under it.
    Silent tracks (true peak ``-inf``) never limit the gain.

    Applying one gain to everything keeps sums: if ``sum(stems) == mix`` then
    ``sum(apply_gain_db(s, g) for s in stems) == apply_gain_db(mix, g)`` up to rounding.

    Examples
    --------
    >>> from audiomesh.dsp.loudness import Measurement
    >>> from audiomesh.dsp.normalize import linked_gain_db
    >>> mix = Measurement(integrated_lufs=-20.0, sample_peak_dbfs=-6.0, true_peak_dbtp=-5.8)
    >>> drums = Measurement(integrated_lufs=-24.0, sample_peak_dbfs=-4.2, true_peak_dbtp=-4.0)
    >>> linked_gain_db(mix, [drums])  # 6 dB would put the drums at +2 dBTP
    3.0
    """
    mode, target, ceiling_dbtp = check_options(mode, target, ceiling_dbtp)
    _check_measurement(reference, "reference")
    if isinstance(tracks, Measurement) or not isinstance(tracks, Sequence):
        raise InvalidInput("tracks must be a sequence of Measurement (it may be empty)")
    for i, track in enumerate(tracks):
        _check_measurement(track, f"tracks[{i}]")
    return _gain(_level(reference, mode), target, [reference, *tracks], ceiling_dbtp)


@dataclass(frozen=True)
class Gains:
    """What `normalize_gains` decides.

    Attributes
    ----------
    gains_db : tuple of float
        The gain of each track, in the order the tracks were given.
    linked_gain_db : float
        The one gain every track shares when linked; 0.0 per-track or ``"off"``.
    limited_by_ceiling : bool
        True exactly when the true-peak ceiling lowered the linked gain below the one that
        brings the reference to the target (never per-track or ``"off"``).
    """

    gains_db: tuple[float, ...]
    linked_gain_db: float
    limited_by_ceiling: bool


def normalize_gains(
    tracks: Sequence[Measurement],
    reference: Measurement,
    *,
    mode: str = "loudness",
    target: float = DEFAULT_TARGET_LUFS,
    ceiling_dbtp: float | None = DEFAULT_CEILING_DBTP,
    linked: bool = True,
) -> Gains:
    """The gains that normalize a set of tracks: the normalize worker's policy, on measurements.

    Parameters
    ----------
    tracks : sequence of Measurement
        Each track's levels before gain.
    reference : Measurement
        Levels of the signal a linked target applies to (the mix; see `choose_reference`).
        Unused per-track and with ``"off"``.
    mode : {"loudness", "peak", "off"}
        As in `linked_gain_db`; ``"off"`` keeps every level (all gains 0 dB, nothing checked
        but the measurements).
    target : float, finite
        Target level in LUFS (``"loudness"``) or dBFS (``"peak"``).
    ceiling_dbtp : float, finite, or None
        True-peak ceiling in dBTP; ``None`` disables it.
    linked : bool
        True: one gain for all, `linked_gain_db` of the reference and every track. False:
        `per_track_gain_db` of each track.

    Returns
    -------
    gains : Gains
        Per-track gains, the shared linked gain, and whether the ceiling lowered it.

    Raises
    ------
    audiomesh.errors.InvalidInput
        If ``mode`` is not ``"off"`` or one of `MODES`, or a level or option is not finite.

    Examples
    --------
    >>> from audiomesh.dsp.loudness import Measurement
    >>> from audiomesh.dsp.normalize import normalize_gains
    >>> mix = Measurement(integrated_lufs=-20.0, sample_peak_dbfs=-6.0, true_peak_dbtp=-5.8)
    >>> drums = Measurement(integrated_lufs=-24.0, sample_peak_dbfs=-4.2, true_peak_dbtp=-4.0)
    >>> normalize_gains([drums], mix)  # +6 dB would put the drums at +2 dBTP
    Gains(gains_db=(3.0,), linked_gain_db=3.0, limited_by_ceiling=True)
    >>> normalize_gains([drums], mix, linked=False)
    Gains(gains_db=(3.0,), linked_gain_db=0.0, limited_by_ceiling=False)
    """
    if isinstance(tracks, Measurement) or not isinstance(tracks, Sequence):
        raise InvalidInput("tracks must be a sequence of Measurement (it may be empty)")
    if mode == OFF:
        for i, track in enumerate(tracks):
            _check_measurement(track, f"tracks[{i}]")
        return Gains(tuple(0.0 for _ in tracks), 0.0, False)
    if not linked:
        gains = tuple(per_track_gain_db(m, mode=mode, target=target, ceiling_dbtp=ceiling_dbtp) for m in tracks)
        return Gains(gains, 0.0, False)
    shared = linked_gain_db(reference, tracks, mode=mode, target=target, ceiling_dbtp=ceiling_dbtp)
    unbounded = linked_gain_db(reference, [], mode=mode, target=target, ceiling_dbtp=None)
    # A tolerance, not `<`: the two gains come from different sums of the same floats.
    return Gains(tuple(shared for _ in tracks), shared, shared < unbounded - 1e-9)


def choose_reference(input_keys: Sequence[str], reference_key: str = "") -> tuple[str, int | None]:
    """Which input a linked gain is computed from.

    Parameters
    ----------
    input_keys : sequence of str
        The object keys of the tracks to normalize, in request order (at least one).
    reference_key : str
        The reference asked for (the mix); ``""``: the first track's input.

    Returns
    -------
    key : str
        The reference's object key.
    index : int or None
        The first track whose input is that key (its measurement is the reference's: reuse
        it), or None when the reference is none of the tracks (measure it on its own).

    Examples
    --------
    >>> from audiomesh.dsp.normalize import choose_reference
    >>> choose_reference(["drums.wav", "mix.wav"], "mix.wav")
    ('mix.wav', 1)
    >>> choose_reference(["drums.wav"])
    ('drums.wav', 0)
    >>> choose_reference(["drums.wav"], "mix.wav")
    ('mix.wav', None)
    """
    if not input_keys:
        raise InvalidInput("at least one input key is required to choose a reference")
    key = reference_key or input_keys[0]
    return key, next((i for i, k in enumerate(input_keys) if k == key), None)


def after_gain(before: Measurement, gain_db: float, measured: Measurement) -> Measurement:
    """The levels of a track after ``gain_db``, from its true peak before and a cheap measure after.

    Upsampling is linear, so the true peak after a gain is the one before plus the gain (up
    to float rounding): a writer measures only loudness and sample peak after the gain
    (``true_peak=False``, the costly 4x upsampling skipped) and this completes it.

    Parameters
    ----------
    before : Measurement
        The track before gain (its true peak is used).
    gain_db : float
        The gain applied.
    measured : Measurement
        The track after gain, measured without true peak (its true peak is its sample peak).

    Returns
    -------
    after : Measurement
        ``measured`` with true peak ``max(measured.sample_peak_dbfs, before.true_peak_dbtp +
        gain_db)`` (never below the sample peak).
    """
    true_peak = max(measured.sample_peak_dbfs, before.true_peak_dbtp + gain_db)
    return replace(measured, true_peak_dbtp=true_peak)


def apply_gain_db(y: np.ndarray, gain_db: float) -> np.ndarray:
    """Return ``y`` scaled by ``gain_db`` decibels, in ``y``'s dtype.

    Parameters
    ----------
    y : np.ndarray [shape=(..., n)], floating point
        Audio.
    gain_db : float, finite
        Gain in dB; amplitude factor ``10 ** (gain_db / 20)``.

    Returns
    -------
    y_gain : np.ndarray [shape=(..., n)]
        A new array with ``y``'s dtype. Nothing is clipped: keeping peaks in range is the
        ceiling's job.

    Examples
    --------
    >>> import numpy as np
    >>> from audiomesh.dsp.normalize import apply_gain_db
    >>> apply_gain_db(np.array([0.5, -0.25], dtype=np.float32), -6.020599913279624)
    array([ 0.25 , -0.125], dtype=float32)
    """
    if not isinstance(y, np.ndarray) or not np.issubdtype(y.dtype, np.floating):
        raise InvalidInput("y must be a floating-point numpy.ndarray")
    if not _is_finite_real(gain_db):
        raise InvalidInput(f"gain_db must be a finite number, got {gain_db!r}")
    factor = 10.0 ** (float(gain_db) / 20.0)
    return np.multiply(y, factor, dtype=y.dtype)


# --------------------------------------------------------------------------- helpers


def _gain(level: float, target: float, measured: Sequence[Measurement], ceiling: float | None) -> float:
    gain = target - level if math.isfinite(level) else 0.0
    if ceiling is not None:
        loudest = max(m.true_peak_dbtp for m in measured)
        if math.isfinite(loudest):
            gain = min(gain, ceiling - loudest)
    return float(gain)


def _level(m: Measurement, mode: str) -> float:
    return m.integrated_lufs if mode == "loudness" else m.sample_peak_dbfs


def _is_finite_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_options(mode: Any, target: Any, ceiling_dbtp: Any) -> tuple[str, float, float | None]:
    if mode not in MODES:
        raise InvalidInput(f"mode must be one of {', '.join(repr(m) for m in MODES)}; got {mode!r}")
    if not _is_finite_real(target):
        raise InvalidInput(
            f"target must be a finite level in {'LUFS' if mode == 'loudness' else 'dBFS'}, got {target!r}"
        )
    if ceiling_dbtp is not None and not _is_finite_real(ceiling_dbtp):
        raise InvalidInput(f"ceiling_dbtp must be a finite level in dBTP or None, got {ceiling_dbtp!r}")
    return mode, float(target), None if ceiling_dbtp is None else float(ceiling_dbtp)


def _check_measurement(m: Any, name: str) -> None:
    if not isinstance(m, Measurement):
        raise InvalidInput(f"{name} must be a Measurement, got {type(m).__name__}")
    for field in ("integrated_lufs", "sample_peak_dbfs", "true_peak_dbtp"):
        value = getattr(m, field)
        if not isinstance(value, numbers.Real) or math.isnan(value) or value == math.inf:
            raise InvalidInput(f"{name}.{field} must be a finite level or -inf, got {value!r}")
