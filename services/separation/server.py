"""Separation worker: object key in → Demucs (or another registered separator) → stem keys out.

Songs of any length in bounded memory: the mix is read from its file in place, Demucs runs
chunk by chunk (:meth:`~audiomesh.separation.DemucsModel.separate_stream`, the same result as
``apply_model``), and each finished block of every stem is encoded and measured by a writer
thread while the model works on the next chunk. Models without ``separate_stream`` (other
registered separators) and ``split=False`` take the whole-array path.

One song can also be split across workers: a Separate with ``chunk_range`` computes part
``index`` of ``count`` of the song's chunks and writes their partial sums as one object
(:func:`~audiomesh.separation.split.separate_range`); Stitch joins the parts into the stems one
whole Separate with the same ``shift_seed`` writes (:func:`~audiomesh.separation.split.stitch_ranges`).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc

from audiomesh import errors, metrics, scratch
from audiomesh.config import Settings
from audiomesh.hashing import file_sha256
from audiomesh.memory import limit_arenas, release_memory
from audiomesh.options import check_options_for_kind, separation_options
from audiomesh.rpc import Registration, ServiceSpec, stream_work
from audiomesh.separation import SeparationOptions, SeparatorFactory, SeparatorModel, split
from audiomesh.separation.compiled import Activity, BackgroundCompiler, configure_cache, graph_calls
from audiomesh.separation.demucs_model import DemucsModel
from audiomesh.separation.execution import execution_value, model_info_pb
from audiomesh.separation.registry import configure_torch_threads, log_runtime
from audiomesh.separation.stems import separate_to_files, write_stems
from audiomesh.store import ObjectStore, validate_key, validate_prefix
from audiomesh.telemetry import bind_job, logger
from audiomesh.tracks import Outputs, encoding_spec, open_source
from audiomesh.v1 import common_pb2, separation_pb2, separation_pb2_grpc

Report = Callable[[float, str], None]


def _progress(fraction: float, text: str) -> separation_pb2.SeparateResponse:
    return separation_pb2.SeparateResponse(progress=common_pb2.Progress(fraction=fraction, message=text))


def _check_key(field: str, key: str) -> None:
    try:
        validate_key(key)
    except errors.InvalidInput as exc:
        raise errors.InvalidInput(f"{field}: {exc}") from None


def _check_prefix(field: str, prefix: str) -> None:
    try:
        validate_prefix(f"{prefix}/")
    except errors.InvalidInput as exc:
        raise errors.InvalidInput(f"{field}: {exc}") from None


def chunk_range(request: separation_pb2.SeparateRequest) -> tuple[int, int] | None:
    """``(index, count)`` of the part of the song a Separate asks for; None: the whole song.

    Raises
    ------
    InvalidInput
        Naming the field: ``chunk_range.count`` above :data:`~audiomesh.separation.split.MAX_RANGES`,
        ``chunk_range.index`` not below the count, ``range_key`` missing with a part, set without
        one, or not a valid object key.
    """
    index, count = request.chunk_range.index, request.chunk_range.count
    if count > split.MAX_RANGES:
        raise errors.InvalidInput(
            f"chunk_range.count must be at most {split.MAX_RANGES} parts (0 or 1: the whole song), got {count}"
        )
    if count <= 1:
        if index != 0:
            raise errors.InvalidInput(
                f"chunk_range.index must be 0 when chunk_range.count is {count} (the whole song), got {index}"
            )
        if request.range_key:
            raise errors.InvalidInput(
                "range_key is only for a part (chunk_range.count >= 2); the whole song is written as stems "
                "under output_prefix"
            )
        return None
    if index >= count:
        raise errors.InvalidInput(f"chunk_range.index must be below chunk_range.count ({count}), got {index}")
    if not request.range_key:
        raise errors.InvalidInput("range_key is required with chunk_range (count >= 2): the object the part goes to")
    _check_key("range_key", request.range_key)
    return index, count


def _check_splittable(model: SeparatorModel, name: str, options: SeparationOptions, shift_seed: int) -> None:
    if not isinstance(model, DemucsModel):
        raise errors.FailedPrecondition(
            f"model '{name}' cannot be split into chunk ranges: only Demucs models separate chunk by chunk; "
            "leave chunk_range unset to separate the whole song"
        )
    if not options.split:
        raise errors.InvalidInput("chunk_range needs options.split: the parts are ranges of the song's chunks")
    if options.shifts and not shift_seed:
        raise errors.InvalidInput(
            "shift_seed must be set (not 0) with chunk_range when options.shifts > 0: every part of the song "
            "must draw the same shift offsets"
        )


def check_range_keys(keys: Sequence[str]) -> None:
    """Stitch's ``range_keys``: 2 to MAX_RANGES distinct valid object keys (InvalidInput otherwise)."""
    if not 2 <= len(keys) <= split.MAX_RANGES:
        raise errors.InvalidInput(f"range_keys must name 2 to {split.MAX_RANGES} parts, got {len(keys)}")
    for i, key in enumerate(keys):
        _check_key(f"range_keys[{i}]", key)
    repeated = next((key for key in keys if keys.count(key) > 1), None)
    if repeated is not None:
        raise errors.InvalidInput(f"range_keys must be distinct: {repeated!r} appears {keys.count(repeated)} times")


def _check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise errors.ResourceExhausted(
            f"stitching needs {need} bytes of scratch space for the parts, {free} are free in {folder}"
        )


def _publish_part(outputs: Outputs, name: str, key: str, local: Path) -> common_pb2.Track:
    """Publish a part (not audio: no measurement) as ``key`` and delete ``local``."""
    track = common_pb2.Track(name=name, key=key, sha256=file_sha256(local), size_bytes=local.stat().st_size)
    outputs.keys.append(key)  # before the upload: a failure or cancel removes a partial one too
    outputs.store.put_file(key, local)
    local.unlink(missing_ok=True)
    return track


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
        part = chunk_range(request)
        if not request.input_key:
            raise errors.InvalidInput("input_key is required")
        if part is None and not request.output_prefix:
            raise errors.InvalidInput("output_prefix is required: stems are written as {output_prefix}/{stem}.wav")
        name = request.model or self.settings.default_model
        model = await asyncio.to_thread(self.factory.get, name)
        check_options_for_kind(request.options, model.info.kind, name)
        options = separation_options(request.options)
        options.validate(model)
        if part is not None:
            _check_splittable(model, name, options, request.shift_seed)
        fmt, subtype, ext = encoding_spec(request.encoding)
        started = time.perf_counter()

        def work(report: Report, cancel: threading.Event) -> tuple[list[common_pb2.Track], int]:
            # `model` stays this request's model even if a compiled one replaces it meanwhile.
            with self.activity:  # background compiles wait for no separation to run
                before = graph_calls()
                try:
                    tracks = separate(report, cancel) if part is None else separate_part(report, cancel, *part)
                    return tracks, graph_calls() - before
                finally:
                    release_memory()  # the model's working set goes back: the next request starts lean

        def progress(report: Report) -> Callable[[float], None]:
            return lambda fraction: report(0.95 * fraction, "separating")

        def separate(report: Report, cancel: threading.Event) -> list[common_pb2.Track]:
            with scratch.workdir("sep-") as tmp, Outputs(self.store, tmp) as outputs:
                report(0.0, "loading audio")
                # Read in place when already at the model's rate and channels (the decoded mix always is).
                with open_source(
                    self.store, request.input_key, tmp, sample_rate=model.sample_rate, channels=model.audio_channels
                ) as source:
                    written = separate_to_files(
                        model, source, tmp, options=options, fmt=fmt, subtype=subtype, ext=ext,
                        progress=progress(report), cancel=cancel,
                        seed=request.shift_seed or None,  # the offsets a split of this song draws too
                    )  # fmt: skip
                report(0.95, "writing stems")
                return [
                    outputs.publish_file(stem, f"{request.output_prefix}/{stem}.wav", path, measured)
                    for stem, (path, measured) in written.items()
                ]

        def separate_part(report: Report, cancel: threading.Event, index: int, count: int) -> list[common_pb2.Track]:
            assert isinstance(model, DemucsModel)  # _check_splittable
            with scratch.workdir("sep-") as tmp, Outputs(self.store, tmp) as outputs:
                report(0.0, "loading audio")
                local = outputs.scratch_path(".range")
                with open_source(
                    self.store, request.input_key, tmp, sample_rate=model.sample_rate, channels=model.audio_channels
                ) as source:
                    split.separate_range(
                        model, source, local, options=options, index=index, count=count, seed=request.shift_seed,
                        progress=progress(report), cancel=cancel,
                    )  # fmt: skip
                report(0.95, "writing part")
                return [_publish_part(outputs, f"range-{index}-of-{count}", request.range_key, local)]

        def result(done: tuple[list[common_pb2.Track], int]) -> separation_pb2.SeparateResponse:
            tracks, compiled_calls = done
            elapsed = time.perf_counter() - started
            if part is None:  # a part's audio is counted once, by the Stitch of all parts
                # The audio separated: every stem is as long as the mix (at the model's rate).
                separated = max((t.audio.duration_seconds for t in tracks), default=0.0)
                metrics.SEPARATED_AUDIO.labels(model=name).inc(max(0.0, separated))
            warnings = self.compiler.warnings(model) if self.compiler is not None else []
            execution = "compile_failed" if warnings else "compiled" if compiled_calls else "eager"
            log = logger(model=name)
            log.info("separate done", seconds=round(elapsed, 2), execution=execution, compiled_calls=compiled_calls)
            for warning in warnings:
                log.warning("separation warning", warning=warning)
            return separation_pb2.SeparateResponse(
                result=separation_pb2.SeparateResult(
                    stems=tracks if part is None else [],
                    range=tracks[0] if part is not None else None,
                    model=name,
                    elapsed_seconds=elapsed,
                    device=str(model.device),
                    execution=execution_value(execution),
                    warnings=warnings,
                )
            )

        with bind_job(request.job_id):
            where = {} if part is None else {"chunk_range": f"{part[0]}/{part[1]}", "range_key": request.range_key}
            logger(model=name).info("separate start", input_key=request.input_key, **where)
            async for message in stream_work(work, progress_message=_progress, result_message=result):
                yield message

    async def Stitch(
        self, request: separation_pb2.StitchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[separation_pb2.SeparateResponse]:
        keys = list(request.range_keys)
        check_range_keys(keys)
        if not request.output_prefix:
            raise errors.InvalidInput("output_prefix is required: stems are written as {output_prefix}/{stem}.wav")
        _check_prefix("output_prefix", request.output_prefix)
        options = separation_options(request.options)  # only two_stems applies: the parts fixed the rest
        fmt, subtype, ext = encoding_spec(request.encoding)
        started = time.perf_counter()

        def download(report: Report, cancel: threading.Event, tmp: Path) -> list[Path]:
            """Every part into ``tmp`` (on disk, not in memory), its header checked against its place.

            NOT_FOUND naming a missing part comes before anything is downloaded.
            """
            sizes = []
            for i, key in enumerate(keys):
                try:
                    sizes.append(self.store.stat(key).size)
                except errors.NotFound:
                    raise errors.NotFound(
                        f"range_keys[{i}]: no part {key!r} in the store (its Separate with chunk_range has not "
                        "written it)"
                    ) from None
            _check_disk(tmp, sum(sizes))
            parts = []
            for i, key in enumerate(keys):
                if cancel.is_set():
                    raise errors.Cancelled("stitch cancelled")
                parts.append(tmp / f"range_keys[{i}].range")  # the name the library's messages give it
                self.store.get_to_file(key, parts[-1])
                info = split.read_range_info(parts[-1])
                if info.count != len(keys):
                    raise errors.InvalidInput(
                        f"range_keys names {len(keys)} parts, but range_keys[{i}] ({key!r}) is part {info.index} "
                        f"of {info.count}"
                    )
                if info.index != i:
                    raise errors.InvalidInput(
                        f"range_keys must list the parts in index order: range_keys[{i}] ({key!r}) is part "
                        f"{info.index} of {info.count}"
                    )
                report(0.2 * (i + 1) / len(keys), "downloading parts")
            return parts

        def work(report: Report, cancel: threading.Event) -> tuple[list[common_pb2.Track], split.RangeInfo]:
            with scratch.workdir("stitch-") as tmp, Outputs(self.store, tmp) as outputs:
                report(0.0, "downloading parts")
                parts = download(report, cancel, tmp)
                info = split.read_range_info(parts[0])
                if request.model and request.model != info.model:
                    raise errors.InvalidInput(
                        f"model must name the parts' model '{info.model}' (or be empty), got {request.model!r}"
                    )
                if options.two_stems is not None and options.two_stems not in info.sources:
                    raise errors.InvalidInput(
                        f"options.two_stems must be one of the sources of model '{info.model}' "
                        f"({', '.join(info.sources)}), got {options.two_stems!r}"
                    )
                blocks = split.stitch_ranges(
                    parts,
                    two_stems=options.two_stems,
                    progress=lambda fraction: report(0.2 + 0.75 * fraction, "stitching"),
                    cancel=cancel,
                )
                # Writing is all that is left here (no model beside it): the stems on the worker's cores.
                threads = min(2 if options.two_stems else len(info.sources), configure_torch_threads(None))
                written = write_stems(
                    blocks, tmp, info.sample_rate, info.channels, fmt=fmt, subtype=subtype, ext=ext,
                    cancelled=cancel.is_set, threads=max(1, threads),
                )  # fmt: skip
                report(0.95, "writing stems")
                stems = [
                    outputs.publish_file(stem, f"{request.output_prefix}/{stem}.wav", path, measured)
                    for stem, (path, measured) in written.items()
                ]
                return stems, info

        def result(done: tuple[list[common_pb2.Track], split.RangeInfo]) -> separation_pb2.SeparateResponse:
            stems, info = done
            elapsed = time.perf_counter() - started
            separated = max((t.audio.duration_seconds for t in stems), default=0.0)
            metrics.SEPARATED_AUDIO.labels(model=info.model).inc(max(0.0, separated))
            logger(model=info.model).info("stitch done", seconds=round(elapsed, 2), parts=len(keys))
            return separation_pb2.SeparateResponse(
                result=separation_pb2.SeparateResult(
                    stems=stems, model=info.model, elapsed_seconds=elapsed, device="cpu"
                )
            )

        with bind_job(request.job_id):
            logger(model=request.model).info("stitch start", parts=len(keys), output_prefix=request.output_prefix)
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
            nice=settings.compile_nice,
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
