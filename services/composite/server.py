"""Composite worker: named input keys → summed tracks (main, main_harmonic, main_percussive).

Any length in bounded memory: the inputs are read in place block by block, summed as
:func:`audiomesh.dsp.composite.mix` sums whole signals (the same result, bit for bit), and
encoded and measured as they go; the composites of a request run on parallel threads.
"""

from __future__ import annotations

import contextlib
import threading

import grpc

from audiomesh import errors, scratch
from audiomesh.audio.stream import MixSource, write_track
from audiomesh.config import Settings
from audiomesh.dsp.composite import mix_blocks
from audiomesh.parallel import map_threads
from audiomesh.rpc import Registration, ServiceSpec, run_in_thread
from audiomesh.store import ObjectStore
from audiomesh.telemetry import bind_job
from audiomesh.tracks import Outputs, encoding_spec, open_source
from audiomesh.v1 import common_pb2, composite_pb2, composite_pb2_grpc


class CompositeServicer(composite_pb2_grpc.CompositeServiceServicer):
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def Composite(
        self, request: composite_pb2.CompositeRequest, context: grpc.aio.ServicerContext
    ) -> composite_pb2.CompositeResponse:
        if not request.composites:
            raise errors.InvalidInput("at least one composite is required")
        for spec in request.composites:
            if not spec.name or not spec.output_key or not spec.input_keys:
                raise errors.InvalidInput(f"composite {spec.name!r} needs a name, an output_key and input_keys")
        fmt, subtype, ext = encoding_spec(request.encoding)

        def work(cancel: threading.Event) -> list[common_pb2.Track]:
            with scratch.workdir("comp-") as tmp, Outputs(self.store, tmp) as outputs:

                def composite(spec: composite_pb2.CompositeSpec) -> common_pb2.Track:
                    path = outputs.scratch_path(ext)
                    with contextlib.ExitStack() as stack:
                        sources: dict[str, MixSource] = {
                            key: stack.enter_context(open_source(self.store, key, tmp)) for key in spec.input_keys
                        }
                        first = sources[spec.input_keys[0]]
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
