"""Separation worker: object key in → Demucs (or another registered separator) → stem keys out.

Songs of any length in bounded memory: the mix is read from its file in place, Demucs runs
chunk by chunk (:meth:`~audiomesh.separation.DemucsModel.separate_stream`, the same result as
``apply_model``), and each finished block of every stem is encoded and measured by a writer
thread while the model works on the next chunk. Models without ``separate_stream`` (other
registered separators) and ``split=False`` take the whole-array path.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable

import grpc
import torch

from audiomesh import errors, scratch
from audiomesh.config import Settings
from audiomesh.memory import allocator, limit_arenas, release_memory
from audiomesh.options import separation_options
from audiomesh.rpc import Registration, ServiceSpec, stream_work
from audiomesh.separation import ModelInfo, SeparatorFactory
from audiomesh.separation.compiled import Activity, BackgroundCompiler, configure_cache, graph_calls
from audiomesh.separation.execution import execution_value
from audiomesh.separation.registry import configure_torch_threads
from audiomesh.separation.stems import write_stems
from audiomesh.store import ObjectStore
from audiomesh.telemetry import bind_job, logger
from audiomesh.tracks import ENCODINGS, Outputs, open_source
from audiomesh.v1 import common_pb2, separation_pb2, separation_pb2_grpc

Report = Callable[[float, str], None]


def model_info_pb(info: ModelInfo, *, available: bool = True, loaded: bool = False) -> separation_pb2.ModelInfo:
    eager_s, compiled_s = getattr(info, "chunk_seconds", None) or (None, None)
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
        execution=execution_value(getattr(info, "execution", "")),
        compile_error=getattr(info, "compile_error", ""),
        eager_chunk_seconds=eager_s,
        compiled_chunk_seconds=compiled_s,
    )


def _progress(fraction: float, text: str) -> separation_pb2.SeparateResponse:
    return separation_pb2.SeparateResponse(progress=common_pb2.Progress(fraction=fraction, message=text))


class SeparationServicer(separation_pb2_grpc.SeparationServiceServicer):
    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        factory: SeparatorFactory,
        *,
        compiler: BackgroundCompiler | None = None,
        activity: Activity | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.factory = factory
        self.compiler = compiler
        self.activity = activity or Activity()

    async def Separate(
        self, request: separation_pb2.SeparateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[separation_pb2.SeparateResponse]:
        if not request.input_key or not request.output_prefix:
            raise errors.InvalidInput("input_key and output_prefix are required")
        name = request.model or self.settings.default_model
        model = await asyncio.to_thread(self.factory.get, name)
        options = separation_options(request.options)
        options.validate(model)
        fmt, subtype, ext = ENCODINGS[request.encoding]
        started = time.perf_counter()

        def work(report: Report, cancel: threading.Event) -> tuple[list[common_pb2.Track], int]:
            # `model` stays this request's model even if a compiled one replaces it meanwhile.
            with self.activity:  # background compiles wait for no separation to run
                before = graph_calls()
                try:
                    return separate(report, cancel), graph_calls() - before
                finally:
                    release_memory()  # the model's working set goes back: the next request starts lean

        def separate(report: Report, cancel: threading.Event) -> list[common_pb2.Track]:
            def progress(fraction: float) -> None:
                report(0.95 * fraction, "separating")

            with scratch.workdir("sep-") as tmp, Outputs(self.store, tmp) as outputs:
                report(0.0, "loading audio")
                # Read in place when already at the model's rate and channels (the decoded mix always is).
                with open_source(
                    self.store, request.input_key, tmp, sample_rate=model.sample_rate, channels=model.audio_channels
                ) as source:
                    if hasattr(model, "separate_stream") and options.split:  # any length, bounded memory
                        blocks = model.separate_stream(source, options=options, progress=progress, cancel=cancel)
                    else:  # other registered separators, and split=False: the whole array at once
                        mix = source.read(0, source.frames)
                        blocks = [(0, model.separate(mix, options=options, progress=progress, cancel=cancel))]
                    rate, channels = source.sample_rate, source.channels
                    written = write_stems(
                        blocks, tmp, rate, channels, fmt=fmt, subtype=subtype, ext=ext, cancelled=cancel.is_set
                    )
                report(0.95, "writing stems")
                return [
                    outputs.publish_file(stem, f"{request.output_prefix}/{stem}.wav", path, measured)
                    for stem, (path, measured) in written.items()
                ]

        def result(done: tuple[list[common_pb2.Track], int]) -> separation_pb2.SeparateResponse:
            stems, compiled_calls = done
            elapsed = time.perf_counter() - started
            warnings = self.compiler.warnings(model) if self.compiler is not None else []
            execution = "compile_failed" if warnings else "compiled" if compiled_calls else "eager"
            log = logger(model=name)
            log.info("separate done", seconds=round(elapsed, 2), execution=execution, compiled_calls=compiled_calls)
            for warning in warnings:
                log.warning("separation warning", warning=warning)
            return separation_pb2.SeparateResponse(
                result=separation_pb2.SeparateResult(
                    stems=stems,
                    model=name,
                    elapsed_seconds=elapsed,
                    device=str(model.device),
                    execution=execution_value(execution),
                    warnings=warnings,
                )
            )

        with bind_job(request.job_id):
            logger(model=name).info("separate start", input_key=request.input_key)
            async for message in stream_work(work, progress_message=_progress, result_message=result):
                yield message

    async def ListModels(
        self, request: separation_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> separation_pb2.ListModelsResponse:
        infos = await asyncio.to_thread(self.factory.list_models)
        return separation_pb2.ListModelsResponse(
            models=[model_info_pb(i) for i in infos], default_model=self.settings.default_model
        )


def build(settings: Settings) -> ServiceSpec:
    limit_arenas(2)  # see audiomesh.memory: peak RSS stays that of one request
    if settings.torch_threads:
        configure_torch_threads(settings.torch_threads)
    factory = SeparatorFactory(model_repo=settings.model_repo, device=settings.device)
    activity, compiler = Activity(), None
    if settings.compile != "false":
        # Every model loaded from now on is served eager at once and compiled in the background.
        compiler = BackgroundCompiler(
            factory,
            mode=settings.compile,
            backend=settings.compile_backend,
            cache_dir=configure_cache(settings.compile_cache_path()),
            activity=activity,
        )
    servicer = SeparationServicer(settings, settings.open_store(), factory, compiler=compiler, activity=activity)

    async def warmup() -> None:
        # Load the default model before reporting SERVING; a model without weights here is
        # not fatal (others may be usable), it is reported per request with how to fix it.
        try:
            await asyncio.to_thread(factory.get, settings.default_model)
        except errors.AudiomeshError as exc:
            logger().warning("default model not loaded", model=settings.default_model, reason=str(exc))
        release_memory()  # what loading freed (jemalloc keeps it otherwise) is not held while idle
        logger().info(
            "torch",
            threads=torch.get_num_threads(),
            cuda=torch.cuda.is_available(),
            compile=settings.compile,
            allocator=allocator(),
        )
        if allocator() != "jemalloc" and not torch.cuda.is_available():
            logger().warning(
                "separation runs on the C library's malloc: install libjemalloc2 (Debian/Ubuntu) and start "
                "the worker through `audiomesh up` (or LD_PRELOAD it): a CPU chunk runs 1.2x faster with it "
                "(BENCHMARKS.md)"
            )

    async def on_stop() -> None:
        if compiler is not None:
            compiler.close()

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
        on_stop=on_stop,
    )
