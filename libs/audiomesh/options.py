"""Job options as protobuf messages → keyword arguments of the pure kernels, defaults filled.

Shared by the workers (which run the kernels) and the orchestrator (which checks a job's
options when it is created, so a bad option fails the request instead of the job later).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

from audiomesh import errors, ranges
from audiomesh.config import Settings
from audiomesh.dsp import hpss as hpss_kernel
from audiomesh.dsp import normalize as normalize_kernel
from audiomesh.separation.base import ModelInfo, Origin, SeparationOptions
from audiomesh.v1 import common_pb2, orchestrator_pb2, separation_pb2

_MODES = {
    common_pb2.NORMALIZE_MODE_UNSPECIFIED: None,  # the configured default
    common_pb2.NORMALIZE_MODE_LOUDNESS: "loudness",
    common_pb2.NORMALIZE_MODE_PEAK: "peak",
    common_pb2.NORMALIZE_MODE_OFF: "off",
}


def check_job_options(pb: orchestrator_pb2.JobOptions) -> None:
    """Every option against its range in :data:`audiomesh.ranges.RANGES` that needs no model
    or settings (the rest: :func:`check_separation_options`, :func:`normalization`)."""
    ranges.check("model", pb.model)
    ranges.check("main_stems", pb.main_stems)
    ranges.check("mp3_bitrate_kbps", pb.mp3_bitrate_kbps)
    if pb.mp3_bitrate_kbps and pb.encoding != common_pb2.AUDIO_ENCODING_MP3:
        # Silently ignoring it would deliver WAV/FLAC to a client that asked for an MP3 rate.
        raise errors.InvalidInput(
            f"mp3_bitrate_kbps applies to AUDIO_ENCODING_MP3 only; this job's encoding is "
            f"{common_pb2.AudioEncoding.Name(pb.encoding)}: drop mp3_bitrate_kbps or set encoding to AUDIO_ENCODING_MP3"
        )
    separation_options(pb.separation)
    hpss_kwargs(pb.hpss)


def resolve_encoding(pb: orchestrator_pb2.JobOptions, settings: Settings) -> None:
    """Fill ``pb.encoding`` with the configured one when unset and, for MP3, the default bitrate
    (so a job's manifest records what its tracks were written with); checked."""
    if not pb.encoding:
        pb.encoding = common_pb2.AudioEncoding.Value("AUDIO_ENCODING_" + settings.output_encoding.upper())
    if pb.encoding not in common_pb2.AudioEncoding.values():
        names = ", ".join(common_pb2.AudioEncoding.keys()[1:])
        raise errors.InvalidInput(f"unknown encoding {pb.encoding}; use one of {names}")
    ranges.check("mp3_bitrate_kbps", pb.mp3_bitrate_kbps)
    if pb.mp3_bitrate_kbps and pb.encoding != common_pb2.AUDIO_ENCODING_MP3:
        # Silently ignoring it would deliver WAV/FLAC to a client that asked for an MP3 rate.
        raise errors.InvalidInput(
            f"mp3_bitrate_kbps applies to AUDIO_ENCODING_MP3 only; this job's encoding is "
            f"{common_pb2.AudioEncoding.Name(pb.encoding)}: drop mp3_bitrate_kbps or set encoding to AUDIO_ENCODING_MP3"
        )
    if pb.encoding == common_pb2.AUDIO_ENCODING_MP3 and not pb.mp3_bitrate_kbps:
        pb.mp3_bitrate_kbps = ranges.DEFAULT_MP3_BITRATE_KBPS


def separation_options(pb: common_pb2.SeparationOptions) -> SeparationOptions:
    """The model layer's options, range-checked; check them against a model with ``.validate(model_or_info)``."""
    for name in ("shifts", "overlap", "segment_seconds"):
        if pb.HasField(name):
            ranges.check(f"separation.{name}", getattr(pb, name))
    ranges.check("separation.two_stems", pb.two_stems)
    kwargs: dict = {"two_stems": pb.two_stems or None}
    if pb.HasField("shifts"):
        kwargs["shifts"] = pb.shifts
    if pb.HasField("overlap"):
        kwargs["overlap"] = pb.overlap
    if pb.HasField("segment_seconds"):
        kwargs["segment"] = pb.segment_seconds
    return SeparationOptions(**kwargs)


def check_options_for_kind(pb: common_pb2.SeparationOptions, kind: str, name: str) -> None:
    """What a model family cannot honour is refused, not ignored. A RoFormer runs its config's
    chunks and overlap (Music-Source-Separation-Training's demix) in one pass: no Demucs shifts,
    and no overlap other than its config's (``segment_seconds`` sets its chunk size, exactly as
    the config's ``inference.chunk_size`` would)."""
    if kind != "roformer":
        return
    if pb.HasField("shifts") and pb.shifts > 1:
        raise errors.InvalidInput(
            f"separation.shifts {pb.shifts}: model {name!r} is a RoFormer, which runs one pass (shifts is a "
            "Demucs option); leave shifts unset, 0 or 1"
        )
    if pb.HasField("overlap"):
        raise errors.InvalidInput(
            f"separation.overlap: model {name!r} is a RoFormer, whose overlap comes from its config "
            "(inference.num_overlap); leave it unset"
        )


def check_separation_options(pb: common_pb2.SeparationOptions, info: separation_pb2.ModelInfo) -> None:
    """Validate against a model described by the separation worker's ListModels."""
    check_options_for_kind(pb, info.kind, info.name)
    described = ModelInfo(
        name=info.name,
        sources=tuple(info.sources),
        sample_rate=info.sample_rate,
        audio_channels=info.audio_channels,
        origin=cast(Origin, info.origin),  # the worker's ListModels reports one of Origin's names
        max_segment=info.max_segment_seconds if info.HasField("max_segment_seconds") else None,
    )
    separation_options(pb).validate(described)


def check_model_options(pb: orchestrator_pb2.JobOptions, info: separation_pb2.ModelInfo) -> None:
    """A job's options against its model: the separation options, and that the delivered
    encoding can hold the model's rate and channels (MP3 stores 8-48 kHz, 1-2 channels), so a
    job that could not be written fails at creation, not after minutes of separation."""
    check_separation_options(pb.separation, info)
    if pb.encoding == common_pb2.AUDIO_ENCODING_MP3:
        from audiomesh.audio.io import encoder_options

        try:
            encoder_options("mp3", "MPEG_LAYER_III", info.sample_rate, info.audio_channels or 2)
        except errors.InvalidInput as exc:
            raise errors.InvalidInput(
                f"MP3 output (encoding AUDIO_ENCODING_MP3): model {info.name!r} separates at {info.sample_rate} Hz; {exc}"
            ) from None


def hpss_kwargs(pb: common_pb2.HpssOptions) -> dict:
    """Keyword arguments of :func:`audiomesh.dsp.hpss.hpss` (defaults = librosa's); checked."""
    for name in ("kernel_size_harmonic", "kernel_size_percussive", "n_fft", "hop_length"):
        ranges.check(f"hpss.{name}", getattr(pb, name))
    optional: tuple[Literal["margin_harmonic", "margin_percussive", "power"], ...]
    optional = ("margin_harmonic", "margin_percussive", "power")  # HasField takes the field names as literals
    for name in optional:
        if pb.HasField(name):
            ranges.check(f"hpss.{name}", getattr(pb, name))
    if pb.hop_length > (pb.n_fft or 2048):
        raise errors.InvalidInput(
            f"hpss.hop_length must be <= hpss.n_fft ({pb.n_fft or 2048}): frames further apart than a window "
            f"leave gaps; got {pb.hop_length}"
        )
    n_fft = pb.n_fft or 2048
    kwargs: dict[str, Any] = {
        "kernel_size": (pb.kernel_size_harmonic or 31, pb.kernel_size_percussive or 31),
        "margin": (
            pb.margin_harmonic if pb.HasField("margin_harmonic") else 1.0,
            pb.margin_percussive if pb.HasField("margin_percussive") else 1.0,
        ),
        "power": pb.power if pb.HasField("power") else 2.0,
        "n_fft": n_fft,
        "hop_length": pb.hop_length or n_fft // 4,
    }
    hpss_kernel.check_options(**kwargs)
    return kwargs


@dataclass(frozen=True)
class Normalization:
    mode: str  # loudness | peak | off
    target: float
    ceiling_dbtp: float
    linked: bool


def normalization(pb: common_pb2.NormalizeOptions, settings: Settings) -> Normalization:
    """Resolve a job's normalization against the configured defaults; checked."""
    if pb.mode not in _MODES:
        raise errors.InvalidInput(f"unknown normalize mode {pb.mode}; use LOUDNESS, PEAK or OFF")
    mode = _MODES[pb.mode] or settings.normalize_mode
    if pb.HasField("target"):
        target = pb.target
    elif mode == "peak" and settings.normalize_mode != "peak":
        target = -1.0  # the configured target is a loudness; a peak job gets a peak default
    else:
        target = settings.target_db
    ceiling = pb.true_peak_ceiling_dbtp if pb.HasField("true_peak_ceiling_dbtp") else settings.true_peak_ceiling_db
    if pb.linking == common_pb2.GAIN_LINKING_UNSPECIFIED:
        linked = settings.gain_linking == "linked"
    elif pb.linking in (common_pb2.GAIN_LINKING_LINKED, common_pb2.GAIN_LINKING_PER_TRACK):
        linked = pb.linking == common_pb2.GAIN_LINKING_LINKED
    else:
        raise errors.InvalidInput(f"unknown gain linking {pb.linking}; use LINKED or PER_TRACK")
    if pb.HasField("target"):
        ranges.check("normalize.target", target, ranges.target_range(mode))
    if pb.HasField("true_peak_ceiling_dbtp"):
        ranges.check("normalize.true_peak_ceiling_dbtp", ceiling)
    if mode != "off":
        normalize_kernel.check_options(mode, target, ceiling)
    return Normalization(mode=mode, target=target, ceiling_dbtp=ceiling, linked=linked)
