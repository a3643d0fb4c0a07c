"""Normalize worker: measures loudness and writes gain-adjusted tracks.

Linked (default): one gain for every track, computed from the reference (the mix) and lowered
when any track would pass the true-peak ceiling, so normalized stems still sum to the
normalized mix. Per-track: each track reaches the target on its own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from audiomesh import errors
from audiomesh.audio.io import probe, read_audio
from audiomesh.config import Settings
from audiomesh.dsp.loudness import measure
from audiomesh.dsp.normalize import apply_gain_db, linked_gain_db, per_track_gain_db
from audiomesh.options import normalization
from audiomesh.rpc import Registration, ServiceSpec, run_in_thread
from audiomesh.store import ObjectStore
from audiomesh.telemetry import bind_job
from audiomesh.tracks import Outputs, audio_info_pb, fetch_audio, loudness_pb
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

        def work(cancel):
            with tempfile.TemporaryDirectory(prefix="audiomesh-norm-") as tmp:
                signals = {item.name: fetch_audio(self.store, item.input_key, tmp) for item in request.items}
                before = {name: measure(y, rate) for name, (y, rate) in signals.items()}
                reference_key = request.reference_key or request.items[0].input_key
                ref_y, ref_rate = fetch_audio(self.store, reference_key, tmp)
                reference = measure(ref_y, ref_rate)
                limited = False
                if mode == "off":
                    gains = dict.fromkeys(signals, 0.0)
                    shared = 0.0
                elif linked:
                    shared = linked_gain_db(
                        reference, list(before.values()), mode=mode, target=target, ceiling_dbtp=ceiling
                    )
                    unbounded = linked_gain_db(reference, [], mode=mode, target=target, ceiling_dbtp=None)
                    limited = shared < unbounded - 1e-9
                    gains = dict.fromkeys(signals, shared)
                else:
                    shared = 0.0
                    gains = {
                        name: per_track_gain_db(m, mode=mode, target=target, ceiling_dbtp=ceiling)
                        for name, m in before.items()
                    }
                if cancel.is_set():
                    raise errors.Cancelled("normalize cancelled")
                with Outputs(self.store, tmp) as outputs:
                    tracks = []
                    for item in request.items:
                        y, rate = signals[item.name]
                        track = outputs.publish(
                            item.name, item.output_key, apply_gain_db(y, gains[item.name]), rate, request.encoding
                        )
                        tracks.append(
                            normalize_pb2.NormalizedTrack(
                                track=track, before=loudness_pb(before[item.name]), gain_db=gains[item.name]
                            )
                        )
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
            out = []
            with tempfile.TemporaryDirectory(prefix="audiomesh-measure-") as tmp:
                for n, key in enumerate(request.keys):
                    local = Path(tmp) / f"m{n}"
                    self.store.get_to_file(key, local)
                    info = probe(local)
                    y, rate = read_audio(local)
                    local.unlink()
                    out.append(
                        normalize_pb2.Measurement(
                            key=key, loudness=loudness_pb(measure(y, rate)), audio=audio_info_pb(info)
                        )
                    )
            return normalize_pb2.MeasureResponse(measurements=out)

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
