"""Separation in bounded memory: Demucs' own overlap-add, streamed; tracks written as they come.

``demucs.apply.apply_model`` holds the whole song several times over: the mix, a padded copy
of it for the shift trick, one ``(sources, channels, frames)`` accumulator per shift and per
model of a bag, the weights' sum, and the result — memory that grows with the song (1.66 GB
for 180 s with HTDemucs, most of it length-dependent past the model's own ~1.2 GB).

:class:`StreamingSeparator` computes exactly what ``apply_model(model, mix, shifts, split=True,
overlap, segment)`` computes — the same chunks, padded from the same neighbouring samples, the
same model calls (demucs' ``apply_model(split=False)`` on each chunk), the same triangular
transition weights, the same float32 additions in the same order — but keeps only the region
where chunks still overlap: a sample is final once the next chunk starts past it, and it is
handed out then. Each (model of a bag, shift) pass is advanced chunk by chunk, the one that is
furthest behind first, and a block of output is released as soon as every pass has finished
it. The random shift offsets are drawn from :mod:`random` as apply_model draws them (each model
call sees the ``random`` state it would see there, see :func:`_consume_forward_draws`), so with
the same ``random`` state and the same normalisation the output equals apply_model's bit for bit
(the tests check it for HTDemucs, HDemucs and bags, with and without shifts).

Memory is the model's for one chunk plus a few chunks of audio, whatever the song's length:
the mix is read from a :class:`~audiomesh.audio.stream.MixSource` (a file read in place, or an
array) and the output goes wherever the caller writes it, e.g. a
:class:`~audiomesh.audio.stream.TrackWriter`, which encodes a track to a file block by block and
measures it on the way.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from audiomesh.audio.stream import ArraySource, MixSource, SoundFileSource, StreamingMeasure, TrackWriter
from audiomesh.errors import Cancelled, InvalidInput

if TYPE_CHECKING:
    from demucs.apply import BagOfModels
    from demucs.apply import Model as Network  # one Demucs, HDemucs or HTDemucs

    #: What demucs' apply_model runs: one network or a bag of them. Typed as these rather than
    #: nn.Module, whose __getattr__ types every attribute (samplerate, segment, ...) as Tensor | Module.
    AnyDemucs = Network | BagOfModels

__all__ = [
    "ArraySource",
    "MixSource",
    "SoundFileSource",
    "StreamingMeasure",
    "StreamingSeparator",
    "TrackWriter",
    "combine_passes",
    "mix_stats",
    "normalized",
]

#: Frames read at once when a whole source is scanned (mean/std, finiteness).
SCAN_FRAMES = 1 << 20


#: Held while a separation touches the process-wide :mod:`random` (seeding and drawing shift
#: offsets; a model call that must see its pass's state). A worker runs requests in threads at
#: once: one request setting ``random`` back after its model call must not land between another's
#: seed and its draws, or that song's offsets (and a split song's parts) would disagree. Holding it
#: across a shift pass's model call serializes such calls, which costs nothing here: two forwards
#: at once in one process ran at 0.35x the speed of one after the other (DESIGN.md).
RANDOM_LOCK = threading.RLock()


def _read_padded(source: MixSource, start: int, stop: int) -> np.ndarray:
    """``source`` on ``[start, stop)``, zero outside ``[0, frames)``."""
    out = np.zeros((source.channels, stop - start), dtype=np.float32)
    lo, hi = max(start, 0), min(stop, source.frames)
    if hi > lo:
        out[:, lo - start : hi - start] = source.read(lo, hi)
    return out


def mix_stats(source: MixSource) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std + 1e-8)`` of the channel mean of ``source``, as float32 scalars.

    What ``demucs.api.Separator`` (and :class:`~audiomesh.separation.DemucsModel`) normalise the
    mix by: ``ref = mix.mean(0); mean = ref.mean(); std = ref.std() + 1e-8``. For an
    :class:`ArraySource` it is computed that way, bit for bit; for other sources in one pass of
    float64 block moments (Chan et al.), equal to within float32 rounding.
    Also checks that every sample is finite (raises ``InvalidInput``).
    """
    if isinstance(source, ArraySource):
        wav = torch.from_numpy(source.mix)
        if not torch.isfinite(wav).all():
            raise InvalidInput("mix must hold finite samples (found NaN or infinity)")
        ref = wav.mean(0)
        std = ref.std() if source.frames > 1 else torch.zeros(())
        return ref.mean(), std + 1e-8
    count, mean, m2 = 0, 0.0, 0.0
    for start in range(0, source.frames, SCAN_FRAMES):
        block = source.read(start, min(start + SCAN_FRAMES, source.frames))
        if not np.isfinite(block).all():
            raise InvalidInput("mix must hold finite samples (found NaN or infinity)")
        mono = torch.from_numpy(block).mean(0).double().numpy()
        n = mono.size
        block_mean = float(mono.mean())
        block_m2 = float(np.square(mono - block_mean).sum())
        delta = block_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += block_m2 + delta * delta * count * n / total
        count = total
    deviation = math.sqrt(m2 / (count - 1)) if count > 1 else 0.0
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(deviation, dtype=torch.float32) + 1e-8


# --------------------------------------------------------------------------- separation


@dataclass
class _Pass:
    """One (model of the bag, shift) pass of apply_model's split loop, advanced chunk by chunk.

    Local position ``p`` (apply_model's coordinates for this pass) is mix frame ``p - lead``.
    """

    model: Network
    model_index: int
    lead: int  # mix frame of local 0 is -lead (max_shift - offset with shifts, else 0)
    length: int  # local positions: [0, length)
    segment_length: int
    stride: int
    weight: torch.Tensor  # (segment_length,) on the device
    next_chunk: int = 0  # local offset of the next chunk
    acc_start: int = 0  # local position of acc[..., 0]
    acc: torch.Tensor | None = None  # (sources, channels, n) weighted sum, float32
    acc_weight: torch.Tensor | None = None  # (n,) sum of weights
    done: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # finished (mix start, block)
    random_state: Any = None  # `random` state before this pass's next model call (shift passes)

    @property
    def chunks(self) -> int:
        return max(1, math.ceil(self.length / self.stride))

    @property
    def finished_to(self) -> int:
        """Mix frames below this are final in this pass."""
        if self.next_chunk >= self.length:
            return 1 << 62
        return self.next_chunk - self.lead


def _consume_forward_draws(model: Network, calls: int) -> None:
    """Advance :mod:`random` as ``calls`` forward passes of ``model`` would.

    HTDemucs' cross-domain Transformer draws its sine-embedding shift with
    ``random.randrange(sin_random_shift + 1)`` on every call (a draw even when the shift can
    only be 0), so apply_model's second shift offset depends on how many chunks the first pass
    ran. Replaying those draws keeps the offsets, and the global state after the separation,
    those of apply_model. Other demucs models draw nothing at inference.
    """
    transformer = getattr(model, "crosstransformer", None)
    if transformer is None or getattr(transformer, "emb", None) != "sin":
        return
    for _ in range(calls):
        random.randrange(transformer.sin_random_shift + 1)


def combine_passes(
    blocks: Sequence[tuple[int, torch.Tensor]], *, shifts: int, bag_weights: Sequence[Sequence[float]] | None
) -> torch.Tensor:
    """apply_model's averaging of shifts and weighting of bag models, in its float32 operations and order.

    Parameters
    ----------
    blocks : sequence of (int, torch.Tensor [shape=(sources, channels, n)])
        ``(model index in the bag, block)`` of every pass, in pass order (models in bag order, each
        model's shifts in order), all for the same mix frames. They may be changed in place.
    shifts : int
        apply_model's ``shifts`` (0: one unshifted pass per model).
    bag_weights : sequence of sequence of float, or None
        ``BagOfModels.weights`` (per model, per source); None for a single model.
    """
    estimates: float | torch.Tensor = 0.0
    totals = [0.0] * blocks[0][1].shape[0]
    for index in range(len(bag_weights) if bag_weights is not None else 1):
        mine = [block for model_index, block in blocks if model_index == index]
        if shifts:
            out: float | torch.Tensor = 0.0
            for block in mine:
                out = out + block if isinstance(out, float) else out.add_(block)
            assert isinstance(out, torch.Tensor)
            out /= shifts
        else:
            out = mine[0]
        if bag_weights is None:
            return out
        for k, inst_weight in enumerate(bag_weights[index]):
            out[k, :, :] *= inst_weight
            totals[k] += inst_weight
        estimates = estimates + out if isinstance(estimates, float) else estimates.add_(out)
    assert isinstance(estimates, torch.Tensor)
    for k in range(estimates.shape[0]):
        estimates[k, :, :] /= totals[k]
    return estimates


class StreamingSeparator:
    """``apply_model(model, mix, shifts, split=True, overlap, segment)``, block by block.

    Parameters
    ----------
    model : torch.nn.Module
        A demucs model or ``BagOfModels``, on ``device`` and in eval mode.
    shifts, overlap, segment
        As for ``apply_model`` (``segment=None``: each model's own).
    device : str
        Where the model runs; the overlap-add accumulates on the CPU, as apply_model does
        for a CPU mix.
    transition_power : float
        apply_model's ``transition_power`` (1 = linear cross-fades).
    seed : int or None
        Draw the shift offsets from ``random.seed(seed)`` (the caller's ``random`` state is
        restored after): the same result as ``random.seed(seed)`` before apply_model, safe while
        other threads separate. None: from ``random`` as it is, as apply_model does.
    """

    def __init__(
        self,
        model: AnyDemucs,
        *,
        shifts: int = 1,
        overlap: float = 0.25,
        segment: float | None = None,
        device: str = "cpu",
        transition_power: float = 1.0,
        seed: int | None = None,
    ) -> None:
        from demucs.apply import BagOfModels

        if transition_power < 1:
            raise InvalidInput("transition_power must be >= 1 (as apply_model requires)")
        if not 0 <= overlap < 1:
            raise InvalidInput(f"overlap must be in [0, 1), got {overlap}")
        self.model = model
        self.shifts = int(shifts)
        self.overlap = float(overlap)
        self.segment = segment
        self.device = torch.device(device)
        self.transition_power = float(transition_power)
        self.seed = seed
        if isinstance(model, BagOfModels):
            self.submodels = cast("list[Network]", list(model.models))  # a bag holds networks only
            self.bag_weights: list[list[float]] | None = [list(map(float, w)) for w in model.weights]
        else:
            self.submodels = [model]
            self.bag_weights = None
        self.sources = list(model.sources)

    def geometry(self, sub: Network) -> tuple[int, int]:
        """``(segment_length, stride)`` of ``sub``'s passes, in frames, as apply_model computes them."""
        segment = self.segment if self.segment is not None else sub.segment
        segment_length = int(sub.samplerate * segment)
        stride = int((1 - self.overlap) * segment_length)
        if stride < 1:
            raise InvalidInput("segment x (1 - overlap) must span at least one frame")
        return segment_length, stride

    def _passes(self, frames: int) -> list[_Pass]:
        """Every (model, shift) pass over ``frames`` mix frames, drawing the shift offsets from :mod:`random`
        (seeded with :attr:`seed` when it is set)."""
        with RANDOM_LOCK:
            saved = random.getstate()
            if self.seed is not None:
                random.seed(self.seed)
            try:
                passes = self._draw_passes(frames)
                if self.seed is not None and not self.shifts:
                    # Unshifted passes leave `random` to the model (HTDemucs draws once per
                    # forward: sin_random_shift). Seeded, each pass gets apply_model's state, so
                    # a part of a split song needs none of the model calls before it.
                    for p in passes:
                        p.random_state = random.getstate()
                        _consume_forward_draws(p.model, p.chunks)
                return passes
            finally:
                if self.seed is not None:
                    random.setstate(saved)

    def _draw_passes(self, frames: int) -> list[_Pass]:
        passes = []
        for index, sub in enumerate(self.submodels):
            segment_length, stride = self.geometry(sub)
            weight = torch.cat(
                [
                    torch.arange(1, segment_length // 2 + 1, device=self.device),
                    torch.arange(segment_length - segment_length // 2, 0, -1, device=self.device),
                ]
            )
            weight = (weight / weight.max()) ** self.transition_power
            if self.shifts:
                max_shift = int(0.5 * sub.samplerate)
                # apply_model draws one offset per shift (models in bag order, shifts in order),
                # each after the model calls of the pass before it, which may draw too.
                for _ in range(self.shifts):
                    offset = random.randint(0, max_shift)
                    lead = max_shift - offset
                    p = _Pass(sub, index, lead, frames + lead, segment_length, stride, weight)
                    p.random_state = random.getstate()
                    _consume_forward_draws(sub, p.chunks)
                    passes.append(p)
            else:
                passes.append(_Pass(sub, index, 0, frames, segment_length, stride, weight))
        return passes

    def _chunk(self, p: _Pass, source: MixSource) -> torch.Tensor:
        """The model's output for the pass's next chunk: what apply_model(split=False) returns."""
        from demucs.apply import TensorChunk, apply_model
        from demucs.demucs import Demucs
        from demucs.htdemucs import HTDemucs

        length = min(p.segment_length, p.length - p.next_chunk)
        if isinstance(p.model, HTDemucs) and self.segment is not None:
            valid_length = int(self.segment * p.model.samplerate)
        elif isinstance(p.model, (Demucs, HTDemucs)):  # HDemucs has no valid_length
            valid_length = p.model.valid_length(length)
        else:
            valid_length = length
        delta = valid_length - length
        start = p.next_chunk - p.lead - delta // 2  # mix frame of the padded chunk's first sample
        window = torch.from_numpy(_read_padded(source, start, start + valid_length))[None]
        chunk = TensorChunk(window, delta // 2, length)
        kwargs: dict[str, Any] = {
            "overlap": self.overlap,
            "transition_power": self.transition_power,
            "segment": self.segment,
        }
        if p.random_state is None:
            return apply_model(p.model, chunk, shifts=0, split=False, device=self.device, **kwargs)
        # A shift pass: the model call sees the `random` state apply_model's pass would be in.
        with RANDOM_LOCK:
            saved = random.getstate()
            random.setstate(p.random_state)
            try:
                return apply_model(p.model, chunk, shifts=0, split=False, device=self.device, **kwargs)
            finally:
                p.random_state = random.getstate()
                random.setstate(saved)

    def _accumulate(self, p: _Pass, source: MixSource) -> None:
        """Run the pass's next chunk and add it, weighted, into the pass's sums, as apply_model does."""
        chunk_out = self._chunk(p, source)[0]  # (sources, channels, length) on the device
        offset = p.next_chunk
        length = chunk_out.shape[-1]
        weight = p.weight[:length]
        contribution = (weight * chunk_out).to("cpu")
        end = offset + length
        if p.acc is None or p.acc_weight is None:  # both or neither
            p.acc_start = offset
            p.acc = torch.zeros(*contribution.shape[:-1], length)
            p.acc_weight = torch.zeros(length)
        have = p.acc_start + p.acc.shape[-1]
        if end > have:
            grow = end - have
            p.acc = torch.cat([p.acc, torch.zeros(*p.acc.shape[:-1], grow)], dim=-1)
            p.acc_weight = torch.cat([p.acc_weight, torch.zeros(grow)])
        lo = offset - p.acc_start
        p.acc[..., lo : lo + length] += contribution
        p.acc_weight[lo : lo + length] += weight.to("cpu")
        p.next_chunk = offset + p.stride

    @staticmethod
    def _pop_final(p: _Pass, *, last: bool) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """Remove the sums no later chunk of the pass adds to; return ``(local start, sums, weight sums)``.

        ``last``: no chunk follows (of the pass, or of the range being computed), so all of them.
        """
        if p.acc is None or p.acc_weight is None:
            return None
        final_to = p.acc_start + p.acc.shape[-1] if last else min(p.next_chunk, p.length)
        cut = final_to - p.acc_start
        if cut <= 0:
            return None
        start, sums, weights = p.acc_start, p.acc[..., :cut], p.acc_weight[:cut]
        p.acc, p.acc_weight = p.acc[..., cut:].clone(), p.acc_weight[cut:].clone()
        p.acc_start += cut
        return start, sums, weights

    def _advance(self, p: _Pass, source: MixSource, frames: int) -> None:
        self._accumulate(p, source)
        final = self._pop_final(p, last=p.next_chunk >= p.length)
        if final is None:
            return
        acc_start, sums, weights = final
        block = sums / weights
        block_start = acc_start - p.lead  # mix frame
        # Keep only mix frames [0, frames): with shifts, local positions before `lead` are padding.
        lo, hi = max(0, -block_start), min(block.shape[-1], frames - block_start)
        if hi > lo:
            p.done.append((block_start + lo, block[..., lo:hi]))

    @staticmethod
    def _take(p: _Pass, start: int, stop: int) -> torch.Tensor:
        """Pop the pass's finished frames [start, stop) (they are contiguous from ``start``)."""
        parts, need = [], stop - start
        while need > 0:
            block_start, block = p.done[0]
            assert block_start == start + (stop - start - need)
            n = min(need, block.shape[-1])
            parts.append(block[..., :n])
            if n == block.shape[-1]:
                p.done.pop(0)
            else:
                p.done[0] = (block_start + n, block[..., n:])
            need -= n
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _combine(self, passes: list[_Pass], start: int, stop: int) -> torch.Tensor:
        """apply_model's averaging of shifts and weighting of bag models, on frames [start, stop)."""
        blocks = [(p.model_index, self._take(p, start, stop)) for p in passes]
        return combine_passes(blocks, shifts=self.shifts, bag_weights=self.bag_weights)

    def blocks(
        self,
        source: MixSource,
        *,
        progress: Callable[[float], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, block)``: the separation of mix frames ``[start, start + n)`` in order.

        ``block`` is float32 ``(sources, channels, n)`` on the CPU, what ``apply_model(...)[0]``
        holds there. ``source`` must already be normalised the way the caller wants (see
        :func:`normalized`). ``progress`` gets the fraction of model calls done; ``cancel``
        is checked before every model call (raises ``Cancelled``).
        """
        frames = source.frames
        if frames < 1:
            raise InvalidInput("mix must have at least one frame")
        passes = self._passes(frames)
        total = sum(p.chunks for p in passes)
        calls = 0
        emitted = 0
        with torch.inference_mode():
            while emitted < frames:
                p = min((q for q in passes if q.next_chunk < q.length), key=lambda q: q.finished_to, default=None)
                if p is not None:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("separation cancelled")
                    self._advance(p, source, frames)
                    calls += 1
                    if progress is not None:
                        progress(min(calls / total, 1.0))
                ready = min(min(q.finished_to for q in passes), frames)
                if ready > emitted:
                    yield emitted, self._combine(passes, emitted, ready)
                    emitted = ready
                elif p is None:  # pragma: no cover - every pass done but frames missing: a bug
                    raise RuntimeError(f"streaming separation stalled at frame {emitted} of {frames}")


class _Normalized:
    """A source seen through ``(x - mean) / std`` (float32, as DemucsModel feeds the model)."""

    def __init__(self, source: MixSource, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.source, self.mean, self.std = source, mean, std
        self.frames, self.channels, self.sample_rate = source.frames, source.channels, source.sample_rate

    def read(self, start: int, stop: int) -> np.ndarray:
        return ((torch.from_numpy(np.ascontiguousarray(self.source.read(start, stop))) - self.mean) / self.std).numpy()


def normalized(source: MixSource, mean: torch.Tensor, std: torch.Tensor) -> MixSource:
    """``source`` normalised by ``mean`` and ``std`` (see :func:`mix_stats`) on every read."""
    return _Normalized(source, mean, std)
