"""The contract every separation model implements, and the options it takes.

A :class:`SeparatorModel` turns one mix into named sources. It is pure Python/torch:
no gRPC, no object store, no audio files. The separation service is a thin adapter
that decodes audio, calls :meth:`SeparatorModel.separate`, and writes the stems.

Subclasses implement :meth:`SeparatorModel._separate_sources` (all sources of one
mix); the base class validates the mix and the options, reports progress as a
monotonic fraction ending at 1.0, honours cancellation, and builds the two-stem
result.
"""

from __future__ import annotations

import abc
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from audiomesh.errors import Cancelled, FailedPrecondition, InvalidInput
from audiomesh.ranges import RANGES

if TYPE_CHECKING:
    from audiomesh.audio.stream import MixSource

__all__ = [
    "MAX_SHIFTS",
    "ModelInfo",
    "Origin",
    "ProgressFn",
    "SeparationOptions",
    "SeparatorModel",
    "resolve_device",
]

#: Where a model's weights come from.
Origin = Literal["pretrained", "local_repo", "builtin"]

#: ``progress(fraction)`` with ``0.0 <= fraction <= 1.0``.
ProgressFn = Callable[[float], None]

#: Upper bound on ``SeparationOptions.shifts``: each shift is one more full pass.
MAX_SHIFTS = int(RANGES["separation.shifts"].maximum)


@dataclass(frozen=True)
class ModelInfo:
    """What a model is, without loading it (fields mirror ``audiomesh.v1.ModelInfo``).

    Attributes
    ----------
    name : str
        The name clients ask for (``"htdemucs"``).
    sources : tuple of str
        Source names in output order (``("drums", "bass", "other", "vocals")``);
        empty when not known before loading.
    sample_rate : int
        The rate the model runs at; the mix must be resampled to it.
    audio_channels : int
        The channel count the model runs at (2 for every Demucs release).
    origin : {"pretrained", "local_repo", "builtin"}
        Where the weights come from.
    description : str
        One line for humans.
    kind : str
        The registry kind that builds it (``"demucs"``).
    max_segment : float or None
        Longest chunk, in seconds, the model accepts (Transformer models); ``None``
        when any length works.
    available : bool
        Whether the weights can be loaded here without a download.
    loaded : bool
        Whether the model is loaded in this process.
    execution : str
        For a loaded model, how it runs: ``"eager"``, ``"compiling"`` (eager while a compiled
        copy is built), ``"compiled"``, ``"compile_failed"`` (eager) or ``"eager_faster"``
        (compiled, but eager was faster here); ``""`` when not loaded.
    compile_error : str
        Why, when ``execution == "compile_failed"``.
    chunk_seconds : tuple of float or None
        ``(eager, compiled)`` seconds for one chunk as timed after compiling; ``None`` before.
    """

    name: str
    sources: tuple[str, ...]
    sample_rate: int
    audio_channels: int
    origin: Origin
    description: str = ""
    kind: str = "demucs"
    max_segment: float | None = None
    available: bool = True
    loaded: bool = False
    execution: str = ""
    compile_error: str = ""
    chunk_seconds: tuple[float, float] | None = None


@dataclass(frozen=True)
class SeparationOptions:
    """How to run a separation (the knobs of ``demucs.apply.apply_model``).

    Attributes
    ----------
    shifts : int
        Number of random time shifts (0 to 0.5 s) whose predictions are averaged,
        0 to 20. ``0`` runs the mix once, unshifted; ``1`` (the demucs CLI default)
        runs it once with one random shift; each extra shift costs a full pass.
    overlap : float
        Overlap between consecutive chunks, in [0, 1).
    segment : float or None
        Chunk length in seconds; ``None`` uses the model's own. Only with
        ``split=True``. Transformer models (HTDemucs) cannot take chunks longer
        than the segment they were trained on.
    two_stems : str or None
        A source name: deliver only that source and ``no_<source>`` (the sum of
        all the other sources, as ``demucs --two-stems`` does).
    split : bool
        Cut the mix into chunks of ``segment`` seconds. ``False`` runs the whole
        mix at once (memory grows with its length; for HTDemucs the mix must fit
        one segment).
    """

    shifts: int = 1
    overlap: float = 0.25
    segment: float | None = None
    two_stems: str | None = None
    split: bool = True

    def validate(self, model: SeparatorModel | ModelInfo) -> SeparationOptions:
        """Check every option against ``model`` (a loaded model or its description); return ``self``.

        Raises
        ------
        InvalidInput
            With a message stating the rule that was broken.
        """
        shifts = self.shifts
        if isinstance(shifts, bool) or not isinstance(shifts, int | np.integer):
            raise InvalidInput(f"shifts must be an integer from 0 to {MAX_SHIFTS}, got {shifts!r}")
        if not 0 <= shifts <= MAX_SHIFTS:
            raise InvalidInput(
                f"shifts must be from 0 to {MAX_SHIFTS} (each shift is one more full pass over the mix), got {shifts}"
            )
        overlap = self.overlap
        if isinstance(overlap, bool) or not isinstance(overlap, int | float | np.number):
            raise InvalidInput(f"overlap must be a number in [0, 1), got {overlap!r}")
        if not (math.isfinite(overlap) and 0.0 <= overlap < 1.0):
            raise InvalidInput(f"overlap must be in [0, 1) (a fraction of the segment), got {overlap}")
        if not isinstance(self.split, bool | np.bool_):
            raise InvalidInput(f"split must be a boolean, got {self.split!r}")
        if self.segment is not None:
            segment = self.segment
            if isinstance(segment, bool) or not isinstance(segment, int | float | np.number):
                raise InvalidInput(f"segment must be a number of seconds > 0 or None, got {segment!r}")
            if not self.split:
                raise InvalidInput("segment only applies with split=True (split=False runs the whole mix)")
            if not (math.isfinite(segment) and segment > 0):
                raise InvalidInput(f"segment must be > 0 seconds, got {segment}")
            if model.max_segment is not None and segment > model.max_segment:
                raise InvalidInput(
                    f"segment must be <= {model.max_segment:g} s for model '{model.name}': a Transformer "
                    f"model cannot run on chunks longer than it was trained on; got {segment:g}"
                )
            frames = int(model.sample_rate * segment)
            if int((1.0 - overlap) * frames) < 1:
                raise InvalidInput(
                    f"segment x (1 - overlap) must span at least one frame at {model.sample_rate} Hz, "
                    f"got segment={segment:g} s, overlap={overlap:g}"
                )
        if self.two_stems is not None and self.two_stems not in model.sources:
            raise InvalidInput(
                f"two_stems must be one of the sources of model '{model.name}' "
                f"({', '.join(model.sources)}), got {self.two_stems!r}"
            )
        return self


def resolve_device(device: str) -> str:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a concrete torch device string.

    ``"auto"`` is ``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``.

    Raises
    ------
    InvalidInput
        For any other value.
    FailedPrecondition
        For a CUDA device when torch sees no CUDA device.
    """
    import torch

    if not isinstance(device, str):
        raise InvalidInput(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    value = device.strip().lower()
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return "cpu"
    if value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        if not torch.cuda.is_available():
            raise FailedPrecondition(
                f"device {device!r} was requested but torch sees no CUDA device "
                f"(torch {torch.__version__}); use device 'cpu' or 'auto'"
            )
        if ":" in value and int(value[5:]) >= torch.cuda.device_count():
            raise FailedPrecondition(
                f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)"
            )
        return value
    raise InvalidInput(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class _MonotonicProgress:
    """Forward only strictly increasing fractions, clamped to [0, 1]."""

    def __init__(self, report: ProgressFn | None) -> None:
        self._report = report
        self._last = -1.0

    def __call__(self, fraction: float) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        if self._report is not None and fraction > self._last:
            self._last = fraction
            self._report(fraction)


class SeparatorModel(abc.ABC):
    """A loaded separation model: one mix in, named sources out.

    Subclasses set :attr:`info` and implement :meth:`_separate_sources`.
    """

    info: ModelInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def sources(self) -> tuple[str, ...]:
        return self.info.sources

    @property
    def sample_rate(self) -> int:
        return self.info.sample_rate

    @property
    def audio_channels(self) -> int:
        return self.info.audio_channels

    @property
    def max_segment(self) -> float | None:
        """Longest chunk in seconds the model accepts, ``None`` for no limit."""
        return self.info.max_segment

    @property
    def device(self) -> str:
        """The torch device the model runs on."""
        return "cpu"

    @property
    def execution(self) -> str:
        """How :meth:`separate` runs: ``"eager"``, or ``"compiled"`` for a compiled model."""
        return "eager"

    def check_mix(self, mix: np.ndarray, options: SeparationOptions) -> np.ndarray:
        """Validate ``mix`` for this model; return it as C-contiguous float32.

        Raises
        ------
        InvalidInput
            Wrong rank or channel count, no frames, non-finite samples, or a mix
            too long for one chunk with ``split=False``.
        """
        if not isinstance(mix, np.ndarray):
            raise InvalidInput(f"mix must be a numpy array of shape (channels, frames), got {type(mix).__name__}")
        if mix.ndim != 2:
            raise InvalidInput(f"mix must have shape (channels, frames), got shape {mix.shape}")
        if mix.shape[0] != self.audio_channels:
            raise InvalidInput(
                f"mix must have {self.audio_channels} channels for model '{self.name}' "
                f"(shape (channels, frames)), got shape {mix.shape}"
            )
        if mix.shape[1] < 1:
            raise InvalidInput("mix must have at least one frame")
        if not np.issubdtype(mix.dtype, np.floating):
            raise InvalidInput(f"mix must hold floating-point samples, got dtype {mix.dtype}")
        mix = np.ascontiguousarray(mix, dtype=np.float32)
        if not np.isfinite(mix).all():
            raise InvalidInput("mix must hold finite samples (found NaN or infinity)")
        if not options.split and self.max_segment is not None:
            limit = int(self.max_segment * self.sample_rate)
            margin = self.sample_rate // 2 if options.shifts else 0
            if mix.shape[1] + margin > limit:
                raise InvalidInput(
                    f"split=False runs the whole mix as one chunk, and model '{self.name}' takes at most "
                    f"{self.max_segment:g} s per chunk ({(limit - margin) / self.sample_rate:g} s of mix "
                    f"with shifts > 0); got {mix.shape[1] / self.sample_rate:g} s: use split=True"
                )
        return mix

    def separate(
        self,
        mix: np.ndarray,
        *,
        options: SeparationOptions | None = None,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, np.ndarray]:
        """Separate ``mix`` into sources.

        Parameters
        ----------
        mix : np.ndarray [shape=(channels, frames), dtype=float32]
            The mix at :attr:`sample_rate` with :attr:`audio_channels` channels.
        options : SeparationOptions, keyword-only
            Validated against this model first; default ``SeparationOptions()``.
        progress : callable, keyword-only
            Called with a fraction in [0, 1]: strictly increasing, the last call is 1.0.
            Runs on the separating thread; exceptions it raises abort the separation.
        cancel : threading.Event, keyword-only
            When set, the separation stops within one chunk and raises ``Cancelled``.

        Returns
        -------
        stems : dict of str to np.ndarray [shape=(channels, frames), dtype=float32]
            Every source of the model, in :attr:`sources` order; with
            ``options.two_stems = s`` only ``s`` and ``"no_" + s`` (the sum of the
            other sources).

        Raises
        ------
        InvalidInput
            Bad mix or options.
        Cancelled
            ``cancel`` was set.
        """
        options = (options or SeparationOptions()).validate(self)
        mix = self.check_mix(mix, options)
        if cancel is not None and cancel.is_set():
            raise Cancelled("separation cancelled")
        report = _MonotonicProgress(progress)
        report(0.0)
        stems = self._separate_sources(mix, options=options, progress=report, cancel=cancel)
        if cancel is not None and cancel.is_set():
            raise Cancelled("separation cancelled")
        if options.two_stems is not None:
            stems = _two_stems(stems, options.two_stems)
        report(1.0)
        return stems

    def check_source(self, source: MixSource) -> None:
        """``source`` is a mix this model can separate chunk by chunk (raises ``InvalidInput``):
        at its rate and channel count, not empty."""
        if source.channels != self.audio_channels:
            raise InvalidInput(
                f"mix must have {self.audio_channels} channels for model '{self.name}', got {source.channels}"
            )
        if source.sample_rate != self.sample_rate:
            raise InvalidInput(
                f"mix must be at {self.sample_rate} Hz for model '{self.name}', got {source.sample_rate} Hz"
            )
        if source.frames < 1:
            raise InvalidInput("mix must have at least one frame")

    @abc.abstractmethod
    def _separate_sources(
        self,
        mix: np.ndarray,
        *,
        options: SeparationOptions,
        progress: ProgressFn,
        cancel: threading.Event | None,
    ) -> dict[str, np.ndarray]:
        """Return every source of a validated float32 ``mix`` (the options are validated too).

        Call ``progress`` with fractions in [0, 1] as work completes (it drops
        non-increasing values) and raise ``Cancelled`` soon after ``cancel`` is set.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, sources={list(self.sources)}, device={self.device!r})"


def _two_stems(stems: dict[str, np.ndarray], stem: str) -> dict[str, np.ndarray]:
    """``{stem, no_<stem>}`` where ``no_<stem>`` sums the other sources (demucs' ``--other-method add``)."""
    rest = [audio for name, audio in stems.items() if name != stem]
    other = np.zeros_like(stems[stem])
    for audio in rest:
        other += audio
    return {stem: stems[stem], f"no_{stem}": other}
