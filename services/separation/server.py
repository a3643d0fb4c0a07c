"""Separation worker: object key in → Demucs (or another registered separator) → stem keys out."""

from __future__ import annotations

import asyncio
import tempfile
import time

import torch

from audiomesh import errors
from audiomesh.config import Settings
from audiomesh.options import separation_options
from audiomesh.rpc import Registration, ServiceSpec, stream_work
from audiomesh.separation import SeparatorFactory
from audiomesh.separation.registry import configure_torch_threads
from audiomesh.store import ObjectStore
from audiomesh.telemetry import bind_job, logger
from audiomesh.tracks import Outputs, fetch_audio
from audiomesh.v1 import common_pb2, separation_pb2, separation_pb2_grpc


def model_info_pb(info, *, available: bool = True, loaded: bool = False) -> separation_pb2.ModelInfo:
    return separation_pb2.ModelInfo(
        name=info.name,
        sources=list(info.sources),
        sample_rate=info.sample_rate,
        audio_channels=info.audio_channels,
        origin=info.origin,
        available=getattr(info, "available", available),
        loaded=getattr(info, "loaded", loaded),
        description=getattr(info, "description", ""),
        max_segment_seconds=info.max_segment,
    )


def _progress(fraction: float, text: str) -> separation_pb2.SeparateResponse:
    return separation_pb2.SeparateResponse(progress=common_pb2.Progress(fraction=fraction, message=text))


class SeparationServicer(separation_pb2_grpc.SeparationServiceServicer):
    def __init__(self, settings: Settings, store: ObjectStore, factory: SeparatorFactory) -> None:
        self.settings = settings
        self.store = store
        self.factory = factory

    async def Separate(self, request: separation_pb2.SeparateRequest, context):
        if not request.input_key or not request.output_prefix:
            raise errors.InvalidInput("input_key and output_prefix are required")
        name = request.model or self.settings.default_model
        model = await asyncio.to_thread(self.factory.get, name)
        options = separation_options(request.options)
        options.validate(model)
        started = time.perf_counter()

        def work(report, cancel) -> list[common_pb2.Track]:
            with tempfile.TemporaryDirectory(prefix="audiomesh-sep-") as tmp, Outputs(self.store, tmp) as outputs:
                report(0.0, "loading audio")
                mix, rate = fetch_audio(
                    self.store, request.input_key, tmp, sample_rate=model.sample_rate, channels=model.audio_channels
                )
                stems = model.separate(
                    mix, options=options, progress=lambda f: report(0.95 * f, "separating"), cancel=cancel
                )
                if cancel.is_set():
                    raise errors.Cancelled("separation cancelled")
                report(0.95, "writing stems")
                return [
                    outputs.publish(src, f"{request.output_prefix}/{src}.wav", y, rate, request.encoding)
                    for src, y in stems.items()
                ]

        def result(stems: list[common_pb2.Track]) -> separation_pb2.SeparateResponse:
            elapsed = time.perf_counter() - started
            logger(model=name).info("separate done", seconds=round(elapsed, 2))
            return separation_pb2.SeparateResponse(
                result=separation_pb2.SeparateResult(
                    stems=stems, model=name, elapsed_seconds=elapsed, device=str(model.device)
                )
            )

        with bind_job(request.job_id):
            logger(model=name).info("separate start", input_key=request.input_key)
            async for message in stream_work(work, progress_message=_progress, result_message=result):
                yield message

    async def ListModels(self, request, context):
        infos = await asyncio.to_thread(self.factory.list_models)
        return separation_pb2.ListModelsResponse(
            models=[model_info_pb(i) for i in infos], default_model=self.settings.default_model
        )


def build(settings: Settings) -> ServiceSpec:
    if settings.torch_threads:
        configure_torch_threads(settings.torch_threads)
    factory = SeparatorFactory(model_repo=settings.model_repo, device=settings.device)
    servicer = SeparationServicer(settings, settings.open_store(), factory)

    async def warmup() -> None:
        # Load the default model before reporting SERVING; a model without weights here is
        # not fatal (others may be usable), it is reported per request with how to fix it.
        try:
            await asyncio.to_thread(factory.get, settings.default_model)
        except errors.AudiomeshError as exc:
            logger().warning("default model not loaded", model=settings.default_model, reason=str(exc))
        logger().info("torch", threads=torch.get_num_threads(), cuda=torch.cuda.is_available())

    return ServiceSpec(
        registrations=[
            Registration(
                separation_pb2_grpc.add_SeparationServiceServicer_to_server,
                servicer,
                separation_pb2.DESCRIPTOR.services_by_name["SeparationService"].full_name,
            )
        ],
        warmup=warmup,
        concurrency=settings.worker_concurrency,
        light_methods=(f"/{separation_pb2.DESCRIPTOR.services_by_name['SeparationService'].full_name}/ListModels",),
    )
