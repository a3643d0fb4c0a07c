"""Composite worker: named input keys → summed tracks (main, main_harmonic, main_percussive)."""

from __future__ import annotations

import tempfile

from audiomesh import errors
from audiomesh.config import Settings
from audiomesh.dsp.composite import mix
from audiomesh.rpc import Registration, ServiceSpec, run_in_thread
from audiomesh.store import ObjectStore
from audiomesh.telemetry import bind_job
from audiomesh.tracks import Outputs, fetch_audio
from audiomesh.v1 import composite_pb2, composite_pb2_grpc


class CompositeServicer(composite_pb2_grpc.CompositeServiceServicer):
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def Composite(self, request: composite_pb2.CompositeRequest, context):
        if not request.composites:
            raise errors.InvalidInput("at least one composite is required")
        for spec in request.composites:
            if not spec.name or not spec.output_key or not spec.input_keys:
                raise errors.InvalidInput(f"composite {spec.name!r} needs a name, an output_key and input_keys")

        def work(cancel) -> list:
            with tempfile.TemporaryDirectory(prefix="audiomesh-comp-") as tmp, Outputs(self.store, tmp) as outputs:
                tracks = []
                for spec in request.composites:
                    signals, rate = {}, None
                    for key in spec.input_keys:
                        signals[key], rate = fetch_audio(self.store, key, tmp)
                        if cancel.is_set():
                            raise errors.Cancelled("composite cancelled")
                    tracks.append(outputs.publish(spec.name, spec.output_key, mix(signals), rate, request.encoding))
                return tracks

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
