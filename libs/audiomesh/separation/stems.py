"""Stems into files while the model works: what the separation worker does with its blocks.

:meth:`~audiomesh.separation.DemucsModel.separate_stream` yields ``(start, {stem: block})`` as
chunks finish; :func:`write_stems` hands each item to a :class:`StemWriters` thread that encodes
and measures every stem's block (:class:`~audiomesh.audio.stream.TrackWriter`) while the model
computes the next chunk. A queue of two items keeps memory bounded; the thread runs at a lower
priority (:data:`WRITER_NICE`) so that it fills the gaps torch leaves instead of competing.

It lives beside the model layer, not in :mod:`audiomesh.audio.stream`, because it is shaped by
the model's output (a dict of stems per block) and by running next to torch; it needs no torch.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from audiomesh.audio.stream import TrackWriter
from audiomesh.dsp.loudness import Measurement
from audiomesh.errors import Cancelled

if TYPE_CHECKING:
    import torch

    from audiomesh.audio.stream import MixSource
    from audiomesh.separation.base import SeparationOptions, SeparatorModel

__all__ = ["WRITER_NICE", "StemWriters", "separate_to_files", "write_stems"]

#: Niceness added to the stem-writer thread: it encodes and measures in the gaps torch leaves.
WRITER_NICE = 5

#: What a finished stem is: its file and the measurement of what was written.
Written = dict[str, tuple[Path, Measurement | None]]


class _Abort(Exception):
    """Raised inside the writer thread to unwind its writers (each deletes its file)."""


_END = object()  # the producer is done: close every file
_ABORT = object()  # the producer failed: delete every file


class StemWriters:
    """Encode and measure blocks of named stems on a writer thread, one file per stem.

    ``put({stem: (channels, n) float32})`` for consecutive blocks, then ``finish()`` →
    ``{stem: (file, Measurement)}`` in the order the stems first came. An error on the writer
    thread is raised on the caller by the next ``put()`` or by ``finish()``. Used as a context
    manager, leaving the block without a successful ``finish()`` (an exception, a cancel)
    aborts: the thread stops and no file is left.

    Parameters
    ----------
    directory : Path
        Where the files go (``stem-<i><ext>``).
    sample_rate, channels : int
        Of every stem.
    fmt, subtype, ext : str
        Encoding, as for :class:`~audiomesh.audio.stream.TrackWriter`, and the file extension.
    threads : int
        Stems of a block encoded and measured at once. 1 beside a model (the writer only fills
        torch's gaps); more where writing is all that is left to do, as in a stitch. Measuring
        holds the GIL part of the time (the K-weighting filters), so the gain is modest: a 180 s
        stitch of 4 stems on 2 cores took 9.7-15.9 s with 2 threads against 11.3-16.6 s with 1.
    """

    def __init__(
        self,
        directory: Path,
        sample_rate: int,
        channels: int,
        *,
        fmt: str = "wav",
        subtype: str = "FLOAT",
        ext: str = ".wav",
        threads: int = 1,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.directory, self.sample_rate, self.channels = Path(directory), sample_rate, channels
        self.fmt, self.subtype, self.ext = fmt, subtype, ext
        self.writers: dict[str, TrackWriter] = {}
        self.error: BaseException | None = None
        self._queue: queue.Queue[object] = queue.Queue(maxsize=2)  # bounded: memory stays bounded
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="stem-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # lower this thread only (Linux)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        try:
            # The stack closes every writer when the producer is done, and aborts them all
            # (deleting the files) on an error here or an abort from the producer.
            with contextlib.ExitStack() as stack:
                pool = stack.enter_context(ThreadPoolExecutor(self.threads)) if self.threads > 1 else None
                while (item := self._queue.get()) is not _END:
                    if item is _ABORT:
                        raise _Abort
                    assert isinstance(item, Mapping)
                    for name in item:
                        if name not in self.writers:
                            path = self.directory / f"stem-{len(self.writers)}{self.ext}"
                            writer = TrackWriter(
                                path, self.sample_rate, self.channels, fmt=self.fmt, subtype=self.subtype
                            )
                            self.writers[name] = stack.enter_context(writer)
                    if pool is None:
                        for name, block in item.items():
                            self.writers[name].write(block)
                    else:  # each stem's writer on one thread at a time: blocks stay in order
                        futures = [pool.submit(self.writers[n].write, b) for n, b in item.items()]
                        wait(futures)  # all settled before an error unwinds (and deletes) the writers
                        for future in futures:
                            future.result()
        except _Abort:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised on the producer's thread
            self.error = exc
            while (item := self._queue.get()) is not _END and item is not _ABORT:
                pass  # drain, so the producer never blocks on a full queue

    def put(self, stems: Mapping[str, np.ndarray]) -> None:
        """Queue one block of every stem (waits while two are queued)."""
        if self.error is not None:
            raise self.error
        self._queue.put(stems)

    def finish(self) -> Written:
        """Wait for the writer; ``{stem: (file, Measurement)}`` in the order stems came."""
        self._queue.put(_END)
        self._thread.join()
        if self.error is not None:
            raise self.error
        self._finished = True
        return {name: (w.path, w.measurement) for name, w in self.writers.items()}

    def abort(self) -> None:
        """Stop the writer and delete every file (also those of a finished writer)."""
        if self._thread.is_alive():
            self._queue.put(_ABORT)
            self._thread.join()
        for writer in self.writers.values():
            writer.abort()
        self._finished = False

    def __enter__(self) -> StemWriters:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None or not self._finished:
            self.abort()


def write_stems(
    blocks: Iterable[tuple[int, Mapping[str, np.ndarray]]],
    directory: Path,
    sample_rate: int,
    channels: int,
    *,
    fmt: str = "wav",
    subtype: str = "FLOAT",
    ext: str = ".wav",
    cancelled: Callable[[], bool] = lambda: False,
    threads: int = 1,
) -> Written:
    """Write a model's ``(start, {stem: block})`` stream into one file per stem, all or nothing.

    Parameters
    ----------
    blocks : iterable of (int, mapping of str -> np.ndarray [shape=(channels, n)])
        Consecutive blocks, e.g. :meth:`~audiomesh.separation.DemucsModel.separate_stream`, or
        ``[(0, model.separate(mix))]`` for a model that separates the whole mix at once.
    directory, sample_rate, channels, fmt, subtype, ext, threads
        As for :class:`StemWriters`.
    cancelled : callable
        Asked once the blocks are done; True stops with :class:`~audiomesh.errors.Cancelled`.

    Returns
    -------
    written : dict of str -> (Path, Measurement)
        Each stem's file and the measurement of its float samples, in the order stems came.

    Any exception (from ``blocks``, the writer thread or a cancel) leaves no file behind.
    """
    with StemWriters(directory, sample_rate, channels, fmt=fmt, subtype=subtype, ext=ext, threads=threads) as sink:
        for _start, stems in blocks:
            sink.put(stems)
        if cancelled():
            raise Cancelled("separation cancelled")
        return sink.finish()


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """:mod:`random` seeded with ``seed`` inside the block, the caller's state restored after, the
    process's other separations held off meanwhile (:data:`~.chunked.RANDOM_LOCK`); None: as it is."""
    if seed is None:
        yield
        return
    from audiomesh.separation.chunked import RANDOM_LOCK

    with RANDOM_LOCK:
        saved = random.getstate()
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(saved)


def separate_to_files(
    model: SeparatorModel,
    source: MixSource,
    directory: Path,
    *,
    options: SeparationOptions,
    fmt: str,
    subtype: str,
    ext: str,
    progress: Callable[[float], None],
    cancel: threading.Event,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int | None = None,
) -> Written:
    """Separate ``source`` with ``model`` into one file per stem (:func:`write_stems`), all or nothing.

    A model that streams (:meth:`~audiomesh.separation.DemucsModel.separate_stream`) runs chunk
    by chunk, any length in bounded memory; other registered separators, and ``options.split``
    off, separate the whole array at once. ``stats``: the mix's normalisation for a model that
    streams (:func:`~audiomesh.separation.chunked.mix_stats`), computed by it when None.
    ``seed``: draw the shift offsets from ``random.seed(seed)`` (None: from :mod:`random` as it is).
    """
    separate_stream = getattr(model, "separate_stream", None)
    blocks: Iterable[tuple[int, Mapping[str, np.ndarray]]]
    if separate_stream is not None and options.split:
        blocks = separate_stream(source, options=options, progress=progress, cancel=cancel, stats=stats, seed=seed)
    else:
        mix = source.read(0, source.frames)
        with seeded(seed):
            blocks = [(0, model.separate(mix, options=options, progress=progress, cancel=cancel))]
    return write_stems(
        blocks,
        directory,
        source.sample_rate,
        source.channels,
        fmt=fmt,
        subtype=subtype,
        ext=ext,
        cancelled=cancel.is_set,
    )
