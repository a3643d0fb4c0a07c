"""One song's separation split into chunk ranges, computed anywhere and stitched exactly.

``apply_model(split=True)`` runs each (model of a bag, shift) *pass* as chunks at local offsets
``c * stride``, adds ``weight * chunk_out`` into a zero float32 accumulator in ascending chunk
order (and ``weight`` into ``sum_weight``), then divides. A *range* is part ``index`` of ``count``
(0-based): in every pass of ``C`` chunks it computes chunks
``[index * C // count, (index + 1) * C // count)`` (possibly none) with
:class:`~audiomesh.separation.chunked.StreamingSeparator`'s own pass, chunk and accumulation code,
and :func:`separate_range` writes those sums, unnormalised, into one file. :func:`stitch_ranges`
adds the ranges' sums in range order, divides by the weight sums, crops each pass to the mix and
combines the passes like the streaming separator does, then de-normalises like
:meth:`~audiomesh.separation.DemucsModel.separate_stream`.

Exactness. Where no frame is under more than two chunks (``2 * stride >= segment_length``:
``overlap <= 0.5``, and an even segment length for exactly 0.5) a frame's sum is
``w * c_i + w * c_{i+1}`` both ways (apply_model's ``(0 + w * c_i) + w * c_{i+1}``), so the
stems equal those of one worker bit for bit; with more overlap, three chunks may be added in
another grouping (float rounding: 1e-8 measured). Every range draws the same shift offsets:
the global :mod:`random` is seeded with ``seed`` (the caller's state saved and restored), and
each computed chunk sees the ``random`` state apply_model's call would see, with the per-forward
draws of the chunks a range skips replayed (see
:func:`~audiomesh.separation.chunked._consume_forward_draws`). ``random.seed(seed)`` before
``DemucsModel.separate_stream`` gives the same stems as the stitched ranges.

The range file (``.range``): 16 bytes — :data:`MAGIC` (8), the format version (uint32 LE) and
the JSON header's length (uint32 LE) — then the UTF-8 JSON header (see :class:`RangeInfo`), then
per pass one little-endian float32 array of shape ``(span_length, sources * channels + 1)`` at a
64-byte aligned offset: per local frame, the weighted sums of every (source, channel) followed by
the weight sum. Frame-major, so a range writes it front to back as chunks finish and a reader
takes consecutive frames from one contiguous slice (``np.memmap`` works, see
:func:`partial_sums`). Each array's CRC-32 is in the header. A file is written under a temporary
name and renamed when complete, so a failed or cancelled range leaves none.

Memory: a range holds one chunk's sums per pass (it writes each frame as soon as no later chunk of
the range adds to it); the stitch reads :data:`STITCH_FRAMES` frames of each part at a time.
Everything here but the two functions that run or read arrays imports without torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import struct
import threading
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from audiomesh.errors import Cancelled, InvalidInput
from audiomesh.separation.base import ProgressFn, SeparationOptions, _MonotonicProgress, _two_stems

if TYPE_CHECKING:
    from audiomesh.audio.stream import MixSource
    from audiomesh.separation.chunked import StreamingSeparator, _Pass
    from audiomesh.separation.demucs_model import DemucsModel

__all__ = [
    "MAGIC",
    "MAX_RANGES",
    "STITCH_FRAMES",
    "VERSION",
    "RangeInfo",
    "RangePass",
    "partial_sums",
    "plan_chunks",
    "read_range_info",
    "separate_range",
    "shift_seed",
    "stitch_ranges",
]

#: A request may split one song into at most this many parts.
MAX_RANGES = 64
#: The first bytes of every range file.
MAGIC = b"AMRANGE\x00"
#: The range file format this module writes and reads.
VERSION = 1
#: Frames the stitch combines at once (per part and pass: this many frames of sums).
STITCH_FRAMES = 1 << 16

_PREFIX = struct.Struct("<8sII")  # magic, version, header length
_ALIGN = 64
_MAX_HEADER = 1 << 20  # a header of 64 parts x 80 passes is ~30 kB
_DTYPE = np.dtype("<f4")


def shift_seed(job_id: str) -> int:
    """A stable seed for a job's shift offsets: 63 bits of ``sha256(job_id)``, never 0.

    The same on every machine and Python (unlike ``hash``), so every part of one job draws the
    same offsets; 0 is avoided because the RPC reads 0 as "unseeded".
    """
    digest = hashlib.sha256(job_id.encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "big") >> 1) or 1


@dataclass(frozen=True)
class RangePass:
    """One (model of a bag, shift) pass as one range computed it.

    Attributes
    ----------
    model_index : int
        The model of the bag (0 for a single model).
    lead : int
        Local position of mix frame 0 (with shifts: ``max_shift - offset``, else 0).
    length : int
        The pass's local positions are ``[0, length)`` (``frames + lead``).
    segment_length, stride : int
        apply_model's chunk length and hop, in frames.
    chunks : int
        The pass's chunk count (over all ranges).
    first_chunk, stop_chunk : int
        This range's chunks of the pass: ``[first_chunk, stop_chunk)``.
    span_start, span_length : int
        The local positions the range's sums cover: its chunks' union (length 0 when none).
    offset : int
        Byte offset in the file of the ``(span_length, sources * channels + 1)`` float32 array.
    crc32 : int
        CRC-32 of that array's bytes.
    """

    model_index: int
    lead: int
    length: int
    segment_length: int
    stride: int
    chunks: int
    first_chunk: int
    stop_chunk: int
    span_start: int
    span_length: int
    offset: int
    crc32: int


@dataclass(frozen=True)
class RangeInfo:
    """What a range file holds (its header): the song, the options, this range and its passes.

    Attributes
    ----------
    index, count : int
        This is part ``index`` (0-based) of ``count``.
    frames, sample_rate, channels : int
        The mix.
    sources : tuple of str
        The model's sources, in output order.
    seed : int
        What :mod:`random` was seeded with for the shift offsets.
    chunks : int
        This range's model calls (all passes).
    model : str
        The model's name (for messages: the numbers below are what must match).
    shifts, overlap, segment, transition_power
        apply_model's options (``segment`` None: each model's own).
    mean, std : float
        The mix's normalisation (float32 values): stems are ``block * std + mean``.
    bag_weights : tuple of tuple of float, or None
        ``BagOfModels.weights``; None for a single model.
    passes : tuple of RangePass
        In apply_model's pass order (models in bag order, shifts in order).
    size : int
        Bytes of the complete file.
    """

    index: int
    count: int
    frames: int
    sources: tuple[str, ...]
    sample_rate: int
    channels: int
    seed: int
    chunks: int
    model: str
    shifts: int
    overlap: float
    segment: float | None
    transition_power: float
    mean: float
    std: float
    bag_weights: tuple[tuple[float, ...], ...] | None
    passes: tuple[RangePass, ...]
    size: int

    @property
    def record(self) -> int:
        """Floats per local frame in a pass array: every (source, channel) sum, then the weight sum."""
        return len(self.sources) * self.channels + 1


# --------------------------------------------------------------------------- planning


def _integer(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidInput(f"{what} must be an integer, got {value!r}")
    return int(value)


def _check_range(index: object, count: object) -> tuple[int, int]:
    index, count = _integer(index, "chunk range index"), _integer(count, "chunk range count")
    if not 1 <= count <= MAX_RANGES:
        raise InvalidInput(f"chunk range count must be from 1 to {MAX_RANGES}, got {count}")
    if not 0 <= index < count:
        raise InvalidInput(f"chunk range index must be from 0 to count - 1 = {count - 1}, got {index}")
    return index, count


def _check_seed(seed: object) -> int:
    value = _integer(seed, "shift seed")
    if not 0 <= value < 1 << 64:
        raise InvalidInput(f"shift seed must be in [0, 2**64), got {value}")
    return value


def _chunk_bounds(chunks: int, index: int, count: int) -> tuple[int, int]:
    """Part ``index`` of ``count`` of a pass of ``chunks`` chunks: ``[first, stop)``."""
    return index * chunks // count, (index + 1) * chunks // count


def _span(first: int, stop: int, *, length: int, segment_length: int, stride: int) -> tuple[int, int]:
    """``(start, length)`` of the local positions chunks ``[first, stop)`` cover."""
    if stop <= first:
        return first * stride, 0
    start = first * stride
    return start, min((stop - 1) * stride + segment_length, length) - start


def _validated(model: DemucsModel, options: SeparationOptions) -> SeparationOptions:
    options = options.validate(model)
    if not options.split:
        raise InvalidInput("a chunk range needs split=True; split=False runs the whole mix as one chunk")
    return options


def plan_chunks(model: DemucsModel, frames: int, options: SeparationOptions) -> int:
    """The smallest chunk count of any pass over ``frames`` mix frames: what bounds a useful ``count``.

    A pass with shifts runs over ``frames + lead`` local positions (``lead`` from 0 to 0.5 s,
    drawn at run time), so this takes ``lead = 0``: with ``count`` at most this, every range
    has at least one chunk in every pass.

    Raises
    ------
    InvalidInput
        Bad options, ``split=False`` or ``frames < 1``.
    """
    options = _validated(model, options)
    frames = _integer(frames, "frames")
    if frames < 1:
        raise InvalidInput(f"frames must be >= 1, got {frames}")
    separator = model.streaming_separator(options)
    return min(max(1, math.ceil(frames / separator.geometry(sub)[1])) for sub in separator.submodels)


# --------------------------------------------------------------------------- one range


def separate_range(
    model: DemucsModel,
    source: MixSource,
    out: Path,
    *,
    options: SeparationOptions,
    index: int,
    count: int,
    seed: int,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> RangeInfo:
    """Compute part ``index`` of ``count`` of ``source``'s separation and write it to ``out``.

    Parameters
    ----------
    model : DemucsModel
        The model (single or bag); every part of a song must use the same weights.
    source : MixSource
        The whole mix at the model's rate and channel count (every part reads its own chunks'
        neighbourhood, and the whole mix once for the normalisation, as one worker would).
    out : Path
        The range file to write (its folder must exist); replaced if present.
    options : SeparationOptions
        ``shifts``, ``overlap``, ``segment`` as for :meth:`DemucsModel.separate_stream`;
        ``split`` must be True. ``two_stems`` is applied by :func:`stitch_ranges`.
    index, count : int
        This is part ``index`` of ``count``: ``0 <= index < count <= MAX_RANGES``.
    seed : int
        Seeds :mod:`random` for the shift offsets, ``[0, 2**64)``: the same for every part.
    progress : callable
        Gets the fraction of this range's model calls done: strictly increasing, ends at 1.0.
    cancel : threading.Event
        Checked before every model call: raises ``Cancelled`` and leaves no file.

    Returns
    -------
    RangeInfo
        The header written.

    Raises
    ------
    InvalidInput
        Bad options, range or seed, ``split=False``, wrong rate or channel count, an empty or
        non-finite mix.
    Cancelled
        ``cancel`` was set.
    """
    import torch

    from audiomesh.separation.chunked import RANDOM_LOCK, _consume_forward_draws, mix_stats, normalized

    options = _validated(model, options)
    index, count = _check_range(index, count)
    seed = _check_seed(seed)
    model.check_source(source)
    frames = source.frames
    _check_cancel(cancel)
    report = _MonotonicProgress(progress)
    report(0.0)
    mean, std = mix_stats(source)
    separator = model.streaming_separator(options, seed=seed)
    with RANDOM_LOCK:
        passes = separator._passes(frames)  # seeded: every pass carries its `random` state
        saved = random.getstate()
        try:
            plan = []
            for p in passes:
                first, stop = _chunk_bounds(p.chunks, index, count)
                random.setstate(p.random_state)
                _consume_forward_draws(p.model, first)  # the calls of the chunks before this range
                p.random_state = random.getstate()
                p.next_chunk = first * p.stride
                plan.append((p, first, stop))
        finally:
            random.setstate(saved)
    info = RangeInfo(
        index=index,
        count=count,
        frames=frames,
        sources=tuple(model.sources),
        sample_rate=int(source.sample_rate),
        channels=int(source.channels),
        seed=seed,
        chunks=sum(stop - first for _, first, stop in plan),
        model=model.name,
        shifts=separator.shifts,
        overlap=separator.overlap,
        segment=separator.segment,
        transition_power=separator.transition_power,
        mean=float(mean),
        std=float(std),
        bag_weights=None if separator.bag_weights is None else tuple(map(tuple, separator.bag_weights)),
        passes=(),
        size=0,
    )
    geometry = []
    for p, first, stop in plan:
        start, span = _span(first, stop, length=p.length, segment_length=p.segment_length, stride=p.stride)
        geometry.append((p, first, stop, start, span))
    header_length = len(_header_bytes(_with_layout(info, geometry, 0, [0] * len(geometry))))
    offset = _aligned(_PREFIX.size + header_length)
    info = _with_layout(info, geometry, offset, [0] * len(geometry))
    temp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "wb") as f, torch.inference_mode():
            checksums = _write_sums(f, separator, plan, info, normalized(source, mean, std), report, cancel)
            _check_cancel(cancel)
            info = _with_layout(info, geometry, offset, checksums)
            header = _header_bytes(info)
            assert len(header) == header_length  # fixed-width fields: the same length as reserved
            f.truncate(info.size)  # trailing empty passes: the file still ends where the header says
            f.seek(0)
            f.write(_PREFIX.pack(MAGIC, VERSION, header_length) + header)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    report(1.0)
    return info


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("separation cancelled")


def _aligned(position: int) -> int:
    return -(-position // _ALIGN) * _ALIGN


def _with_layout(
    info: RangeInfo, geometry: Sequence[tuple[_Pass, int, int, int, int]], offset: int, checksums: Sequence[int]
) -> RangeInfo:
    """``info`` with its passes laid out from byte ``offset`` on, and the file's size."""
    passes = []
    for (p, first, stop, start, span), crc in zip(geometry, checksums, strict=True):
        passes.append(
            RangePass(
                model_index=p.model_index,
                lead=p.lead,
                length=p.length,
                segment_length=p.segment_length,
                stride=p.stride,
                chunks=p.chunks,
                first_chunk=first,
                stop_chunk=stop,
                span_start=start,
                span_length=span,
                offset=offset,
                crc32=crc,
            )
        )
        offset = _aligned(offset + span * info.record * _DTYPE.itemsize)
    size = passes[-1].offset + passes[-1].span_length * info.record * _DTYPE.itemsize
    return dataclasses.replace(info, passes=tuple(passes), size=size)


def _write_sums(
    f: BinaryIO,
    separator: StreamingSeparator,
    plan: Sequence[tuple[_Pass, int, int]],
    info: RangeInfo,
    source: MixSource,
    report: _MonotonicProgress,
    cancel: threading.Event | None,
) -> list[int]:
    """Run the range's chunks pass by pass; write each pass's sums as they become final. Return the CRCs."""
    import torch

    total, calls, checksums = max(info.chunks, 1), 0, []
    for (p, first, stop), layout in zip(plan, info.passes, strict=True):
        f.seek(layout.offset)
        crc, written = 0, 0
        for chunk in range(first, stop):
            _check_cancel(cancel)
            separator._accumulate(p, source)
            calls += 1
            report(calls / total)
            final = separator._pop_final(p, last=chunk == stop - 1)
            if final is None:
                continue
            start, sums, weights = final
            assert start == layout.span_start + written
            n = weights.shape[-1]
            rows = torch.empty(n, info.record)
            rows[:, :-1] = sums.reshape(-1, n).T
            rows[:, -1] = weights
            data = rows.numpy().astype(_DTYPE, copy=False).data
            f.write(data)
            crc = zlib.crc32(data, crc)
            written += n
        assert written == layout.span_length, (written, layout.span_length)
        checksums.append(crc)
    return checksums


# --------------------------------------------------------------------------- the header


def _header_bytes(info: RangeInfo) -> bytes:
    document = {
        "model": info.model,
        "sources": list(info.sources),
        "sample_rate": info.sample_rate,
        "channels": info.channels,
        "frames": info.frames,
        "mean": info.mean,
        "std": info.std,
        "shifts": info.shifts,
        "overlap": info.overlap,
        "segment": info.segment,
        "transition_power": info.transition_power,
        "seed": info.seed,
        "index": info.index,
        "count": info.count,
        "chunks": info.chunks,
        "bag_weights": None if info.bag_weights is None else [list(w) for w in info.bag_weights],
        "dtype": _DTYPE.str,
        "passes": [
            {
                "model_index": p.model_index,
                "lead": p.lead,
                "length": p.length,
                "segment_length": p.segment_length,
                "stride": p.stride,
                "chunks": p.chunks,
                "first_chunk": p.first_chunk,
                "stop_chunk": p.stop_chunk,
                "span_start": p.span_start,
                "span_length": p.span_length,
                "offset": f"{p.offset:016d}",  # fixed width: the header is sized before the data is written
                "crc32": f"{p.crc32:08x}",
            }
            for p in info.passes
        ],
    }
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode("utf-8")


class _Fields:
    """Typed access to a decoded header, raising InvalidInput that names the field."""

    def __init__(self, document: object, where: str) -> None:
        if not isinstance(document, dict):
            raise InvalidInput(f"{where} is not a JSON object")
        self.document, self.where = document, where

    def _get(self, name: str) -> object:
        if name not in self.document:
            raise InvalidInput(f"{self.where} has no field '{name}'")
        return self.document[name]

    def integer(self, name: str, low: int = 0, high: int | None = None) -> int:
        value = self._get(name)
        if type(value) is not int or value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f">= {low}"
            raise InvalidInput(f"{self.where} field '{name}' must be an integer {bound}, got {value!r}")
        return value

    def number(self, name: str, *, optional: bool = False) -> float:
        value = self._get(name)
        if value is None and optional:
            return math.nan
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidInput(f"{self.where} field '{name}' must be a finite number, got {value!r}")
        return float(value)

    def text(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            raise InvalidInput(f"{self.where} field '{name}' must be a string, got {value!r}")
        return value

    def coded(self, name: str, width: int, base: int) -> int:
        """A fixed-width number written as a string (decimal or hex)."""
        value = self.text(name)
        try:
            if len(value) != width:
                raise ValueError(value)
            return int(value, base)
        except ValueError:
            raise InvalidInput(
                f"{self.where} field '{name}' must be {width} base-{base} digits, got {value!r}"
            ) from None

    def array(self, name: str) -> list[Any]:
        value = self._get(name)
        if not isinstance(value, list):
            raise InvalidInput(f"{self.where} field '{name}' must be a list, got {value!r}")
        return value


def read_range_info(path: Path) -> RangeInfo:
    """Read and check a range file's header (not its arrays' contents).

    Raises
    ------
    InvalidInput
        Not a range file (magic), another format version, a malformed or inconsistent header,
        or a file shorter than its arrays (truncated); the message names the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise InvalidInput(f"range file {path.name} is not a range file: {len(prefix)} bytes")
            magic, version, length = _PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise InvalidInput(f"range file {path.name} is not a range file: bad magic {magic!r}")
            if version != VERSION:
                raise InvalidInput(
                    f"range file {path.name} has format version {version}; this build reads version {VERSION}"
                )
            if not 2 <= length <= _MAX_HEADER:
                raise InvalidInput(f"range file {path.name} has a bad header length {length}")
            header = f.read(length)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise InvalidInput(f"range file {path.name} cannot be read: {exc.strerror or exc}") from exc
    if len(header) < length:
        raise InvalidInput(f"range file {path.name} is truncated: its header needs {length} bytes, found {len(header)}")
    try:
        document = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"range file {path.name} has a corrupt header: {exc}") from None
    info = _parse_header(document, f"range file {path.name}", _PREFIX.size + length)
    if size < info.size:
        raise InvalidInput(
            f"range file {path.name} is truncated: its arrays end at byte {info.size}, the file has {size} bytes"
        )
    return info


def _parse_header(document: object, where: str, data_start: int) -> RangeInfo:
    fields = _Fields(document, f"{where} header")
    if fields.text("dtype") != _DTYPE.str:
        raise InvalidInput(f"{where} holds {fields.text('dtype')!r} arrays; this build reads {_DTYPE.str!r}")
    count = fields.integer("count", 1, MAX_RANGES)
    index = fields.integer("index", 0, count - 1)
    channels = fields.integer("channels", 1, 64)
    sources = tuple(fields.array("sources"))
    if not sources or not all(isinstance(s, str) and s for s in sources) or len(set(sources)) != len(sources):
        raise InvalidInput(f"{where} header field 'sources' must be distinct names, got {list(sources)!r}")
    segment = fields.number("segment", optional=True)
    raw_weights = fields.document.get("bag_weights")
    bag_weights = None
    if raw_weights is not None:
        if not isinstance(raw_weights, list) or not raw_weights:
            raise InvalidInput(f"{where} header field 'bag_weights' must be a list per model, got {raw_weights!r}")
        bag_weights = tuple(_weights_row(row, len(sources), where) for row in raw_weights)
    record = len(sources) * channels + 1
    passes: list[RangePass] = []
    position = data_start
    for number, entry in enumerate(fields.array("passes")):
        pf = _Fields(entry, f"{where} pass {number}")
        p = RangePass(
            model_index=pf.integer("model_index", 0, len(bag_weights) - 1 if bag_weights else 0),
            lead=pf.integer("lead"),
            length=pf.integer("length", 1),
            segment_length=pf.integer("segment_length", 1),
            stride=pf.integer("stride", 1),
            chunks=pf.integer("chunks", 1),
            first_chunk=pf.integer("first_chunk"),
            stop_chunk=pf.integer("stop_chunk"),
            span_start=pf.integer("span_start"),
            span_length=pf.integer("span_length"),
            offset=pf.coded("offset", 16, 10),
            crc32=pf.coded("crc32", 8, 16),
        )
        if p.chunks != max(1, math.ceil(p.length / p.stride)):
            raise InvalidInput(f"{where} pass {number}: {p.chunks} chunks do not fit length {p.length}")
        if (p.first_chunk, p.stop_chunk) != _chunk_bounds(p.chunks, index, count):
            raise InvalidInput(
                f"{where} pass {number}: chunks [{p.first_chunk}, {p.stop_chunk}) are not part {index} of {count} "
                f"of {p.chunks} chunks"
            )
        span = _span(p.first_chunk, p.stop_chunk, length=p.length, segment_length=p.segment_length, stride=p.stride)
        if (p.span_start, p.span_length) != span:
            raise InvalidInput(f"{where} pass {number}: span {p.span_start}+{p.span_length} should be {span}")
        if p.offset < position or p.offset % _ALIGN:
            raise InvalidInput(f"{where} pass {number}: bad array offset {p.offset}")
        position = p.offset + p.span_length * record * _DTYPE.itemsize
        passes.append(p)
    if not passes:
        raise InvalidInput(f"{where} header lists no passes")
    frames = fields.integer("frames", 1)
    if any(p.length != frames + p.lead for p in passes):
        raise InvalidInput(f"{where}: a pass's length is not frames + lead")
    chunks = fields.integer("chunks")
    if chunks != sum(p.stop_chunk - p.first_chunk for p in passes):
        raise InvalidInput(f"{where} header says {chunks} model calls, its passes hold a different number")
    std = fields.number("std")
    if std <= 0:
        raise InvalidInput(f"{where} header field 'std' must be > 0, got {std}")
    return RangeInfo(
        index=index,
        count=count,
        frames=frames,
        sources=sources,
        sample_rate=fields.integer("sample_rate", 1),
        channels=channels,
        seed=fields.integer("seed", 0, (1 << 64) - 1),
        chunks=chunks,
        model=fields.text("model"),
        shifts=fields.integer("shifts", 0),
        overlap=fields.number("overlap"),
        segment=None if math.isnan(segment) else segment,
        transition_power=fields.number("transition_power"),
        mean=fields.number("mean"),
        std=std,
        bag_weights=bag_weights,
        passes=tuple(passes),
        size=position,
    )


def _weights_row(row: object, sources: int, where: str) -> tuple[float, ...]:
    if (
        not isinstance(row, list)
        or len(row) != sources
        or not all(not isinstance(w, bool) and isinstance(w, int | float) and math.isfinite(w) for w in row)
    ):
        raise InvalidInput(f"{where} header field 'bag_weights' must hold {sources} finite numbers per model")
    return tuple(float(w) for w in row)


def partial_sums(path: Path, info: RangeInfo, pass_index: int) -> np.ndarray:
    """A read-only ``np.memmap`` of one pass's array: ``(span_length, sources * channels + 1)`` float32.

    Row ``i`` is local position ``span_start + i``: the weighted sums of every (source, channel),
    then the sum of the weights. (An empty array for a pass with no chunks in this range.)
    """
    p = info.passes[pass_index]
    if p.span_length == 0:
        return np.zeros((0, info.record), _DTYPE)
    return np.memmap(path, dtype=_DTYPE, mode="r", offset=p.offset, shape=(p.span_length, info.record))


# --------------------------------------------------------------------------- the stitch

#: Header fields every part of one separation shares, with what a difference means.
_SHARED = (
    ("count", "part count"),
    ("model", "model"),
    ("sources", "sources"),
    ("sample_rate", "sample rate"),
    ("channels", "channel count"),
    ("frames", "song length (frames)"),
    ("mean", "song (normalisation mean)"),
    ("std", "song (normalisation std)"),
    ("seed", "shift seed"),
    ("shifts", "shifts"),
    ("overlap", "overlap"),
    ("segment", "segment"),
    ("transition_power", "transition power"),
    ("bag_weights", "bag weights"),
)
#: Pass fields every part shares (the shift offsets, chunk geometry).
_SHARED_PASS = ("model_index", "lead", "length", "segment_length", "stride", "chunks")


def _check_parts(paths: Sequence[Path]) -> list[tuple[Path, RangeInfo]]:
    """Read every part's header and check they are the parts of one separation; return them by index."""
    if not paths:
        raise InvalidInput("stitch needs the parts of a separation, got none")
    if len(paths) > MAX_RANGES:
        raise InvalidInput(f"stitch takes at most {MAX_RANGES} parts, got {len(paths)}")
    parts = [(Path(p), read_range_info(Path(p))) for p in paths]
    first_path, first = parts[0]
    for path, info in parts[1:]:
        for name, meaning in _SHARED:
            mine, theirs = getattr(info, name), getattr(first, name)
            if mine != theirs:
                raise InvalidInput(
                    f"parts do not belong together: {path.name} has {meaning} {mine!r}, {first_path.name} has {theirs!r}"
                )
        if len(info.passes) != len(first.passes):
            raise InvalidInput(
                f"parts do not belong together: {path.name} has {len(info.passes)} passes, "
                f"{first_path.name} has {len(first.passes)}"
            )
        for number, (mine_pass, their_pass) in enumerate(zip(info.passes, first.passes, strict=True)):
            for name in _SHARED_PASS:
                if getattr(mine_pass, name) != getattr(their_pass, name):
                    raise InvalidInput(
                        f"parts do not belong together: pass {number} of {path.name} has {name} "
                        f"{getattr(mine_pass, name)}, of {first_path.name} {getattr(their_pass, name)}"
                        + (" (different shift offsets)" if name in ("lead", "length", "chunks") else "")
                    )
    by_index: dict[int, Path] = {}
    for path, info in parts:
        if info.index in by_index:
            raise InvalidInput(
                f"part {info.index} of {first.count} given twice: {by_index[info.index].name} and {path.name}"
            )
        by_index[info.index] = path
    missing = [i for i in range(first.count) if i not in by_index]
    if missing:
        raise InvalidInput(f"got {len(parts)} of {first.count} parts: part(s) {', '.join(map(str, missing))} missing")
    return sorted(parts, key=lambda part: part[1].index)


def _read_rows(f: io.BufferedReader, path: Path, info: RangeInfo, p: RangePass, first: int, stop: int) -> np.ndarray:
    """Rows ``[first, stop)`` of a pass array (rows counted from its span start), read in place."""
    rows = np.empty((stop - first, info.record), _DTYPE)
    f.seek(p.offset + first * rows.strides[0])
    if f.readinto(rows.data.cast("B")) != rows.nbytes:
        raise InvalidInput(f"range file {path.name} is truncated: its arrays end early")
    return rows


def _verify(files: Sequence[tuple[Path, RangeInfo, io.BufferedReader]], cancel: threading.Event | None) -> None:
    """Check every pass array's CRC-32, reading each in blocks of :data:`STITCH_FRAMES` rows."""
    for path, info, f in files:
        for number, p in enumerate(info.passes):
            crc = 0
            for first in range(0, p.span_length, STITCH_FRAMES):
                _check_cancel(cancel)
                rows = _read_rows(f, path, info, p, first, min(first + STITCH_FRAMES, p.span_length))
                crc = zlib.crc32(rows.data, crc)
            if crc != p.crc32:
                raise InvalidInput(
                    f"range file {path.name} is corrupt: pass {number}'s sums fail their checksum "
                    f"(crc32 {crc:08x}, header says {p.crc32:08x})"
                )


def stitch_ranges(
    parts: Sequence[Path],
    *,
    two_stems: str | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Join the range files of one separation into its stems; yield ``(start, stems)`` in order.

    Exactly like :meth:`DemucsModel.separate_stream`: ``stems`` maps every source (or the two stems
    of ``two_stems``) to float32 ``(channels, n)`` for mix frames ``[start, start + n)``, the blocks
    covering ``[0, frames)``. No model runs; each part is read :data:`STITCH_FRAMES` frames at a
    time (after a first pass over it that checks its checksums).

    Parameters
    ----------
    parts : sequence of Path
        Every part's file, one per index ``0 .. count - 1`` (any order).
    two_stems : str or None
        A source: deliver it and ``no_<source>`` (the sum of the others).
    progress : callable
        Gets the fraction of frames done: strictly increasing, ends at 1.0.
    cancel : threading.Event
        Checked before every block: raises ``Cancelled``.

    Raises
    ------
    InvalidInput
        The parts are not the complete set of one separation (another song, options, seed or
        count; an index missing or repeated), a file is not a range file, is truncated or
        corrupt, or ``two_stems`` is not a source; the message says which.
    Cancelled
        ``cancel`` was set.
    """
    import torch

    from audiomesh.separation.chunked import combine_passes

    checked = _check_parts(parts)
    info = checked[0][1]
    if two_stems is not None and two_stems not in info.sources:
        raise InvalidInput(f"two_stems must be one of the sources ({', '.join(info.sources)}), got {two_stems!r}")
    _check_cancel(cancel)
    report = _MonotonicProgress(progress)
    report(0.0)
    mean = torch.tensor(info.mean, dtype=torch.float32)
    std = torch.tensor(info.std, dtype=torch.float32)
    sources, channels, record = len(info.sources), info.channels, info.record
    with contextlib.ExitStack() as stack:
        files = [(path, part, stack.enter_context(open(path, "rb"))) for path, part in checked]
        _verify(files, cancel)
        for start in range(0, info.frames, STITCH_FRAMES):
            _check_cancel(cancel)
            stop = min(start + STITCH_FRAMES, info.frames)
            blocks = []
            for number, shape in enumerate(info.passes):
                lo, hi = start + shape.lead, stop + shape.lead  # local positions
                sums = torch.zeros(stop - start, record)
                for path, part, f in files:  # in index order: apply_model's order of additions
                    p = part.passes[number]
                    a, b = max(lo, p.span_start), min(hi, p.span_start + p.span_length)
                    if b > a:
                        rows = _read_rows(f, path, part, p, a - p.span_start, b - p.span_start)
                        sums[a - lo : b - lo] += torch.from_numpy(rows)
                weights = sums[:, -1]
                if not bool((weights > 0).all()):
                    raise InvalidInput(
                        f"parts leave frames of pass {number} without weight near frame {start}: "
                        "they do not cover the song"
                    )
                block = (sums[:, :-1] / weights[:, None]).T.reshape(sources, channels, stop - start)
                blocks.append((shape.model_index, block))
            out = combine_passes(blocks, shifts=info.shifts, bag_weights=info.bag_weights)
            out = (out * std + mean).to("cpu", torch.float32)
            stems = {name: out[k].numpy() for k, name in enumerate(info.sources)}
            if two_stems is not None:
                stems = _two_stems(stems, two_stems)
            yield start, stems
            report(stop / info.frames)
    report(1.0)
