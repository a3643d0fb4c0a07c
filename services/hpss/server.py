"""HPSS worker: object key in → harmonic and percussive keys out (librosa-identical)."""

from __future__ import annotations

import asyncio
import tempfile
import time

from audiomesh import errors
from audiomesh.config import Settings
from audiomesh.dsp.hpss import hpss, warmup
from audiomesh.options import hpss_kwargs
from audiomesh.rpc import Registration, ServiceSpec, stream_work
from audiomesh.store import ObjectStore
from audiomesh.telemetry import bind_job, logger
from audiomesh.tracks import Outputs, fetch_audio
from audiomesh.v1 import common_pb2, hpss_pb2, hpss_pb2_grpc


class HpssServicer(hpss_pb2_grpc.HpssServiceServicer):
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def Decompose(self, request: hpss_pb2.DecomposeRequest, context):
        if not (request.input_key and request.harmonic_key and request.percussive_key):
            raise errors.InvalidInput("input_key, harmonic_key and percussive_key are required")
        kwargs = hpss_kwargs(request.options)
        started = time.perf_counter()

        def work(report, cancel) -> tuple[common_pb2.Track, common_pb2.Track]:
            with tempfile.TemporaryDirectory(prefix="audiomesh-hpss-") as tmp, Outputs(self.store, tmp) as outputs:
                report(0.0, "loading audio")
                y, rate = fetch_audio(self.store, request.input_key, tmp)
                report(0.1, "decomposing")
                harmonic, percussive = hpss(y, **kwargs)
                if cancel.is_set():
                    raise errors.Cancelled("hpss cancelled")
                report(0.9, "writing")
                return (
                    outputs.publish("harmonic", request.harmonic_key, harmonic, rate, request.encoding),
                    outputs.publish("percussive", request.percussive_key, percussive, rate, request.encoding),
                )

        def result(tracks: tuple[common_pb2.Track, common_pb2.Track]) -> hpss_pb2.DecomposeResponse:
            elapsed = time.perf_counter() - started
            logger().info("hpss done", input_key=request.input_key, seconds=round(elapsed, 2))
            return hpss_pb2.DecomposeResponse(
                result=hpss_pb2.DecomposeResult(harmonic=tracks[0], percussive=tracks[1], elapsed_seconds=elapsed)
            )

        with bind_job(request.job_id):
            async for message in stream_work(work, progress_message=_progress, result_message=result):
                yield message


def _progress(fraction: float, text: str) -> hpss_pb2.DecomposeResponse:
    return hpss_pb2.DecomposeResponse(progress=common_pb2.Progress(fraction=fraction, message=text))


def build(settings: Settings) -> ServiceSpec:
    async def warm() -> None:
        await asyncio.to_thread(warmup)  # librosa/numba JIT: at start, not in the first job

    return ServiceSpec(
        registrations=[
            Registration(
                hpss_pb2_grpc.add_HpssServiceServicer_to_server,
                HpssServicer(settings.open_store()),
                hpss_pb2.DESCRIPTOR.services_by_name["HpssService"].full_name,
            )
        ],
        warmup=warm,
        concurrency=settings.worker_concurrency,
    )
