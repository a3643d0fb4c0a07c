"""Normalize worker: measures loudness and writes gain-adjusted tracks.

Linked (default): one gain for every track, computed from the reference (the mix) and lowered
when any track would pass the true-peak ceiling, so normalized stems still sum to the
normalized mix. Per-track: each track reaches the target on its own.

Each input is measured once, by the worker that wrote it (the orchestrator passes its
``Track.loudness``; an input without one is measured here). The tracks are then written on
parallel threads, block by block from their files (bounded memory), with the gain applied; only
their loudness is measured again on the way (the true peak after a gain is the one before plus
the gain, up to float rounding). MP3 (the one lossy encoding, delivered tracks only) is measured
in full as it decodes: the levels reported are those of the file a user plays.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from audiomesh import errors, ranges, scratch
from audiomesh.audio.io import LOSSY_FORMATS, probe
from audiomesh.audio.stream import iter_blocks, measure_source, write_track
from audiomesh.config import Settings
from audiomesh.dsp.loudness import Measurement
from audiomesh.dsp.normalize import after_gain, apply_gain_db, choose_reference, normalize_gains
from audiomesh.options import normalization
from audiomesh.parallel import map_threads
from audiomesh.rpc import Registration, ServiceSpec, run_in_thread
from audiomesh.store import ObjectStore
from audiomesh.telemetry import bind_job
from audiomesh.tracks import (
    Outputs,
    audio_info_pb,
    encoding_spec,
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

    async def Normalize(
        self, request: normalize_pb2.NormalizeRequest, context: grpc.aio.ServicerContext
    ) -> normalize_pb2.NormalizeResponse:
        if not request.items:
            raise errors.InvalidInput("at least one item is required")
        for item in request.items:
            if not (item.name and item.input_key and item.output_key):
                raise errors.InvalidInput(f"item {item.name!r} needs a name, an input_key and an output_key")
        norm = normalization(request.options, self.settings)
        fmt, subtype, ext = encoding_spec(request.encoding)
        ranges.check("mp3_bitrate_kbps", request.mp3_bitrate_kbps)
        bitrate_kbps = request.mp3_bitrate_kbps or ranges.DEFAULT_MP3_BITRATE_KBPS
        lossy = fmt in LOSSY_FORMATS
        items = list(request.items)

        def work(cancel: threading.Event) -> normalize_pb2.NormalizeResponse:
            with scratch.workdir("norm-") as tmp, Outputs(self.store, tmp) as outputs:

                def measured(key: str) -> Measurement:
                    with open_source(self.store, key, tmp) as source:
                        return measure_source(source, cancel.is_set)

                # Levels before gain: as the workers that wrote the inputs measured them, else here.
                before = map_threads(
                    lambda item: (
                        measurement_from_pb(item.loudness) if item.HasField("loudness") else measured(item.input_key)
                    ),
                    items,
                )
                reference_key, same = choose_reference([item.input_key for item in items], request.reference_key)
                if request.HasField("reference_loudness"):
                    reference = measurement_from_pb(request.reference_loudness)
                else:
                    reference = before[same] if same is not None else measured(reference_key)
                gains = normalize_gains(
                    before,
                    reference,
                    mode=norm.mode,
                    target=norm.target,
                    ceiling_dbtp=norm.ceiling_dbtp,
                    linked=norm.linked,
                )
                if cancel.is_set():
                    raise errors.Cancelled("normalize cancelled")

                def write(i: int) -> normalize_pb2.NormalizedTrack:
                    item, gain, path = items[i], gains.gains_db[i], outputs.scratch_path(ext)
                    with open_source(self.store, item.input_key, tmp) as source:
                        blocks = (apply_gain_db(block, gain) for _start, block in iter_blocks(source))
                        # Only loudness and sample peak are measured again (see after_gain); an MP3 is
                        # measured in full as it decodes (the encoder moves its peaks).
                        after = write_track(
                            path,
                            blocks,
                            source.sample_rate,
                            source.channels,
                            fmt=fmt,
                            subtype=subtype,
                            true_peak=False,
                            bitrate_kbps=bitrate_kbps,
                            cancelled=cancel.is_set,
                            what="normalize",
                        )
                    assert after is not None  # measured: write_track measures unless told not to
                    levels = after if lossy else after_gain(before[i], gain, after)
                    track = outputs.publish_file(item.name, item.output_key, path, levels)
                    return normalize_pb2.NormalizedTrack(track=track, before=loudness_pb(before[i]), gain_db=gain)

                return normalize_pb2.NormalizeResponse(
                    tracks=map_threads(write, range(len(items))),
                    reference=loudness_pb(reference),
                    linked_gain_db=gains.linked_gain_db,
                    limited_by_ceiling=gains.limited_by_ceiling,
                )

        with bind_job(request.job_id):
            return await run_in_thread(work)

    async def Measure(
        self, request: normalize_pb2.MeasureRequest, context: grpc.aio.ServicerContext
    ) -> normalize_pb2.MeasureResponse:
        if not request.keys:
            raise errors.InvalidInput("at least one key is required")

        def work(cancel: threading.Event) -> normalize_pb2.MeasureResponse:
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
