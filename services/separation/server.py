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

from audiomesh import errors, metrics, scratch
from audiomesh.config import Settings
from audiomesh.memory import limit_arenas, release_memory
from audiomesh.options import separation_options
from audiomesh.rpc import Registration, ServiceSpec, stream_work
from audiomesh.separation import SeparatorFactory
from audiomesh.separation.compiled import Activity, BackgroundCompiler, configure_cache, graph_calls
from audiomesh.separation.execution import execution_value, model_info_pb
from audiomesh.separation.registry import configure_torch_threads, log_runtime
from audiomesh.separation.stems import separate_to_files
from audiomesh.store import ObjectStore
from audiomesh.telemetry import bind_job, logger
from audiomesh.tracks import ENCODINGS, Outputs, open_source
from audiomesh.v1 import common_pb2, separation_pb2, separation_pb2_grpc

Report = Callable[[float, str], None]


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
                    written = separate_to_files(
                        model, source, tmp, options=options, fmt=fmt, subtype=subtype, ext=ext,
                        progress=progress, cancel=cancel,
                    )  # fmt: skip
                report(0.95, "writing stems")
                return [
                    outputs.publish_file(stem, f"{request.output_prefix}/{stem}.wav", path, measured)
                    for stem, (path, measured) in written.items()
                ]

        def result(done: tuple[list[common_pb2.Track], int]) -> separation_pb2.SeparateResponse:
            stems, compiled_calls = done
            elapsed = time.perf_counter() - started
            # The audio separated: every stem is as long as the mix (at the model's rate).
            separated = max((t.audio.duration_seconds for t in stems), default=0.0)
            metrics.SEPARATED_AUDIO.labels(model=name).inc(max(0.0, separated))
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
        log_runtime(compile_mode=settings.compile)

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
