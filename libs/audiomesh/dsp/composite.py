"""Composite tracks: sample-wise sums of same-shaped signals (e.g. ``main = Σ accompaniment``).

Pure functions, no I/O: `mix` sums arrays, `mix_blocks` sums long signals read block by
block from :class:`~audiomesh.audio.stream.MixSource` readers, with the same result.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from audiomesh.audio.stream import BLOCK_FRAMES, MixSource
from audiomesh.errors import InvalidInput

__all__ = ["check_same_shape", "mix", "mix_blocks"]


def mix(signals: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> np.ndarray:
    """Sum signals of one shape into one, accumulating in float64.

    Parameters
    ----------
    signals : mapping of name -> np.ndarray, or sequence of np.ndarray [shape=(channels, n) or (n,)]
        Floating-point signals, all of the same shape. Names (mapping keys, or
        ``signals[i]`` for a sequence) appear in error messages.

    Returns
    -------
    mixed : np.ndarray [shape=the inputs' shape]
        The sample-wise sum, in the inputs' common dtype (float32 inputs give float32;
        any float64 input gives float64). The sum is accumulated in float64, then cast
        once. Nothing is clipped.

    Raises
    ------
    audiomesh.errors.InvalidInput
        If there are no signals, one is not a floating-point array, or the shapes differ
        (the message names the first mismatching input and says whether its channel count
        or its length differs).

    Examples
    --------
    >>> import numpy as np
    >>> from audiomesh.dsp.composite import mix
    >>> drums = np.full((2, 3), 0.25, dtype=np.float32)
    >>> bass = np.full((2, 3), 0.5, dtype=np.float32)
    >>> mix({"drums": drums, "bass": bass})
    array([[0.75, 0.75, 0.75],
           [0.75, 0.75, 0.75]], dtype=float32)
    """
    if isinstance(signals, Mapping):
        named = [(str(name), s) for name, s in signals.items()]
    elif isinstance(signals, Sequence) and not isinstance(signals, (str, bytes, np.ndarray)):
        named = [(f"signals[{i}]", s) for i, s in enumerate(signals)]
    else:
        raise InvalidInput(
            f"signals must be a mapping of name to array or a sequence of arrays, got {type(signals).__name__}"
        )
    if not named:
        raise InvalidInput("mix needs at least one input signal, got none")

    for name, s in named:
        if not isinstance(s, np.ndarray) or not np.issubdtype(s.dtype, np.floating):
            kind = f"dtype {s.dtype}" if isinstance(s, np.ndarray) else type(s).__name__
            raise InvalidInput(f"input {name!r} must be a floating-point numpy.ndarray, got {kind}")
        if s.ndim not in (1, 2):
            raise InvalidInput(f"input {name!r} must have shape (channels, n) or (n,), got {s.shape}")

    check_same_shape({name: s.shape for name, s in named})
    first = named[0][1]
    total = np.zeros(first.shape, dtype=np.float64)
    for _, s in named:
        total += s
    return total.astype(np.result_type(*(s.dtype for _, s in named)), copy=False)


def mix_blocks(sources: Mapping[str, MixSource], *, block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """`mix` of long signals, block by block: the same samples, bit for bit, in bounded memory.

    Parameters
    ----------
    sources : mapping of name -> MixSource
        At least one, all of one shape ``(channels, frames)`` and one sample rate. Names
        appear in error messages.
    block_frames : int
        Frames per block (the last one may be shorter).

    Yields
    ------
    block : np.ndarray [shape=(channels, n)]
        Consecutive blocks of the sum, covering every frame.

    Raises
    ------
    audiomesh.errors.InvalidInput
        Before the first block, if there are no sources, or they differ in shape (as
        `check_same_shape` says) or in sample rate.
    """
    if not sources:
        raise InvalidInput("mix needs at least one input signal, got none")
    check_same_shape({name: (s.channels, s.frames) for name, s in sources.items()})
    rates = {name: s.sample_rate for name, s in sources.items()}
    if len(set(rates.values())) > 1:
        raise InvalidInput(f"inputs to mix differ in sample rate: {rates}")
    frames = next(iter(sources.values())).frames
    for start in range(0, frames, block_frames):
        stop = min(start + block_frames, frames)
        yield mix({name: s.read(start, stop) for name, s in sources.items()})


def check_same_shape(shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise `InvalidInput` naming the first input whose shape differs from the first one's.

    For callers that mix long signals block by block: check the whole shapes once, up front.
    """
    (first_name, first), *rest = shapes.items()
    for name, shape in rest:
        if shape == first:
            continue
        if len(shape) == len(first) == 2 and shape[0] != first[0]:
            what = f"{shape[0]} channels but {first_name!r} has {first[0]}"
        elif len(shape) == len(first):
            what = f"{shape[-1]} samples but {first_name!r} has {first[-1]}"
        else:
            what = f"shape {shape} but {first_name!r} has shape {first}"
        raise InvalidInput(f"all inputs to mix must have the same shape: input {name!r} has {what}")
