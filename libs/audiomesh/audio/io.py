"""Audio file I/O: probe, decode, resample, encode.

Arrays are float32 with shape ``(channels, frames)`` everywhere in audiomesh. Decoding uses
soundfile (libsndfile: WAV, FLAC, OGG, MP3 and friends), identified from the file's
content, not its name; when libsndfile cannot read a file and ``ffmpeg`` is on PATH, ffmpeg
decodes it to a temporary WAV. :func:`probe`, :func:`scan_samples`, :func:`read_audio` and
:func:`decode_blocks` also take a seekable binary file (e.g. ``store.open_seekable(key)``), so a
stored object is checked in place, without a local copy. Errors a user can fix are :class:`~audiomesh.errors.InvalidInput`
with a message that says what is wrong with the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeAlias, cast

import numpy as np
import soundfile as sf
import soxr

from audiomesh import scratch
from audiomesh.errors import InvalidInput, NotFound, UnsupportedAudio
from audiomesh.fsutil import atomic_path
from audiomesh.hashing import file_sha256

__all__ = [
    "scan_samples",
    "AudioInfo",
    "LOSSY_FORMATS",
    "MP3_SAMPLE_RATES",
    "OUTPUT_FORMATS",
    "OUTPUT_SUBTYPES",
    "NOT_AUDIO",
    "SUPPORTED_INPUTS",
    "file_sha256",
    "probe",
    "decode_blocks",
    "encoder_options",
    "read_audio",
    "resample",
    "write_audio",
]

#: What libsndfile reads for us; anything else needs ffmpeg.
SUPPORTED_INPUTS = "WAV, FLAC, OGG, MP3"
#: The words of every "this is not audio" refusal, with or without ffmpeg installed, so
#: clients (and tests) can rely on them whichever decoder was tried.
NOT_AUDIO = "is not a supported audio file"
_LIBSNDFILE_FORMATS = ("WAV", "FLAC", "OGG", "MP3")  # sniffed names of SUPPORTED_INPUTS
OUTPUT_FORMATS = ("wav", "flac", "mp3")
OUTPUT_SUBTYPES = ("PCM_16", "PCM_24", "FLOAT", "MPEG_LAYER_III")
_FLAC_SUBTYPES = ("PCM_16", "PCM_24")
#: Formats whose decoded samples differ from those written: their levels are measured decoded.
LOSSY_FORMATS = ("mp3",)
#: What MPEG-1, 2 and 2.5 Layer III store (libsndfile refuses any other rate).
MP3_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_RESAMPLE_QUALITIES = ("HQ", "VHQ")
_FFMPEG_TIMEOUT_S = 600
_SNIFF_BYTES = 64

#: What the decoding functions read: a path, or a readable, seekable binary file.
Source: TypeAlias = "str | os.PathLike[str] | BinaryIO"


def _is_stream(source: object) -> bool:
    return hasattr(source, "read") and hasattr(source, "seek")


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """What :func:`probe` found.

    ``format`` is the container as libsndfile names it ("WAV", "FLAC", "OGG", "MP3", ...;
    for ffmpeg-decoded files the sniffed or ffprobe name, e.g. "M4A"); ``subtype`` the
    sample encoding ("PCM_16", "VORBIS", ...; the codec name for ffmpeg-decoded files).
    """

    format: str
    subtype: str
    sample_rate: int
    channels: int
    frames: int
    duration_s: float


# --------------------------------------------------------------------------- sniffing


def _sniff(head: bytes) -> tuple[str, str] | None:
    """(short name, description) of a file from its first bytes, or None if unknown."""
    if len(head) >= 12 and head[:4] in (b"RIFF", b"RIFX") and head[8:12] == b"WAVE":
        return "WAV", "a WAV file"
    if head[:4] == b"RF64":
        return "WAV", "an RF64 WAV file"
    if head[:4] == b"fLaC":
        return "FLAC", "a FLAC file"
    if head[:4] == b"OggS":
        return "OGG", "an Ogg file"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF", "an AIFF file"
    if head[4:8] == b"ftyp":
        return "M4A", "an MP4/M4A file (AAC or ALAC audio)"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "WEBM", "a Matroska/WebM file"
    if head[:8] == b"0&\xb2u\x8ef\xcf\x11":
        return "WMA", "an ASF file (WMA/WMV)"
    if head[:5] == b"#!AMR":
        return "AMR", "an AMR file"
    if head[:4] == b"wvpk":
        return "WAVPACK", "a WavPack file"
    if head[:4] == b"MAC ":
        return "APE", "a Monkey's Audio (APE) file"
    if head[:4] == b"%PDF":
        return "PDF", "a PDF document, not audio"
    if head[:4] == b"PK\x03\x04":
        return "ZIP", "a ZIP archive, not audio"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG", "a PNG image, not audio"
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG", "a JPEG image, not audio"
    if head[:3] == b"ID3":
        return "MP3", "an MP3 file"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        if head[1] & 0x06 == 0:  # MPEG "layer 0" is ADTS AAC
            return "AAC", "a raw AAC (ADTS) stream"
        return "MP3", "an MPEG audio (MP3) file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the end of the sniffed bytes is still text.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return None
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "TEXT", "a text file, not audio"
    return None


@contextlib.contextmanager
def _opened(source: Source) -> Iterator[BinaryIO]:
    """``source`` as a binary file at offset 0: a stream is rewound (not closed), a path opened."""
    if _is_stream(source):
        stream: BinaryIO = source  # type: ignore[assignment]
        stream.seek(0)
        yield stream
        stream.seek(0)
    else:
        with open(os.fspath(source), "rb") as f:  # type: ignore[arg-type]
            yield cast(BinaryIO, f)


def _read_head(source: Source) -> bytes:
    with _opened(source) as f:
        return f.read(_SNIFF_BYTES)


def _display(source: Source, name: str | None) -> str:
    if name is not None:
        return repr(name)
    if _is_stream(source):
        return repr(os.path.basename(str(getattr(source, "name", "the stream"))))
    return repr(os.path.basename(os.fspath(source)))  # type: ignore[arg-type]


def _wav_data_chunk(source: Source) -> tuple[int, int] | None:
    """(declared data-chunk size, bytes present after its header) of a RIFF WAVE file."""
    with _opened(source) as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] not in (b"RIFF", b"RIFX") or header[8:12] != b"WAVE":
            return None
        endian = "<" if header[:4] == b"RIFF" else ">"
        file_size = f.seek(0, io.SEEK_END)
        pos = 12
        while pos + 8 <= file_size:
            f.seek(pos)
            chunk = f.read(8)
            (size,) = struct.unpack(endian + "I", chunk[4:8])
            if chunk[:4] == b"data":
                return size, file_size - pos - 8
            pos += 8 + size + (size & 1)
    return None


def _check_wav_complete(source: Source, shown: str) -> None:
    found = _wav_data_chunk(source)
    if found is None:
        return
    declared, present = found
    # 0 and 0xFFFFFFFF are "length unknown" markers written by streaming encoders.
    if declared not in (0, 0xFFFFFFFF) and present < declared:
        raise InvalidInput(
            f"{shown} is a truncated WAV file: its header declares {declared} bytes of audio but only "
            f"{present} are present; the upload or copy was probably cut off"
        )


# --------------------------------------------------------------------------- ffmpeg fallback


def _ffmpeg() -> str | None:
    return shutil.which("ffmpeg")


def _ffprobe_names(path: str) -> tuple[str | None, str | None]:
    """(container name, codec name) from ffprobe, or Nones."""
    ffprobe = shutil.which("ffprobe")
    if not ffprobe:
        return None, None
    cmd = [
        ffprobe, "-v", "error", "-select_streams", "a:0",
        "-show_entries", "format=format_name:stream=codec_name", "-of", "json", path,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        data = json.loads(proc.stdout or b"{}")
    except (OSError, subprocess.SubprocessError, ValueError):
        return None, None
    container = (data.get("format") or {}).get("format_name")
    streams = data.get("streams") or []
    codec = streams[0].get("codec_name") if streams else None
    return (container.split(",")[0].upper() if container else None), (codec.upper() if codec else None)


def _ffmpeg_decode(ffmpeg: str, path: str, out_wav: str, shown: str, sniffed: tuple[str, str] | None) -> None:
    cmd = [
        ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", path,
        "-vn", "-map", "0:a:0", "-c:a", "pcm_f32le", "-f", "wav", "-rf64", "auto", out_wav,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=_FFMPEG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise InvalidInput(f"{shown}: ffmpeg did not finish decoding within {_FFMPEG_TIMEOUT_S} s") from None
    if proc.returncode != 0 or not os.path.exists(out_wav):
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        # ffmpeg names the file by its path (a server's scratch folder): show the user's name.
        detail = lines[-1].replace(path, shown).strip() if lines else f"exit status {proc.returncode}"
        if sniffed and sniffed[0] in _LIBSNDFILE_FORMATS:
            raise _damaged(shown, sniffed, f"ffmpeg: {detail}")  # the same 400 and words as without ffmpeg
        looks = f"; it looks like {sniffed[1]}" if sniffed else ""
        raise UnsupportedAudio(
            f"{shown} {NOT_AUDIO} (neither soundfile nor ffmpeg can decode it){looks} (ffmpeg: {detail})"
        )


@contextlib.contextmanager
def _decodable(source: Source, name: str | None) -> Iterator[tuple[Any, AudioInfo]]:
    """Validate ``source`` and yield (what soundfile can read, its AudioInfo).

    What is yielded is ``source`` itself (a path, or the stream rewound to 0), or the path of
    a temporary WAV decoded by ffmpeg that is removed afterwards.
    """
    shown = _display(source, name)
    if _is_stream(source):
        stream: BinaryIO = source  # type: ignore[assignment]
        size = stream.seek(0, io.SEEK_END)
        stream.seek(0)
        path = None
    else:
        path = os.fspath(source)  # type: ignore[arg-type]
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise NotFound(f"audio file {shown} does not exist") from None
        if os.path.isdir(path):
            raise InvalidInput(f"{shown} is a directory, not an audio file")
    if size == 0:
        raise InvalidInput(f"{shown}: the file is empty (0 bytes)")
    try:
        with _opened(source) if path is None else contextlib.nullcontext(path) as readable:
            info = sf.info(readable)
    except (sf.LibsndfileError, RuntimeError) as exc:
        sniffed = _sniff(_read_head(source))
        ffmpeg = _ffmpeg()
        if ffmpeg is None:
            raise _not_supported(shown, sniffed, exc) from None
        with scratch.workdir("ffmpeg-") as tmp:
            if path is None:
                # ffmpeg reads files, not Python streams: only formats libsndfile cannot read
                # copy a stream (a stored object) to local scratch, for ffmpeg.
                path = os.path.join(tmp, "input")
                with _opened(source) as f, open(path, "wb") as out:
                    shutil.copyfileobj(f, out, 1 << 20)
            wav = os.path.join(tmp, "decoded.wav")
            _ffmpeg_decode(ffmpeg, path, wav, shown, sniffed)
            decoded = sf.info(wav)
            container, codec = _ffprobe_names(path)
            fmt = (sniffed[0] if sniffed else None) or container or "UNKNOWN"
            result = _make_info(decoded, shown, fmt=fmt, subtype=codec or "FFMPEG")
            yield wav, result
        return
    if info.format == "WAV" or info.format == "WAVEX":
        _check_wav_complete(source, shown)
    if path is None:
        stream.seek(0)
    yield (stream if path is None else path), _make_info(info, shown)


def _not_supported(shown: str, sniffed: tuple[str, str] | None, exc: Exception) -> InvalidInput:
    if sniffed and sniffed[0] in _LIBSNDFILE_FORMATS:
        return _damaged(shown, sniffed, _libsndfile_reason(exc))
    looks = f" (it looks like {sniffed[1]})" if sniffed else ""
    return UnsupportedAudio(f"{shown} {NOT_AUDIO} ({SUPPORTED_INPUTS}){looks}; install ffmpeg for other formats")


def _damaged(shown: str, sniffed: tuple[str, str], reason: str) -> InvalidInput:
    """A file that sniffs as a format libsndfile reads but does not decode (whichever decoder tried)."""
    return InvalidInput(
        f"{shown} looks like {sniffed[1]} but cannot be decoded; it is probably damaged or truncated ({reason})"
    )


def _libsndfile_reason(exc: Exception) -> str:
    """libsndfile's reason without the "Error opening '<server path>': " (or "<stream repr>: ") prefix."""
    text = str(exc)
    if text.startswith("Error opening '") and "': " in text:
        return text.rpartition("': ")[2]
    if text.startswith("Error opening <") and ">: " in text:
        return text.partition(">: ")[2]
    return text


def _make_info(info: sf._SoundFileInfo, shown: str, *, fmt: str | None = None, subtype: str | None = None) -> AudioInfo:
    if info.frames <= 0:
        raise InvalidInput(f"{shown} contains no audio samples (0 frames)")
    if info.samplerate <= 0 or info.channels <= 0:
        raise InvalidInput(f"{shown} has an invalid header ({info.samplerate} Hz, {info.channels} channels)")
    return AudioInfo(
        format=fmt or info.format,
        subtype=subtype or info.subtype,
        sample_rate=int(info.samplerate),
        channels=int(info.channels),
        frames=int(info.frames),
        duration_s=float(info.frames) / float(info.samplerate),
    )


# --------------------------------------------------------------------------- public API


def probe(path: Source, *, name: str | None = None) -> AudioInfo:
    """Identify an audio file from its content and check that it is usable.

    Parameters
    ----------
    path : path-like or seekable binary file
        The file. Its extension is ignored; the content decides. A stream (e.g. a stored
        object from ``store.open_seekable``) is read in place; only a format that needs ffmpeg
        is copied to a local temporary file first.
    name : str, optional
        The name to show in error messages (e.g. the user's upload name); default: the
        file's base name.

    Returns
    -------
    info : AudioInfo

    Raises
    ------
    InvalidInput
        The file is empty, is not audio that libsndfile (or ffmpeg, if installed) can
        read, is a truncated WAV, or holds no samples. The message says which.
    NotFound
        ``path`` does not exist.
    """
    with _decodable(path, name) as (_, info):
        return info


def read_audio(
    path: Source,
    *,
    sample_rate: int | None = None,
    channels: int | None = None,
    name: str | None = None,
) -> tuple[np.ndarray, int]:
    """Decode an audio file to float32 samples.

    Parameters
    ----------
    path : path-like
        The file (any format :func:`probe` accepts).
    sample_rate : int, optional
        Resample to this rate (soxr, very high quality) if the file's rate differs.
    channels : int, optional
        Adapt to this many channels: mono is duplicated, stereo is averaged to mono.
        Other conversions raise InvalidInput.
    name : str, optional
        The name to show in error messages.

    Returns
    -------
    y : np.ndarray [shape=(channels, frames), dtype=float32]
    sr : int
        The sample rate of ``y``.

    Raises
    ------
    InvalidInput
        Everything :func:`probe` raises; a decoding failure; NaN or infinite samples; an
        unsupported channel conversion.
    """
    shown = _display(path, name)
    with _decodable(path, name) as (real_path, info):
        try:
            data, sr = sf.read(real_path, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise InvalidInput(
                f"{shown} ({info.format}) could not be decoded; it is probably damaged: {_libsndfile_reason(exc)}"
            ) from None
    y = np.ascontiguousarray(data.T)
    del data
    if y.shape[1] == 0:
        raise InvalidInput(f"{shown} contains no audio samples (0 frames)")
    _check_finite(y, shown, sr)
    if channels is not None and channels < y.shape[0]:
        y = _adapt_channels(y, channels, shown)
    if sample_rate is not None and sample_rate != sr:
        y = resample(y, sr, sample_rate)
        sr = sample_rate
    if channels is not None and channels != y.shape[0]:
        y = _adapt_channels(y, channels, shown)
    return y, int(sr)


def decode_blocks(
    path: Source,
    *,
    sample_rate: int | None = None,
    channels: int | None = None,
    name: str | None = None,
    block_frames: int = 1 << 17,
) -> Iterator[np.ndarray]:
    """:func:`read_audio`, block by block: yields float32 ``(channels, n)`` blocks, in bounded memory.

    The same conversions in the same order (downmix, soxr resampling as a stream — equal to
    resampling the whole signal —, upmix), so the blocks concatenated equal ``read_audio``'s
    result. NaN/infinite samples or an empty file raise `InvalidInput` when they are reached:
    a caller writing the blocks somewhere must remove what it wrote on error.
    """
    shown = _display(path, name)
    with _decodable(path, name) as (real_path, info):
        try:
            with sf.SoundFile(real_path) as f:
                rate, have = int(f.samplerate), int(f.channels)
                mid = have if channels is None or channels >= have else channels
                stream = (
                    soxr.ResampleStream(rate, sample_rate, mid, dtype="float32", quality="VHQ")
                    if sample_rate is not None and sample_rate != rate
                    else None
                )
                frames = 0
                for block in f.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
                    y = _converted(
                        np.ascontiguousarray(block.T), stream, channels, shown, frames, last=False, rate=rate
                    )
                    frames += block.shape[0]
                    if y.shape[1]:
                        yield y
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise InvalidInput(
                f"{shown} ({info.format}) could not be decoded; it is probably damaged: {_libsndfile_reason(exc)}"
            ) from None
    if frames == 0:
        raise InvalidInput(f"{shown} contains no audio samples (0 frames)")
    if stream is not None:
        tail = _converted(np.zeros((mid, 0), np.float32), stream, channels, shown, frames, last=True, rate=rate)
        if tail.shape[1]:
            yield tail


def _converted(
    y: np.ndarray, stream: Any, channels: int | None, shown: str, at: int, *, last: bool, rate: int | None = None
) -> np.ndarray:
    """One block of :func:`decode_blocks`: checked, downmixed, resampled, upmixed."""
    _check_block_finite(y.T, shown, at, rate)
    if channels is not None and channels < y.shape[0]:
        y = _adapt_channels(y, channels, shown)
    if stream is not None:
        y = np.ascontiguousarray(stream.resample_chunk(np.ascontiguousarray(y.T), last=last).T)
    if channels is not None and channels != y.shape[0]:
        y = _adapt_channels(y, channels, shown)
    return y


def _check_finite(y: np.ndarray, shown: str, rate: int | None = None) -> None:
    _check_block_finite(y.T, shown, 0, rate)


def _adapt_channels(y: np.ndarray, channels: int, shown: str) -> np.ndarray:
    have = y.shape[0]
    if channels < 1:
        raise InvalidInput(f"channels must be >= 1, got {channels}")
    if have == channels:
        return y
    if have == 1:
        return np.repeat(y, channels, axis=0)
    if channels == 1:
        return y.mean(axis=0, keepdims=True, dtype=np.float32)
    if channels == 2:
        # Multichannel → stereo: odd-numbered channels (1st, 3rd, …) left, the others right,
        # each side the average of its channels (keeps levels; a plain, documented downmix).
        return np.stack([y[0::2].mean(axis=0, dtype=np.float32), y[1::2].mean(axis=0, dtype=np.float32)])
    raise InvalidInput(
        f"{shown} has {have} channels and {channels} are needed; supported: mono -> any (duplicate), "
        "any -> mono (average), any -> stereo (alternate channels averaged per side)"
    )


def scan_samples(path: Source, *, name: str | None = None, block_frames: int = 1 << 16) -> int:
    """Decode every sample once, in blocks (bounded memory), as a job's decode will.

    Returns the number of frames read. Raises InvalidInput on NaN/Inf samples (naming the
    first bad frame) and on a file that stops decoding part-way or yields fewer frames than
    its header declares (a truncated FLAC, an MP3 with junk in the middle): libsndfile opens
    and probes such files fine and fails only when the damaged part is read. Formats only
    ffmpeg decodes were decoded whole by :func:`probe` and are not read again here. ``path``
    may be a seekable binary file (read from its start).
    """
    shown = _display(path, name)
    if _is_stream(path):
        path.seek(0)  # type: ignore[union-attr]
    try:
        f = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError):
        return 0  # not libsndfile's: probe() decoded it with ffmpeg
    frames = 0
    with f:
        declared, rate, fmt = int(f.frames), int(f.samplerate), f.format
        try:
            for block in f.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
                _check_block_finite(block, shown, frames, rate)
                frames += len(block)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise InvalidInput(
                f"{shown} ({fmt}) stops decoding after {frames / rate:.1f} s of {declared / rate:.1f} s; "
                f"it is probably damaged or truncated ({_libsndfile_reason(exc)})"
            ) from None
    # MP3 frame counts are estimates (libsndfile pads a cut MP3 to it); the others are exact.
    if fmt != "MP3" and frames < declared:
        raise InvalidInput(
            f"{shown} ({fmt}) is truncated: its header declares {declared / rate:.1f} s of audio but only "
            f"{frames / rate:.1f} s could be decoded"
        )
    return frames


def _check_block_finite(block: np.ndarray, shown: str, at: int, rate: int | None = None) -> None:
    """InvalidInput naming the first non-finite frame of ``block`` (``(frames, channels)``, starting at frame ``at``)."""
    finite = np.isfinite(block)
    if finite.all():
        return
    bad = int(block.size - np.count_nonzero(finite))
    first = at + int(np.argmin(finite.all(axis=1)))
    when = f" ({first / rate:.3f} s)" if rate else ""
    raise InvalidInput(
        f"{shown} contains {bad} NaN or infinite sample(s), the first at frame {first}{when}; "
        "audio samples must be finite numbers"
    )


def resample(y: np.ndarray, sr_in: int, sr_out: int, *, quality: str = "VHQ") -> np.ndarray:
    """Resample along the last axis with soxr.

    Parameters
    ----------
    y : np.ndarray [shape=(frames,) or (channels, frames)]
    sr_in, sr_out : int
        Sample rates in Hz, > 0.
    quality : {"VHQ", "HQ"}

    Returns
    -------
    y_out : np.ndarray [shape=(..., round(frames * sr_out / sr_in))]
        float32 for float32 input; ``y`` itself (not a copy) when the rates are equal.
    """
    if int(sr_in) <= 0 or int(sr_out) <= 0:
        raise InvalidInput(f"sample rates must be > 0 Hz, got {sr_in} -> {sr_out}")
    if quality not in _RESAMPLE_QUALITIES:
        raise InvalidInput(f"resample quality must be one of {_RESAMPLE_QUALITIES}, got {quality!r}")
    if y.ndim not in (1, 2):
        raise InvalidInput(f"y must have shape (frames,) or (channels, frames), got {y.shape}")
    if sr_in == sr_out:
        return y
    if y.dtype not in (np.float32, np.float64):
        y = y.astype(np.float32)
    if y.shape[-1] == 0:
        return np.zeros(y.shape, dtype=y.dtype)
    if y.ndim == 1:
        return soxr.resample(y, sr_in, sr_out, quality=quality)
    out = soxr.resample(y.T, sr_in, sr_out, quality=quality)
    return np.ascontiguousarray(out.T)


def encoder_options(
    fmt: str, subtype: str, sample_rate: int, channels: int, *, bitrate_kbps: int | None = None
) -> dict[str, Any]:
    """Keyword arguments of ``soundfile.SoundFile`` for writing ``fmt``/``subtype``; checked.

    Parameters
    ----------
    fmt : {"wav", "flac", "mp3"}
    subtype : {"PCM_16", "PCM_24", "FLOAT", "MPEG_LAYER_III"}
        FLAC stores PCM_16 and PCM_24; MP3 only MPEG_LAYER_III.
    sample_rate, channels : int
        Of the signal. MP3 stores 1 or 2 channels at the rates of :data:`MP3_SAMPLE_RATES`.
    bitrate_kbps : int, optional
        MP3 only: constant bitrate, default 320.

    Returns
    -------
    options : dict
        ``format``, ``subtype``, ``samplerate``, ``channels`` and, for MP3,
        ``compression_level`` and ``bitrate_mode``.

    Notes
    -----
    libsndfile has no bitrate setting: in constant-bitrate mode it maps a compression level
    ``c`` in [0, 1] linearly onto LAME's bitrate, ``320 - c * 288`` kbit/s at 32 kHz and above
    (MPEG-1), ``160 - c * 152`` at 16 to 24 kHz (MPEG-2), ``64 - c * 56`` below, truncated to an
    integer; LAME then uses the nearest standard bitrate (e.g. 200 → 192). The level is
    chosen so the truncation lands on ``bitrate_kbps``, clipped to the MPEG version's range.
    """
    fmt_l = str(fmt).lower()
    if fmt_l not in OUTPUT_FORMATS:
        raise InvalidInput(f"output format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
    subtype = str(subtype).upper()
    if subtype not in OUTPUT_SUBTYPES:
        raise InvalidInput(f"output subtype must be one of {OUTPUT_SUBTYPES}, got {subtype!r}")
    if fmt_l == "flac" and subtype not in _FLAC_SUBTYPES:
        raise InvalidInput(f"FLAC stores integer PCM only: use subtype {_FLAC_SUBTYPES}, or fmt='wav' for {subtype}")
    if (fmt_l == "mp3") != (subtype == "MPEG_LAYER_III"):
        raise InvalidInput(f"subtype MPEG_LAYER_III goes with fmt='mp3' and only with it; got {fmt!r}/{subtype!r}")
    if int(sample_rate) <= 0:
        raise InvalidInput(f"sample_rate must be > 0 Hz, got {sample_rate}")
    options: dict[str, Any] = {
        "format": fmt_l.upper(),
        "subtype": subtype,
        "samplerate": int(sample_rate),
        "channels": int(channels),
    }
    if fmt_l != "mp3":
        return options
    if int(sample_rate) not in MP3_SAMPLE_RATES:
        rates = ", ".join(str(r) for r in MP3_SAMPLE_RATES)
        raise InvalidInput(f"MP3 stores sample rates of {rates} Hz, not {sample_rate} Hz: choose WAV or FLAC")
    if int(channels) not in (1, 2):
        raise InvalidInput(f"MP3 stores 1 or 2 channels, not {channels}: choose WAV or FLAC")
    kbps = 320 if bitrate_kbps is None else int(bitrate_kbps)
    top, low = (320, 32) if sample_rate >= 32000 else (160, 8) if sample_rate >= 16000 else (64, 8)
    level = (top - min(max(kbps, low), top)) / (top - low) - 1e-6  # truncation lands on kbps, not below
    # soundfile sets the level before the mode: libsndfile applies it first as LAME's VBR quality
    # (level * 10), which LAME refuses above 9.999; 0.9999 still truncates to the lowest bitrate.
    options["compression_level"] = min(max(level, 0.0), 0.9999)
    options["bitrate_mode"] = "CONSTANT"
    return options


def write_audio(
    path: str | os.PathLike[str],
    y: np.ndarray,
    sample_rate: int,
    *,
    fmt: str = "wav",
    subtype: str | None = None,
    bitrate_kbps: int | None = None,
) -> None:
    """Encode ``y`` to a WAV, FLAC or MP3 file atomically (temp file in the same directory + rename).

    Parameters
    ----------
    path : path-like
        Destination; its directory must exist.
    y : np.ndarray [shape=(channels, frames) or (frames,)]
        Samples, nominally in [-1, 1]. PCM and MP3 clip to that range (never wrap).
    sample_rate : int
    fmt : {"wav", "flac", "mp3"}
    subtype : {"PCM_16", "PCM_24", "FLOAT", "MPEG_LAYER_III"}, optional
        Default "PCM_16" ("MPEG_LAYER_III" for MP3). FLAC supports PCM_16 and PCM_24.
    bitrate_kbps : int, optional
        MP3's constant bitrate (see :func:`encoder_options`), default 320.
    """
    fmt_l = str(fmt).lower()
    subtype = (subtype or ("MPEG_LAYER_III" if fmt_l == "mp3" else "PCM_16")).upper()
    y = np.asarray(y)
    if y.ndim == 1:
        y = y[np.newaxis, :]
    if y.ndim != 2 or y.shape[0] == 0:
        raise InvalidInput(f"y must have shape (channels, frames), got {y.shape}")
    if y.shape[0] > 64:
        raise InvalidInput(
            f"y has shape {y.shape}: more than 64 channels; pass (channels, frames), not (frames, channels)"
        )
    options = encoder_options(fmt_l, subtype, sample_rate, y.shape[0], bitrate_kbps=bitrate_kbps)
    y = y.astype(np.float32, copy=False)
    _check_finite(y, "the audio to write")
    if subtype != "FLOAT":
        y = np.clip(y, -1.0, 1.0)
    with atomic_path(path) as tmp:
        try:
            with sf.SoundFile(tmp, "w", **options) as out:
                out.write(y.T)
        except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
            raise InvalidInput(
                f"cannot write {fmt_l.upper()} {subtype} at {sample_rate} Hz: {_libsndfile_reason(exc)}"
            ) from None
