"""Normalize worker: measures loudness and writes gain-adjusted tracks.

Linked (default): one gain for every track, computed from the reference (the mix) and lowered
when any track would pass the true-peak ceiling, so normalized stems still sum to the
normalized mix. Per-track: each track reaches the target on its own.

Each input is measured once, by the worker that wrote it (the orchestrator passes its
``Track.loudness``; an input without one is measured here). The tracks are then written on
parallel threads, block by block from their files (bounded memory), with the gain applied; only
their loudness is measured again on the way (the true peak after a gain is the one before plus
the gain, up to float rounding).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from audiomesh import errors, scratch
from audiomesh.audio.io import probe
from audiomesh.audio.stream import TrackWriter, iter_blocks, measure_source
from audiomesh.config import Settings
from audiomesh.dsp.loudness import Measurement
from audiomesh.dsp.normalize import apply_gain_db, linked_gain_db, per_track_gain_db
from audiomesh.options import normalization
from audiomesh.parallel import map_threads
from audiomesh.rpc import Registration, ServiceSpec, run_in_thread
from audiomesh.store import ObjectStore
from audiomesh.telemetry import bind_job
from audiomesh.tracks import (
    ENCODINGS,
    Outputs,
    audio_info_pb,
    loudness_pb,
    measurement_from_pb,
    open_local,
    open_source,
)
from audiomesh.v1 import normalize_pb2, normalize_pb2_grpc


class NormalizeServicer(normalize_pb2_grpc.NormalizeServiceServicer):
    def __init__(self, settings: Settings, store: ObjectStore) -> None:
        self.settings = settings
        self.store = store

    async def Normalize(self, request: normalize_pb2.NormalizeRequest, context):
        if not request.items:
            raise errors.InvalidInput("at least one item is required")
        for item in request.items:
            if not (item.name and item.input_key and item.output_key):
                raise errors.InvalidInput(f"item {item.name!r} needs a name, an input_key and an output_key")
        norm = normalization(request.options, self.settings)
        mode, target, ceiling, linked = norm.mode, norm.target, norm.ceiling_dbtp, norm.linked
        fmt, subtype, ext = ENCODINGS[request.encoding]

        def work(cancel):
            with scratch.workdir("norm-") as tmp:

                def measured(key: str) -> Measurement:
                    with open_source(self.store, key, tmp) as source:
                        return measure_source(source, cancel.is_set)

                # Levels before gain: as the workers that wrote the inputs measured them, else here.
                before = dict(
                    zip(
                        [item.name for item in request.items],
                        map_threads(
                            lambda item: (
                                measurement_from_pb(item.loudness)
                                if item.HasField("loudness")
                                else measured(item.input_key)
                            ),
                            request.items,
                        ),
                        strict=True,
                    )
                )
                reference_key = request.reference_key or request.items[0].input_key
                if request.HasField("reference_loudness"):
                    reference = measurement_from_pb(request.reference_loudness)
                else:
                    same = [before[item.name] for item in request.items if item.input_key == reference_key]
                    reference = same[0] if same else measured(reference_key)
                limited = False
                if mode == "off":
                    gains = dict.fromkeys(before, 0.0)
                    shared = 0.0
                elif linked:
                    shared = linked_gain_db(
                        reference, list(before.values()), mode=mode, target=target, ceiling_dbtp=ceiling
                    )
                    unbounded = linked_gain_db(reference, [], mode=mode, target=target, ceiling_dbtp=None)
                    limited = shared < unbounded - 1e-9
                    gains = dict.fromkeys(before, shared)
                else:
                    shared = 0.0
                    gains = {
                        name: per_track_gain_db(m, mode=mode, target=target, ceiling_dbtp=ceiling)
                        for name, m in before.items()
                    }
                if cancel.is_set():
                    raise errors.Cancelled("normalize cancelled")

                def write(item) -> normalize_pb2.NormalizedTrack:
                    gain = gains[item.name]
                    with open_source(self.store, item.input_key, tmp) as source:
                        path = outputs.scratch_path(ext)
                        # The true peak after a gain is the one before plus the gain (upsampling is
                        # linear): only loudness (its gates are absolute too) is measured again.
                        writer = TrackWriter(
                            path, source.sample_rate, source.channels, fmt=fmt, subtype=subtype, true_peak=False
                        )
                        try:
                            for _start, block in iter_blocks(source):
                                if cancel.is_set():
                                    raise errors.Cancelled("normalize cancelled")
                                writer.write(apply_gain_db(block, gain))
                            after = writer.close()
                        except BaseException:
                            writer.abort()
                            raise
                    true_peak = max(after.sample_peak_dbfs, before[item.name].true_peak_dbtp + gain)
                    track = outputs.publish_file(
                        item.name, item.output_key, path, dataclasses.replace(after, true_peak_dbtp=true_peak)
                    )
                    return normalize_pb2.NormalizedTrack(
                        track=track, before=loudness_pb(before[item.name]), gain_db=gain
                    )

                with Outputs(self.store, tmp) as outputs:
                    tracks = map_threads(write, request.items)
                return normalize_pb2.NormalizeResponse(
                    tracks=tracks,
                    reference=loudness_pb(reference),
                    linked_gain_db=shared,
                    limited_by_ceiling=limited,
                )

        with bind_job(request.job_id):
            return await run_in_thread(work)

    async def Measure(self, request: normalize_pb2.MeasureRequest, context):
        if not request.keys:
            raise errors.InvalidInput("at least one key is required")

        def work(cancel):
            def one(key: str) -> normalize_pb2.Measurement:
                with scratch.workdir("measure-") as tmp:
                    local = Path(tmp) / "input"
                    self.store.get_to_file(key, local)
                    info = probe(local)
                    with open_local(local) as source:
                        loudness = measure_source(source, cancel.is_set)
                return normalize_pb2.Measurement(key=key, loudness=loudness_pb(loudness), audio=audio_info_pb(info))

            return normalize_pb2.MeasureResponse(measurements=map_threads(one, request.keys))

        return await run_in_thread(work)


def build(settings: Settings) -> ServiceSpec:
    return ServiceSpec(
        registrations=[
            Registration(
                normalize_pb2_grpc.add_NormalizeServiceServicer_to_server,
                NormalizeServicer(settings, settings.open_store()),
                normalize_pb2.DESCRIPTOR.services_by_name["NormalizeService"].full_name,
            )
        ],
        concurrency=settings.worker_concurrency,
    )
