"""Moving audio between the object store and numpy, for every worker.

Workers never receive audio over gRPC: they fetch an object key into a scratch folder,
decode it, compute, and publish results as tracks (written file → sha256, loudness, put).
:class:`Outputs` records what a request wrote so a failure or cancel removes it again —
no half-written results are left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import tempfile
from pathlib import Path
from types import TracebackType

import numpy as np
import soundfile as sf

from audiomesh.audio.io import LOSSY_FORMATS, AudioInfo, file_sha256, probe, read_audio, write_audio
from audiomesh.audio.stream import ArraySource, ClosableSource, SoundFileSource, measure_file
from audiomesh.dsp.loudness import Measurement, measure
from audiomesh.errors import InvalidInput
from audiomesh.store import ObjectStore
from audiomesh.v1 import common_pb2

# encoding enum -> (container, soundfile subtype, file extension)
ENCODINGS: dict[int, tuple[str, str, str]] = {
    common_pb2.AUDIO_ENCODING_UNSPECIFIED: ("wav", "PCM_16", ".wav"),
    common_pb2.AUDIO_ENCODING_WAV_PCM16: ("wav", "PCM_16", ".wav"),
    common_pb2.AUDIO_ENCODING_WAV_PCM24: ("wav", "PCM_24", ".wav"),
    common_pb2.AUDIO_ENCODING_WAV_FLOAT32: ("wav", "FLOAT", ".wav"),
    common_pb2.AUDIO_ENCODING_FLAC_PCM16: ("flac", "PCM_16", ".flac"),
    common_pb2.AUDIO_ENCODING_FLAC_PCM24: ("flac", "PCM_24", ".flac"),
    common_pb2.AUDIO_ENCODING_MP3: ("mp3", "MPEG_LAYER_III", ".mp3"),
}
# Intermediate tracks keep full precision so sums and gains downstream are exact. Only the
# normalize stage writes the job's encoding (MP3 included): what users download.
INTERMEDIATE = common_pb2.AUDIO_ENCODING_WAV_FLOAT32
SILENCE_LUFS = -200.0  # how -inf loudness is stored in messages and manifests


def encoding_spec(encoding: int) -> tuple[str, str, str]:
    """``(container, soundfile subtype, extension)`` of an encoding; InvalidInput for an unknown one."""
    if encoding not in ENCODINGS:
        names = ", ".join(common_pb2.AudioEncoding.keys()[1:])
        raise InvalidInput(f"unknown encoding {encoding}; use one of {names}")
    return ENCODINGS[encoding]


def encoding_by_name(name: str) -> common_pb2.AudioEncoding.ValueType:
    return common_pb2.AudioEncoding.Value("AUDIO_ENCODING_" + name.upper())


def extension(encoding: int) -> str:
    return ENCODINGS[encoding][2]


def loudness_pb(m: Measurement) -> common_pb2.Loudness:
    def finite(x: float) -> float:
        return x if math.isfinite(x) else SILENCE_LUFS

    return common_pb2.Loudness(
        integrated_lufs=finite(m.integrated_lufs),
        sample_peak_dbfs=finite(m.sample_peak_dbfs),
        true_peak_dbtp=finite(m.true_peak_dbtp),
    )


def audio_info_pb(info: AudioInfo) -> common_pb2.AudioInfo:
    return common_pb2.AudioInfo(
        format=info.format,
        subtype=info.subtype or "",
        sample_rate=info.sample_rate,
        channels=info.channels,
        frames=info.frames,
        duration_seconds=info.duration_s,
    )


def measurement_from_pb(loudness: common_pb2.Loudness) -> Measurement:
    """The inverse of :func:`loudness_pb` (``SILENCE_LUFS`` and below → ``-inf``)."""

    def level(x: float) -> float:
        return float("-inf") if x <= SILENCE_LUFS else float(x)

    return Measurement(
        integrated_lufs=level(loudness.integrated_lufs),
        sample_peak_dbfs=level(loudness.sample_peak_dbfs),
        true_peak_dbtp=level(loudness.true_peak_dbtp),
    )


def open_source(
    store: ObjectStore,
    key: str,
    workdir: Path,
    *,
    sample_rate: int | None = None,
    channels: int | None = None,
) -> ClosableSource:
    """Download ``key`` into ``workdir`` and open it for reading in blocks (see :func:`open_local`).

    Close the source when done.
    """
    fd, name = tempfile.mkstemp(prefix="in-", suffix=Path(key).suffix, dir=workdir)
    os.close(fd)
    local = Path(name)
    try:
        store.get_to_file(key, local)
        return open_local(local, sample_rate=sample_rate, channels=channels)
    except BaseException:
        local.unlink(missing_ok=True)
        raise


def open_local(path: Path, *, sample_rate: int | None = None, channels: int | None = None) -> ClosableSource:
    """A WAV or FLAC file already at ``sample_rate`` and ``channels`` (``None``: any) is read in
    place (:class:`SoundFileSource`: nothing held in memory; every intermediate track is one);
    anything else is decoded and converted into memory (:class:`ArraySource`) and the file deleted.
    """
    info = probe(path)  # validates (truncated WAV, no samples, not audio) with a clear message
    if (
        info.format in ("WAV", "WAVEX", "FLAC")
        and sample_rate in (None, info.sample_rate)
        and channels in (None, info.channels)
    ):
        with contextlib.suppress(sf.LibsndfileError, RuntimeError):
            return SoundFileSource(path)
    y, rate = read_audio(path, sample_rate=sample_rate, channels=channels)
    Path(path).unlink(missing_ok=True)
    return ArraySource(y, rate)


def _decoded_frames(path: Path) -> int:
    with sf.SoundFile(str(path)) as f:
        return sum(len(block) for block in f.blocks(1 << 17, dtype="float32"))


class Outputs:
    """Publishes tracks and remembers their keys; ``discard()`` deletes them all."""

    def __init__(self, store: ObjectStore, workdir: Path) -> None:
        self.store = store
        self.workdir = Path(workdir)
        self.keys: list[str] = []
        self._names = itertools.count()

    def publish(
        self, name: str, key: str, y: np.ndarray, sample_rate: int, encoding: int, *, bitrate_kbps: int | None = None
    ) -> common_pb2.Track:
        """Encode ``y`` and publish it as ``key``, measured as float samples (a lossy encoding: decoded)."""
        fmt, subtype, ext = ENCODINGS[encoding]
        local = self.scratch_path(ext)
        write_audio(local, y, sample_rate, fmt=fmt, subtype=subtype, bitrate_kbps=bitrate_kbps)
        levels = measure_file(local)[0] if fmt in LOSSY_FORMATS else measure(y, sample_rate)
        return self.publish_file(name, key, local, levels)

    def scratch_path(self, ext: str) -> Path:
        """A new file name in the scratch folder (safe from several threads)."""
        return self.workdir / f"out-{next(self._names)}{ext}"

    def publish_file(self, name: str, key: str, local: Path, loudness: Measurement | None) -> common_pb2.Track:
        """Publish an encoded file as ``key`` (then delete it) → its :class:`Track`.

        ``loudness`` is the measurement of what was written (its float samples; a lossy file's
        as it decodes, see :class:`~audiomesh.audio.stream.TrackWriter`); None: not measured.
        """
        info = probe(local)
        if info.format.lower() in LOSSY_FORMATS:
            # The header's frame count can be an estimate (an MP3 without LAME's gapless header):
            # the duration recorded is the one a decoder gets.
            frames = _decoded_frames(local)
            info = dataclasses.replace(info, frames=frames, duration_s=frames / info.sample_rate)
        track = common_pb2.Track(
            name=name,
            key=key,
            sha256=file_sha256(local),
            size_bytes=local.stat().st_size,
            audio=audio_info_pb(info),
            loudness=None if loudness is None else loudness_pb(loudness),
        )
        self.keys.append(key)  # before the upload: discard() removes a partial one too
        self.store.put_file(key, local)
        local.unlink(missing_ok=True)
        return track

    def discard(self) -> None:
        for key in self.keys:
            self.store.delete(key)
        self.keys.clear()

    def __enter__(self) -> Outputs:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Failed or cancelled (any exception, KeyboardInterrupt included): remove what was written.
        if exc_type is not None:
            self.discard()
