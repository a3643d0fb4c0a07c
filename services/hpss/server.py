"""HPSS worker: object key in → harmonic and percussive keys out (librosa-identical).

Any length in bounded memory: the input is read from its file in place, block by block
(:func:`~audiomesh.dsp.hpss.hpss_blocks`, equal to the whole-signal result), and both parts are
encoded and measured as each block comes out. Threads per request: ``AUDIOMESH_HPSS_THREADS``
(the launcher sets 1 so that concurrent requests, and separation beside them, share the cores
without oversubscribing them).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from audiomesh import errors, scratch
from audiomesh.audio.stream import write_tracks
from audiomesh.config import Settings
from audiomesh.dsp.hpss import MAX_PARTS, hpss_blocks, part_samples, warmup
from audiomesh.memory import limit_arenas, release_memory
from audiomesh.options import hpss_kwargs
from audiomesh.rpc import Registration, ServiceSpec, stream_work
from audiomesh.store import ObjectStore
from audiomesh.telemetry import bind_job, logger
from audiomesh.tracks import Outputs, encoding_spec, open_source
from audiomesh.v1 import common_pb2, hpss_pb2, hpss_pb2_grpc

Report = Callable[[float, str], None]


class HpssServicer(hpss_pb2_grpc.HpssServiceServicer):
    def __init__(self, store: ObjectStore, *, threads: int | None = None) -> None:
        self.store = store
        self.threads = threads

    async def Decompose(
        self, request: hpss_pb2.DecomposeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[hpss_pb2.DecomposeResponse]:
        if not (request.input_key and request.harmonic_key and request.percussive_key):
            raise errors.InvalidInput("input_key, harmonic_key and percussive_key are required")
        kwargs = hpss_kwargs(request.options)
        part = _part(request.part)
        fmt, subtype, ext = encoding_spec(request.encoding)
        started = time.perf_counter()

        def work(report: Report, cancel: threading.Event) -> list[common_pb2.Track]:
            try:
                with scratch.workdir("hpss-") as tmp, Outputs(self.store, tmp) as outputs:
                    report(0.0, "loading audio")
                    keys = {"harmonic": request.harmonic_key, "percussive": request.percussive_key}
                    paths = [Path(tmp) / f"{name}{ext}" for name in keys]
                    with open_source(self.store, request.input_key, Path(tmp)) as source:
                        start, stop = (0, source.frames)
                        if part is not None:
                            start, stop = part_samples(source.frames, part, hop_length=kwargs["hop_length"])
                        report(0.05, "decomposing")
                        blocks = hpss_blocks(source, max_workers=self.threads, part=part, **kwargs)
                        measured = write_tracks(
                            paths,
                            ((h, p) for _start, h, p in blocks),
                            source.sample_rate,
                            source.channels,
                            fmt=fmt,
                            subtype=subtype,
                            # A part is not a track anyone hears: its loudness means nothing.
                            measure=not request.skip_loudness and part is None,
                            cancelled=cancel.is_set,
                            progress=lambda done: report(0.05 + 0.9 * done / (stop - start), "decomposing"),
                            what="hpss",
                        )
                    report(0.95, "writing")
                    return [
                        outputs.publish_file(name, key, path, m)
                        for (name, key), path, m in zip(keys.items(), paths, measured, strict=True)
                    ]
            finally:
                release_memory()

        def result(tracks: list[common_pb2.Track]) -> hpss_pb2.DecomposeResponse:
            elapsed = time.perf_counter() - started
            logger().info("hpss done", input_key=request.input_key, seconds=round(elapsed, 2))
            return hpss_pb2.DecomposeResponse(
                result=hpss_pb2.DecomposeResult(harmonic=tracks[0], percussive=tracks[1], elapsed_seconds=elapsed)
            )

        with bind_job(request.job_id):
            async for message in stream_work(work, progress_message=_progress, result_message=result):
                yield message


def _part(pb: hpss_pb2.HpssPart) -> tuple[int, int] | None:
    """The request's part as (index, count), or None for the whole signal; checked."""
    if pb.count <= 1:
        if pb.index:
            raise errors.InvalidInput(f"part.index {pb.index} needs part.count >= 2 (count 0 or 1: the whole signal)")
        return None
    if pb.count > MAX_PARTS or pb.index >= pb.count:
        raise errors.InvalidInput(
            f"part must have 2 <= count <= {MAX_PARTS} and index < count, got {pb.index} of {pb.count}"
        )
    return pb.index, pb.count


def _progress(fraction: float, text: str) -> hpss_pb2.DecomposeResponse:
    return hpss_pb2.DecomposeResponse(progress=common_pb2.Progress(fraction=fraction, message=text))


def build(settings: Settings) -> ServiceSpec:
    async def warm() -> None:
        await asyncio.to_thread(warmup)  # librosa/numba JIT: at start, not in the first job

    limit_arenas(2)
    threads = settings.hpss_threads or None
    return ServiceSpec(
        registrations=[
            Registration(
                hpss_pb2_grpc.add_HpssServiceServicer_to_server,
                HpssServicer(settings.open_store(), threads=threads),
                hpss_pb2.DESCRIPTOR.services_by_name["HpssService"].full_name,
            )
        ],
        warmup=warm,
        concurrency=settings.worker_concurrency,
    )
