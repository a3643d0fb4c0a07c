"""Demucs behind the :class:`~audiomesh.separation.base.SeparatorModel` interface.

:class:`DemucsModel` wraps a loaded demucs model (a single ``Demucs``/``HDemucs``/
``HTDemucs`` or a ``BagOfModels``) and runs ``demucs.apply.apply_model`` the way
``demucs.api.Separator.separate_tensor`` (the CLI's engine) does:

* normalize: ``ref = mix.mean(0)``; feed ``(mix - ref.mean()) / (ref.std() + 1e-8)``;
  multiply every source by the std and add the mean back;
* chunking (``split``/``segment``/``overlap``) and the shift trick (``shifts``) are
  apply_model's own;
* apply_model calls ``callback`` with a dict (``model_idx_in_bag``, ``shift_idx``,
  ``segment_offset``, ``state`` "start"/"end", ``models``, ``audio_length``) around
  every chunk; :class:`_ChunkProgress` turns that into a fraction and raises
  ``Cancelled`` from it when the cancel event is set, which unwinds apply_model
  (it shuts its pool down on any exception) at the next chunk boundary.

:meth:`DemucsModel.separate_stream` computes the same separation in bounded memory: the mix is
read from a :class:`~audiomesh.separation.chunked.MixSource` (a file read in place) and the stems
come out block by block as soon as no later chunk overlaps them (see :mod:`.chunked`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from audiomesh.errors import Cancelled, InvalidInput
from audiomesh.separation.base import (
    ModelInfo,
    Origin,
    ProgressFn,
    SeparationOptions,
    SeparatorModel,
    _MonotonicProgress,
    _two_stems,
    resolve_device,
)
from audiomesh.separation.chunked import MixSource, StreamingSeparator, mix_stats, normalized

if TYPE_CHECKING:
    from audiomesh.separation.chunked import AnyDemucs, Network

__all__ = ["DemucsModel", "demucs_max_segment"]

#: apply_model shifts the mix by up to this many seconds (``int(0.5 * samplerate)`` frames).
_MAX_SHIFT_SECONDS = 0.5


def _submodels(model: AnyDemucs) -> list[Network]:
    from demucs.apply import BagOfModels

    return cast("list[Network]", list(model.models)) if isinstance(model, BagOfModels) else [model]


def demucs_max_segment(model: AnyDemucs) -> float | None:
    """Longest chunk (s) ``model`` accepts: the smallest HTDemucs training segment, or None.

    Same rule as ``demucs.separate`` (``HTDemucs.segment`` / ``BagOfModels.max_allowed_segment``).
    """
    from demucs.htdemucs import HTDemucs

    limits = [float(m.segment) for m in _submodels(model) if isinstance(m, HTDemucs)]
    return min(limits) if limits else None


class DemucsModel(SeparatorModel):
    """A demucs model (single or bag) ready to separate on one device.

    Parameters
    ----------
    model : torch.nn.Module
        What ``demucs.pretrained.get_model`` returns. Moved to ``device`` once and
        put in eval mode.
    name : str, keyword-only
        The name clients use.
    origin : {"pretrained", "local_repo", "builtin"}, keyword-only
    description : str, keyword-only
    device : str, keyword-only
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Notes
    -----
    ``separate`` keeps no per-call state, but torch already uses every core for one
    call: callers should bound concurrency (the service does).
    """

    def __init__(
        self,
        model: AnyDemucs,
        *,
        name: str,
        origin: Origin = "builtin",
        description: str = "",
        device: str = "auto",
    ) -> None:
        self._device = resolve_device(device)
        model.eval()
        self._model = model.to(self._device)
        self.info = ModelInfo(
            name=name,
            sources=tuple(model.sources),
            sample_rate=int(model.samplerate),
            audio_channels=int(model.audio_channels),
            origin=origin,
            description=description or _describe(model),
            kind="demucs",
            max_segment=demucs_max_segment(model),
            available=True,
            loaded=True,
        )

    @classmethod
    def load(
        cls,
        name: str,
        *,
        repo: Path | None = None,
        origin: Origin | None = None,
        description: str = "",
        device: str = "auto",
    ) -> DemucsModel:
        """Load with ``demucs.pretrained.get_model(name, repo=repo)`` and wrap.

        With ``repo=None`` and a pretrained name this may download (and, offline,
        retry for ~25 s): prefer :class:`~audiomesh.separation.registry.SeparatorFactory`,
        which checks what is available first.
        """
        from demucs.pretrained import get_model

        model = get_model(name, repo=repo)
        if origin is None:
            origin = "builtin" if name == "demucs_unittest" else "local_repo" if repo else "pretrained"
        return cls(model, name=name, origin=origin, description=description, device=device)

    @property
    def device(self) -> str:
        return self._device

    @property
    def model(self) -> AnyDemucs:
        """The wrapped demucs module (on :attr:`device`)."""
        return self._model

    def _separate_sources(
        self,
        mix: np.ndarray,
        *,
        options: SeparationOptions,
        progress: ProgressFn,
        cancel: threading.Event | None,
    ) -> dict[str, np.ndarray]:
        from demucs.apply import apply_model

        wav = torch.from_numpy(mix)
        frames = wav.shape[-1]
        tracker = _ChunkProgress(
            self._model,
            frames=frames,
            options=options,
            progress=progress,
            cancel=cancel,
        )
        with torch.inference_mode():
            ref = wav.mean(0)
            mean = ref.mean()
            std = (ref.std() if frames > 1 else torch.zeros(())) + 1e-8
            out = apply_model(
                self._model,
                ((wav - mean) / std)[None],
                shifts=int(options.shifts),
                split=bool(options.split),
                overlap=float(options.overlap),
                segment=None if options.segment is None else float(options.segment),
                progress=False,
                device=self._device,
                num_workers=0,
                callback=tracker,
                callback_arg={"audio_length": frames},
            )
            out = (out[0] * std + mean).to("cpu", torch.float32)
        return {name: out[index].numpy() for index, name in enumerate(self.sources)}

    def separate_stream(
        self,
        source: MixSource,
        *,
        options: SeparationOptions | None = None,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
        seed: int | None = None,
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Separate a mix of any length in bounded memory; yield ``(start, stems)`` in order.

        The same result as :meth:`separate` (``apply_model`` with the same options and, for the
        same ``random`` state, the same shifts), delivered as consecutive blocks: ``stems`` maps
        every source (or the two stems of ``options.two_stems``) to float32 ``(channels, n)``
        for mix frames ``[start, start + n)``. Memory holds the model's work on one chunk and a
        few chunks of audio, whatever the length of the mix.

        Parameters
        ----------
        source : MixSource
            The mix at :attr:`sample_rate` with :attr:`audio_channels` channels (e.g. a
            :class:`~audiomesh.separation.chunked.SoundFileSource`).
        options, progress, cancel
            As for :meth:`separate`; ``options.split`` must be True (``split=False`` runs the
            whole mix at once, which :meth:`separate` does).
        stats : (mean, std) or None
            The normalisation (see :func:`~audiomesh.separation.chunked.mix_stats`); computed
            from ``source`` (one extra read of it) when None.
        seed : int or None
            Draw the shift offsets from ``random.seed(seed)``: the result of ``random.seed(seed)``
            before this call, safe while other threads separate (the parts of a split song draw
            the same). None: from :mod:`random` as it is.

        Raises
        ------
        InvalidInput
            Bad options, channel count or samples (non-finite), or ``split=False``.
        Cancelled
            ``cancel`` was set.
        """
        options = (options or SeparationOptions()).validate(self)
        if not options.split:
            raise InvalidInput("separate_stream needs split=True; split=False runs the whole mix at once")
        self.check_source(source)
        if cancel is not None and cancel.is_set():
            raise Cancelled("separation cancelled")
        report = _MonotonicProgress(progress)
        report(0.0)
        mean, std = stats if stats is not None else mix_stats(source)
        separator = self.streaming_separator(options, seed=seed)
        with torch.inference_mode():
            for start, block in separator.blocks(normalized(source, mean, std), progress=report, cancel=cancel):
                out = (block * std + mean).to("cpu", torch.float32)
                stems = {name: out[index].numpy() for index, name in enumerate(self.sources)}
                if options.two_stems is not None:
                    stems = _two_stems(stems, options.two_stems)
                yield start, stems
        if cancel is not None and cancel.is_set():
            raise Cancelled("separation cancelled")
        report(1.0)

    def streaming_separator(self, options: SeparationOptions, *, seed: int | None = None) -> StreamingSeparator:
        """The chunked overlap-add of this model with ``options`` (validated by the caller)."""
        return StreamingSeparator(
            self._model,
            shifts=int(options.shifts),
            overlap=float(options.overlap),
            segment=None if options.segment is None else float(options.segment),
            device=self._device,
            seed=seed,
        )


class _ChunkProgress:
    """apply_model callback: a fraction over models × shifts × chunks, plus cancellation.

    Each (model in bag, shift) pass is one unit of equal weight. Within a unit the
    chunk count is estimated from the mix length (with shifts, apply_model runs on
    the mix plus a random 0-0.5 s pad, so the exact count is only known at the
    end); the fraction within a unit is clamped to 1 and jumps to the next unit's
    start when the next pass begins. The base class drops non-increasing values
    and sends the final 1.0.
    """

    def __init__(
        self,
        model: AnyDemucs,
        *,
        frames: int,
        options: SeparationOptions,
        progress: ProgressFn,
        cancel: threading.Event | None,
    ) -> None:
        self._progress = progress
        self._cancel = cancel
        self._passes = max(int(options.shifts), 1)
        self._chunks: list[int] = []
        for sub in _submodels(model):
            if not options.split:
                self._chunks.append(1)
                continue
            rate = int(sub.samplerate)
            length = frames + (int(_MAX_SHIFT_SECONDS * rate) // 2 if options.shifts else 0)
            segment = options.segment if options.segment is not None else float(sub.segment)
            stride = max(int((1 - options.overlap) * int(rate * segment)), 1)
            self._chunks.append(max(math.ceil(length / stride), 1))
        self._units = len(self._chunks) * self._passes
        self._unit: tuple[int, int] | None = None
        self._done = 0

    def __call__(self, event: dict[str, Any]) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("separation cancelled")
        if event.get("state") != "end":
            return
        model_idx = int(event.get("model_idx_in_bag", 0))
        shift_idx = int(event.get("shift_idx", 0))
        unit = (model_idx, shift_idx)
        if unit != self._unit:
            self._unit = unit
            self._done = 0
        self._done += 1
        chunks = self._chunks[min(model_idx, len(self._chunks) - 1)]
        within = min(self._done / chunks, 1.0)
        self._progress((model_idx * self._passes + shift_idx + within) / self._units)


def _describe(model: AnyDemucs) -> str:
    subs = _submodels(model)
    klass = type(subs[0]).__name__
    params = sum(p.numel() for p in model.parameters())
    what = f"bag of {len(subs)} {klass} models" if len(subs) > 1 else klass
    return f"{what}, {len(model.sources)} sources, {params / 1e6:.1f} M parameters"
