"""Composite worker: named input keys → summed tracks (main, main_harmonic, main_percussive).

An input may also come in consecutive parts (``input_parts``: a stem's HPSS computed in parts
on several workers), read as one signal across the part boundaries — never joined on disk.

Any length in bounded memory: the inputs are read in place block by block, summed as
:func:`audiomesh.dsp.composite.mix` sums whole signals (the same result, bit for bit), and
encoded and measured as they go; the composites of a request run on parallel threads.
"""

from __future__ import annotations

import contextlib
import threading

import grpc

from audiomesh import errors, scratch
from audiomesh.audio.stream import JoinedSource, MixSource, write_track
from audiomesh.config import Settings
from audiomesh.dsp.composite import mix_blocks
from audiomesh.parallel import map_threads
from audiomesh.rpc import Registration, ServiceSpec, run_in_thread
from audiomesh.store import ObjectStore
from audiomesh.telemetry import bind_job
from audiomesh.tracks import Outputs, encoding_spec, open_source
from audiomesh.v1 import common_pb2, composite_pb2, composite_pb2_grpc

#: Most parts one input may be made of (a stem's HPSS split in at most 64 parts).
MAX_INPUT_PARTS = 64


class CompositeServicer(composite_pb2_grpc.CompositeServiceServicer):
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def Composite(
        self, request: composite_pb2.CompositeRequest, context: grpc.aio.ServicerContext
    ) -> composite_pb2.CompositeResponse:
        if not request.composites:
            raise errors.InvalidInput("at least one composite is required")
        for spec in request.composites:
            if not spec.name or not spec.output_key or not (spec.input_keys or spec.input_parts):
                raise errors.InvalidInput(
                    f"composite {spec.name!r} needs a name, an output_key and input_keys or input_parts"
                )
            for parts in spec.input_parts:
                if not 1 <= len(parts.keys) <= MAX_INPUT_PARTS:
                    raise errors.InvalidInput(
                        f"composite {spec.name!r}: an input of input_parts has {len(parts.keys)} keys; "
                        f"it needs 1 to {MAX_INPUT_PARTS}"
                    )
        fmt, subtype, ext = encoding_spec(request.encoding)

        def work(cancel: threading.Event) -> list[common_pb2.Track]:
            with scratch.workdir("comp-") as tmp, Outputs(self.store, tmp) as outputs:

                def composite(spec: composite_pb2.CompositeSpec) -> common_pb2.Track:
                    path = outputs.scratch_path(ext)
                    with contextlib.ExitStack() as stack:

                        def opened(key: str) -> MixSource:
                            return stack.enter_context(open_source(self.store, key, tmp))

                        sources: dict[str, MixSource] = {key: opened(key) for key in spec.input_keys}
                        for parts in spec.input_parts:  # named by their keys in error messages
                            sources[" + ".join(parts.keys)] = JoinedSource(
                                [opened(key) for key in parts.keys], parts.keys
                            )
                        first = next(iter(sources.values()))
                        measured = write_track(
                            path,
                            mix_blocks(sources),
                            first.sample_rate,
                            first.channels,
                            fmt=fmt,
                            subtype=subtype,
                            cancelled=cancel.is_set,
                            what="composite",
                        )
                    return outputs.publish_file(spec.name, spec.output_key, path, measured)

                return map_threads(composite, request.composites)

        with bind_job(request.job_id):
            return composite_pb2.CompositeResponse(tracks=await run_in_thread(work))


def build(settings: Settings) -> ServiceSpec:
    return ServiceSpec(
        registrations=[
            Registration(
                composite_pb2_grpc.add_CompositeServiceServicer_to_server,
                CompositeServicer(settings.open_store()),
                composite_pb2.DESCRIPTOR.services_by_name["CompositeService"].full_name,
            )
        ],
        concurrency=settings.worker_concurrency,
    )
