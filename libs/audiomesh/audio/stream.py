"""Audio in blocks: random-access sources, and tracks written and measured as they are produced.

For work on songs of any length in bounded memory (see :mod:`audiomesh.separation.chunked` and
:func:`audiomesh.dsp.hpss.hpss_blocks`):

- :class:`MixSource` — ``read(start, stop)`` of a ``(channels, frames)`` signal: an
  :class:`ArraySource` in memory, or a :class:`SoundFileSource` read from a file in place.
- :class:`StreamingMeasure` — :func:`audiomesh.dsp.loudness.measure` (BS.1770 integrated
  loudness, sample peak, 4x true peak) fed block by block, with the same result, from a few
  seconds of state; about twice as fast as measuring the whole array.
- :class:`TrackWriter` — encodes a WAV/FLAC/MP3 file block by block as
  :func:`audiomesh.audio.io.write_audio` would, measuring on the way (MP3: measured decoded,
  :func:`measure_file`).
- :func:`write_tracks` / :func:`write_track` — a stream of blocks (a kernel's output) into
  files, cancellable, all or nothing: what the workers do with what their kernels yield.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np
import scipy.signal
import soundfile as sf

from audiomesh.audio.io import LOSSY_FORMATS, encoder_options
from audiomesh.dsp.loudness import MAX_LOUDNESS_CHANNELS, Measurement, _db, _meter, upsampled_peak
from audiomesh.errors import Cancelled, InvalidInput

__all__ = [
    "BLOCK_FRAMES",
    "ArraySource",
    "MixSource",
    "SoundFileSource",
    "StreamingMeasure",
    "TrackWriter",
    "iter_blocks",
    "measure_file",
    "measure_source",
    "write_track",
    "write_tracks",
]


class MixSource(Protocol):
    """Random access to a mix: ``read(start, stop)`` → float32 ``(channels, stop - start)``."""

    frames: int
    channels: int
    sample_rate: int

    def read(self, start: int, stop: int) -> np.ndarray: ...


class ClosableSource(MixSource, Protocol):
    """A :class:`MixSource` that holds something (an open file): close it, or use it in ``with``."""

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class ArraySource:
    """A mix already in memory, ``(channels, frames)``."""

    def __init__(self, mix: np.ndarray, sample_rate: int) -> None:
        if mix.ndim != 2:
            raise InvalidInput(f"mix must have shape (channels, frames), got {mix.shape}")
        self.mix = np.ascontiguousarray(mix, dtype=np.float32)
        self.channels, self.frames = self.mix.shape
        self.sample_rate = int(sample_rate)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.mix[:, start:stop]

    def close(self) -> None:
        """Nothing to release (for callers that close any source)."""

    def __enter__(self) -> ArraySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SoundFileSource:
    """A mix in a file soundfile reads (WAV, FLAC, ...), read in place: nothing held but the open file.

    Reads are serialised with a lock (one file position).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._file = sf.SoundFile(str(self.path))
        self.channels = int(self._file.channels)
        self.frames = int(self._file.frames)
        self.sample_rate = int(self._file.samplerate)
        self._lock = threading.Lock()

    def read(self, start: int, stop: int) -> np.ndarray:
        with self._lock:
            self._file.seek(start)
            block = self._file.read(stop - start, dtype="float32", always_2d=True)
        if block.shape[0] != stop - start:
            raise InvalidInput(f"{self.path.name}: expected {stop - start} frames at {start}, read {block.shape[0]}")
        return np.ascontiguousarray(block.T)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SoundFileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JoinedSource:
    """Consecutive parts of one signal read as one: ``read`` spans part boundaries.

    The parts must share sample rate and channels (checked: InvalidInput names the first that
    differs). Closing it closes nothing: the caller owns the parts.
    """

    def __init__(self, parts: Sequence[MixSource], names: Sequence[str] | None = None) -> None:
        if not parts:
            raise InvalidInput("a joined input needs at least one part")
        names = list(names) if names is not None else [f"part {i}" for i in range(len(parts))]
        first = parts[0]
        for name, part in zip(names, parts, strict=True):
            if (part.sample_rate, part.channels) != (first.sample_rate, first.channels):
                raise InvalidInput(
                    f"{name} is {part.channels} channels at {part.sample_rate} Hz, but {names[0]} is "
                    f"{first.channels} at {first.sample_rate} Hz: parts of one input must agree"
                )
        self.parts = list(parts)
        self.sample_rate, self.channels = first.sample_rate, first.channels
        self.starts = np.cumsum([0] + [p.frames for p in self.parts])  # part i: [starts[i], starts[i+1])
        self.frames = int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        for i in range(max(first, 0), len(self.parts)):
            lo, hi = int(self.starts[i]), int(self.starts[i + 1])
            if lo >= stop:
                break
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                pieces.append(self.parts[i].read(a - lo, b - lo))
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return np.zeros((self.channels, 0), dtype=np.float32)
        return np.concatenate(pieces, axis=1)


#: Frames per block when a whole source is streamed (~3 s at 44.1 kHz, 1 MiB of stereo float32).
BLOCK_FRAMES = 1 << 17


def iter_blocks(source: MixSource, block_frames: int = BLOCK_FRAMES) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, (channels, n) float32)`` blocks covering ``source`` in order."""
    for start in range(0, source.frames, block_frames):
        yield start, source.read(start, min(start + block_frames, source.frames))


def measure_source(source: MixSource, cancelled: Callable[[], bool] = lambda: False) -> Measurement:
    """:func:`audiomesh.dsp.loudness.measure` of a whole source, read block by block."""
    meter = StreamingMeasure(source.sample_rate, source.channels)
    for _start, block in iter_blocks(source):
        if cancelled():
            raise Cancelled("measuring cancelled")
        if not np.isfinite(block).all():
            raise InvalidInput("the audio to measure must be finite (no NaN or infinity)")
        meter.update(block)
    return meter.result()


def measure_file(path: Path | str, cancelled: Callable[[], bool] = lambda: False) -> tuple[Measurement, int]:
    """:func:`audiomesh.dsp.loudness.measure` of a file as it decodes, read in blocks to its end.

    Returns the measurement and the frames decoded: for an MP3 without LAME's gapless header
    (constant bitrates below 64 kbit/s at 44.1 kHz stereo: the header does not fit in a frame)
    the header's frame count is only an estimate; this is what a player gets.
    """
    with sf.SoundFile(str(path)) as f:
        meter = StreamingMeasure(int(f.samplerate), int(f.channels))
        for block in f.blocks(BLOCK_FRAMES, dtype="float32", always_2d=True):
            if cancelled():
                raise Cancelled("measuring cancelled")
            meter.update(np.ascontiguousarray(block.T))
    return meter.result(), meter.frames


# --------------------------------------------------------------------------- measuring and writing


class StreamingMeasure:
    """:func:`audiomesh.dsp.loudness.measure`, fed block by block in bounded memory.

    Integrated loudness follows ``pyloudnorm.Meter.integrated_loudness`` step for step (the
    K-weighting filters run with carried state, the 400 ms blocks are summed from the same
    samples, the gates are the same code), sample peak is exact, and the 4x true peak upsamples
    each block with 64 frames of context on both sides (the polyphase filter reaches 11), which
    gives the values :func:`~audiomesh.dsp.loudness.upsampled_peak` gives on the whole signal.
    """

    _CONTEXT = 64

    def __init__(self, sample_rate: int, channels: int, *, true_peak: bool = True) -> None:
        if channels > MAX_LOUDNESS_CHANNELS:
            raise InvalidInput(f"loudness is defined for at most {MAX_LOUDNESS_CHANNELS} channels, got {channels}")
        self.rate = sample_rate
        self.channels = channels
        self.meter = _meter(sample_rate)
        self.stages = list(self.meter._filters.values())
        self.states: list[list[np.ndarray | None]] = [[None] * channels for _ in self.stages]
        self.frames = 0
        self.peak = 0.0
        self.upsampled_peak = 0.0
        self.block_size = self.meter.block_size
        self.step = 1.0 - self.meter.overlap
        # Filtered samples from `kept_start` on (those later blocks still need), and block sums.
        self.kept: np.ndarray = np.zeros((0, channels))
        self.kept_start = 0
        self.z: list[np.ndarray] = []
        self.tail = np.zeros((channels, 0), dtype=np.float64)  # last frames, true-peak context
        self.tp_done = 0  # frames whose 4x upsampled values are measured
        # Without true peak (the costly part: 4x upsampling), result() reports the sample peak there.
        self.true_peak = true_peak

    def _bounds(self, j: int) -> tuple[int, int]:
        T_g, step, rate = self.block_size, self.step, self.rate
        return int(T_g * (j * step) * rate), int(T_g * (j * step + 1) * rate)

    def _filter(self, block: np.ndarray) -> np.ndarray:
        out = np.empty((block.shape[1], self.channels))
        for ch in range(self.channels):
            x = block[ch].astype(np.float64)
            for s, stage in enumerate(self.stages):
                zi = self.states[s][ch]
                if zi is None:
                    zi = np.zeros(max(len(stage.a), len(stage.b)) - 1)
                raw, self.states[s][ch] = scipy.signal.lfilter(stage.b, stage.a, x, zi=zi)
                x = stage.passband_gain * raw
            out[:, ch] = x
        return out

    def _blocks(self, available: int) -> None:
        while True:
            lo, hi = self._bounds(len(self.z))
            if hi > available:
                return
            seg = self.kept[lo - self.kept_start : hi - self.kept_start]
            self.z.append(
                np.array(
                    [(1.0 / (self.block_size * self.rate)) * np.sum(np.square(seg[:, i])) for i in range(self.channels)]
                )
            )
            next_lo = self._bounds(len(self.z))[0]
            drop = next_lo - self.kept_start
            if drop > 0:
                self.kept = self.kept[drop:]
                self.kept_start = next_lo

    def _true_peak(self, x: np.ndarray, final: bool) -> None:
        """Upsample what has enough context on both sides (all of it when ``final``)."""
        c = self._CONTEXT
        joined = np.concatenate([self.tail, x.astype(np.float64)], axis=1)
        joined_start = self.frames - self.tail.shape[1]  # first frame of `joined` (before this block)
        start = self.tp_done
        stop = joined_start + joined.shape[1] if final else joined_start + joined.shape[1] - c
        if stop > start:
            lo = max(start - c, joined_start)
            hi = min(stop + c, joined_start + joined.shape[1])
            piece = joined[:, lo - joined_start : hi - joined_start]
            for channel in piece:
                self.upsampled_peak = max(self.upsampled_peak, upsampled_peak(channel, 4, start - lo, stop - lo))
            self.tp_done = stop
        self.tail = joined[:, -2 * c :] if joined.shape[1] > 2 * c else joined

    def update(self, block: np.ndarray) -> None:
        """Add ``(channels, n)`` float samples (finite)."""
        if block.shape[1] == 0:
            return
        self.peak = max(self.peak, float(np.max(np.abs(block))))
        self.kept = np.concatenate([self.kept, self._filter(block)])
        if self.true_peak:
            self._true_peak(block, final=False)
        self.frames += block.shape[1]
        self._blocks(self.frames)

    def result(self) -> Measurement:
        """The :class:`~audiomesh.dsp.loudness.Measurement` of everything fed so far."""
        if self.true_peak:
            self._true_peak(np.zeros((self.channels, 0)), final=True)
        sample_peak = _db(self.peak)
        true_peak = _db(max(self.peak, self.upsampled_peak))
        if self.frames < self.block_size * self.rate:
            return Measurement(float("-inf"), sample_peak, true_peak)
        T = self.frames / self.rate
        num_blocks = int(np.round((T - self.block_size) / (self.block_size * self.step)) + 1)
        z = list(self.z[:num_blocks])
        while len(z) < num_blocks:  # blocks reaching past the end: summed over what there is
            lo, hi = self._bounds(len(z))
            seg = self.kept[max(lo - self.kept_start, 0) : max(hi - self.kept_start, 0)]
            z.append(
                np.array(
                    [(1.0 / (self.block_size * self.rate)) * np.sum(np.square(seg[:, i])) for i in range(self.channels)]
                )
            )
        zz = np.stack(z, axis=1) if z else np.zeros((self.channels, 0))
        G = [1.0, 1.0, 1.0, 1.41, 1.41]
        Gamma_a = -70.0
        channels, j_range = self.channels, range(num_blocks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            loud = [-0.691 + 10.0 * np.log10(np.sum([G[i] * zz[i, j] for i in range(channels)])) for j in j_range]
            J_g = [j for j, l_j in enumerate(loud) if l_j >= Gamma_a]
            z_avg = [np.mean([zz[i, j] for j in J_g]) for i in range(channels)]
            Gamma_r = -0.691 + 10.0 * np.log10(np.sum([G[i] * z_avg[i] for i in range(channels)])) - 10.0
            J_g = [j for j, l_j in enumerate(loud) if (l_j > Gamma_r and l_j > Gamma_a)]
            z_avg = np.nan_to_num(np.array([np.mean([zz[i, j] for j in J_g]) for i in range(channels)]))
        with np.errstate(divide="ignore"):
            lufs = -0.691 + 10.0 * np.log10(np.sum([G[i] * z_avg[i] for i in range(channels)]))
        return Measurement(float(lufs), sample_peak, true_peak)


class TrackWriter:
    """Encode a track to ``path`` block by block (WAV/FLAC/MP3 as :func:`~audiomesh.audio.io.write_audio`
    does: PCM and MP3 clipped to [-1, 1]) and measure it on the way.

    Use it as a context manager: the block closes the file when it ends normally and aborts
    (deletes the partial file) on any exception, ``KeyboardInterrupt`` and cancellation
    included; ``measurement`` holds the result after the block::

        with TrackWriter(path, rate, channels) as writer:
            for block in blocks:
                writer.write(block)
        writer.measurement

    ``write((channels, n) float32)`` any number of times; ``close()`` (what a normal exit
    calls) → the :class:`~audiomesh.dsp.loudness.Measurement` of the float samples written
    (with ``true_peak=False`` its true peak is the sample peak: for callers that know it
    otherwise; with ``measure=False``, None); ``abort()`` closes and deletes the file.

    A lossy format (MP3, ``bitrate_kbps`` as for :func:`~audiomesh.audio.io.encoder_options`)
    is measured as it decodes, after closing (:func:`measure_file`), true peak included whatever
    ``true_peak`` says: the encoder moves peaks, so no level of the samples given describes it.
    """

    def __init__(
        self,
        path: Path | str,
        sample_rate: int,
        channels: int,
        *,
        fmt: str = "wav",
        subtype: str = "FLOAT",
        true_peak: bool = True,
        measure: bool = True,
        bitrate_kbps: int | None = None,
    ):
        options = encoder_options(fmt, subtype, sample_rate, channels, bitrate_kbps=bitrate_kbps)
        self.path = Path(path)
        self.subtype = subtype.upper()
        self.channels = channels
        self.lossy = fmt.lower() in LOSSY_FORMATS
        self.measure_decoded = measure and self.lossy
        live = measure and not self.lossy
        self.measure = StreamingMeasure(sample_rate, channels, true_peak=true_peak) if live else None
        self.frames = 0
        self.measurement: Measurement | None = None  # set by close()
        self._closed = False
        try:
            self._file = sf.SoundFile(str(self.path), "w", **options)
        except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
            raise InvalidInput(f"cannot write {fmt.upper()} {self.subtype} at {sample_rate} Hz: {exc}") from None

    def write(self, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float32)
        if block.shape[0] != self.channels:
            raise InvalidInput(f"expected {self.channels} channels, got a block of shape {block.shape}")
        if not np.isfinite(block).all():
            raise InvalidInput("the audio to write must be finite (no NaN or infinity)")
        if self.measure is not None:
            self.measure.update(block)
        self._file.write((np.clip(block, -1.0, 1.0) if self.subtype != "FLOAT" else block).T)
        self.frames += block.shape[1]

    def close(self) -> Measurement | None:
        """Finish the file → :attr:`measurement` (None with ``measure=False``); again: the same."""
        if not self._closed:
            self._file.close()
            if self.measure_decoded:
                self.measurement = measure_file(self.path)[0]
            else:
                self.measurement = None if self.measure is None else self.measure.result()
            self._closed = True
        return self.measurement

    def abort(self) -> None:
        """Close and delete the file (what a failed or cancelled writer leaves: nothing)."""
        try:
            if not self._file.closed:
                self._file.close()
        finally:
            self.path.unlink(missing_ok=True)  # even when closing failed (a full disk on the last flush)

    def __enter__(self) -> TrackWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()  # a failed finish (disk full) leaves no file either
                raise
        else:
            self.abort()


def write_tracks(
    paths: Sequence[Path],
    blocks: Iterable[Sequence[np.ndarray]],
    sample_rate: int,
    channels: int,
    *,
    fmt: str = "wav",
    subtype: str = "FLOAT",
    true_peak: bool = True,
    measure: bool = True,
    bitrate_kbps: int | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    progress: Callable[[int], None] | None = None,
    what: str = "writing",
) -> list[Measurement | None]:
    """Write a stream of blocks into several tracks at once, all or nothing.

    Parameters
    ----------
    paths : sequence of Path
        One file per track (WAV/FLAC/MP3, ``fmt`` and ``subtype`` as for :class:`TrackWriter`).
    blocks : iterable of sequence of np.ndarray [shape=(channels, n)]
        Consecutive blocks, one per path in each item (e.g. ``(harmonic, percussive)``).
    sample_rate, channels : int
        Of every track.
    true_peak, measure : bool
        As for :class:`TrackWriter`.
    bitrate_kbps : int or None
        MP3's constant bitrate, as for :class:`TrackWriter` (None: 320).
    cancelled : callable
        Asked before each block; True stops with :class:`~audiomesh.errors.Cancelled`
        (``"<what> cancelled"``).
    progress : callable or None
        Called after each block with the frames written so far.

    Returns
    -------
    measurements : list of Measurement or None
        Of each track, in the order of ``paths`` (None with ``measure=False``).

    Any exception (a bad block, a cancel, one from ``blocks`` itself) deletes every file.
    """
    writers: list[TrackWriter] = []
    try:
        with contextlib.ExitStack() as stack:
            for path in paths:
                writer = TrackWriter(
                    path,
                    sample_rate,
                    channels,
                    fmt=fmt,
                    subtype=subtype,
                    true_peak=true_peak,
                    measure=measure,
                    bitrate_kbps=bitrate_kbps,
                )
                writers.append(stack.enter_context(writer))
            for parts in blocks:
                if cancelled():
                    raise Cancelled(f"{what} cancelled")
                for writer, block in zip(writers, parts, strict=True):
                    writer.write(block)
                if progress is not None:
                    progress(writers[0].frames)
    except BaseException:
        for writer in writers:  # one that closed before another failed to: its file goes too
            writer.abort()
        raise
    return [writer.measurement for writer in writers]


def write_track(
    path: Path, blocks: Iterable[np.ndarray], sample_rate: int, channels: int, **kwargs: Any
) -> Measurement | None:
    """:func:`write_tracks` for one track: ``blocks`` yields ``(channels, n)`` arrays."""
    return write_tracks([path], ((block,) for block in blocks), sample_rate, channels, **kwargs)[0]
