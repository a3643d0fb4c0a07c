"""MP3 output (#18): delivered tracks written as constant-bitrate MP3, intermediates lossless.

The encoder first (bitrate mapping, decoded levels, refusals), then a job through the shared
mesh over gRPC (every track decodes back with the song's duration and channels, the manifest
records the encoding and the decoded levels), then the option over HTTP.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import httpx
import jsonschema
import numpy as np
import pytest
import soundfile as sf

from audiomesh import manifest, ranges
from audiomesh.audio.io import encoder_options, write_audio
from audiomesh.audio.stream import TrackWriter, measure_file
from audiomesh.config import Settings
from audiomesh.demo import synth_song
from audiomesh.dsp.loudness import measure
from audiomesh.errors import InvalidInput
from audiomesh.options import check_job_options, check_model_options, resolve_encoding
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, separation_pb2
from tests.helpers.mesh import SUCCEEDED, upload, wait_for, write_song

RATE = 44100
MP3 = common_pb2.AUDIO_ENCODING_MP3
# A decoder without LAME's gapless header keeps the encoder delay (576) + decoder delay (529)
# and pads to whole 1152-sample frames; with the header (64 kbit/s and up at 44.1 kHz stereo)
# it gives back exactly the frames written (measured: 0 extra).
MP3_SLACK = 1152 + 576 + 529


def kbps_of(path: Path, seconds: float) -> float:
    return path.stat().st_size * 8 / seconds / 1000


@pytest.mark.parametrize(("asked", "nominal"), [(32, 32), (128, 128), (200, 192), (320, 320)])
def test_bitrate_is_the_nearest_mpeg_bitrate(tmp_path, asked: int, nominal: int) -> None:
    seconds = 4.0
    path = tmp_path / "t.mp3"
    write_audio(path, synth_song(seconds, RATE), RATE, fmt="mp3", bitrate_kbps=asked)
    # Above the nominal rate only by the LAME info frame and the ID3v1 tag (< 1.2 KiB here).
    assert nominal <= kbps_of(path, seconds) < nominal * 1.04
    back, rate = sf.read(path, dtype="float32", always_2d=True)
    assert rate == RATE and back.shape[1] == 2
    assert abs(back.shape[0] - int(seconds * RATE)) <= MP3_SLACK


def test_track_writer_reports_the_levels_of_the_file_as_it_decodes(tmp_path) -> None:
    y = synth_song(3.0, RATE) * 1.2  # past full scale: clipped, then the encoder moves the peaks
    with TrackWriter(tmp_path / "t.mp3", RATE, 2, fmt="mp3", subtype="MPEG_LAYER_III", bitrate_kbps=96) as writer:
        for start in range(0, y.shape[1], 30_000):
            writer.write(y[:, start : start + 30_000])
    decoded, _ = sf.read(tmp_path / "t.mp3", dtype="float32", always_2d=True)
    assert writer.measurement == pytest.approx(measure(decoded.T, RATE), abs=1e-6)
    assert writer.measurement != pytest.approx(measure(np.clip(y, -1, 1), RATE), abs=1e-3)
    assert measure_file(tmp_path / "t.mp3")[1] == decoded.shape[0] == y.shape[1]


def test_what_mp3_cannot_store_is_refused_with_the_way_out() -> None:
    with pytest.raises(InvalidInput, match=r"MP3 stores sample rates of 8000, .*48000 Hz, not 96000 Hz: choose WAV"):
        encoder_options("mp3", "MPEG_LAYER_III", 96000, 2)
    with pytest.raises(InvalidInput, match="MP3 stores 1 or 2 channels, not 6"):
        encoder_options("mp3", "MPEG_LAYER_III", RATE, 6)
    with pytest.raises(InvalidInput, match="MPEG_LAYER_III goes with fmt='mp3'"):
        encoder_options("wav", "MPEG_LAYER_III", RATE, 2)


def test_bitrate_range_and_defaults() -> None:
    for bad in (1, 31, 321, 4096):
        with pytest.raises(InvalidInput, match=rf"mp3_bitrate_kbps must be an integer from 32 to 320 kbps .*got {bad}"):
            check_job_options(orchestrator_pb2.JobOptions(encoding=MP3, mp3_bitrate_kbps=bad))
    for good in (0, 32, 160, 320):
        check_job_options(orchestrator_pb2.JobOptions(encoding=MP3, mp3_bitrate_kbps=good))
    # AUDIOMESH_OUTPUT_ENCODING=mp3 makes MP3 the default; 0 becomes the recorded 320.
    options = orchestrator_pb2.JobOptions()
    resolve_encoding(options, Settings(output_encoding="mp3"))
    assert (options.encoding, options.mp3_bitrate_kbps) == (MP3, ranges.DEFAULT_MP3_BITRATE_KBPS)
    wav = orchestrator_pb2.JobOptions()
    resolve_encoding(wav, Settings())
    assert (wav.encoding, wav.mp3_bitrate_kbps) == (common_pb2.AUDIO_ENCODING_WAV_PCM16, 0)
    # A bitrate with another encoding is refused, not silently dropped (also when WAV is the default).
    for options in (
        orchestrator_pb2.JobOptions(encoding=common_pb2.AUDIO_ENCODING_FLAC_PCM16, mp3_bitrate_kbps=192),
        orchestrator_pb2.JobOptions(mp3_bitrate_kbps=192),
    ):
        with pytest.raises(InvalidInput, match="mp3_bitrate_kbps applies to AUDIO_ENCODING_MP3 only"):
            resolve_encoding(options, Settings())
    with_default_mp3 = orchestrator_pb2.JobOptions(mp3_bitrate_kbps=192)
    resolve_encoding(with_default_mp3, Settings(output_encoding="mp3"))
    assert with_default_mp3.mp3_bitrate_kbps == 192


@pytest.mark.parametrize("rate", [96000, 6000])
def test_mp3_of_a_model_whose_rate_mp3_cannot_store_is_refused_with_the_job(rate: int) -> None:
    """The orchestrator plans every job with check_model_options (creation, start, resume): a
    model separating at a rate MP3 cannot store fails the request, not the normalize step after
    minutes of separation (found by the review of #18)."""
    info = separation_pb2.ModelInfo(name="odd_rate", sources=["vocals", "other"], sample_rate=rate, audio_channels=2)
    with pytest.raises(
        InvalidInput, match=rf"MP3 output .*'odd_rate' separates at {rate} Hz; MP3 stores .*not {rate} Hz"
    ):
        check_model_options(orchestrator_pb2.JobOptions(encoding=MP3), info)
    check_model_options(orchestrator_pb2.JobOptions(encoding=common_pb2.AUDIO_ENCODING_FLAC_PCM24), info)
    check_model_options(
        orchestrator_pb2.JobOptions(encoding=MP3),
        separation_pb2.ModelInfo(name="ok", sources=["vocals", "other"], sample_rate=44100, audio_channels=2),
    )


def _store_path(mesh, key: str) -> Path:
    return Path(mesh.env["AUDIOMESH_STORE_URL"].removeprefix("file://")) / key


async def _run_mp3_job(address: str, song: bytes) -> orchestrator_pb2.Job:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        options = orchestrator_pb2.JobOptions(encoding=MP3, mp3_bitrate_kbps=192)
        response = await upload(stub, song, "song.wav", options)
        job, _ = await wait_for(stub, response.job.job_id)
    return job


@pytest.fixture(scope="module")
def mp3_job(file_mesh, tmp_path_factory) -> orchestrator_pb2.Job:
    """One 3 s song through the shared mesh over gRPC, MP3 at 192 kbit/s (one job for the module)."""
    song = write_song(tmp_path_factory.mktemp("mp3") / "song.wav", 3.0)
    job = asyncio.run(_run_mp3_job(file_mesh.orchestrator, song.read_bytes()))
    assert job.state == SUCCEEDED, job.error
    return job


def test_mp3_job_delivers_tracks_that_decode_back(mp3_job, file_mesh) -> None:
    job = mp3_job
    frames = int(3.0 * RATE)
    assert len(job.tracks) == 9
    for track in job.tracks:
        path = _store_path(file_mesh, track.key)
        assert track.key.endswith(f"/output/{track.name}.mp3")
        assert (track.audio.format, track.audio.subtype) == ("MP3", "MPEG_LAYER_III")
        assert sf.info(str(path)).format == "MP3"  # what the content is, not only the name
        decoded, rate = sf.read(path, dtype="float32", always_2d=True)
        assert (rate, decoded.shape[1]) == (RATE, 2)
        assert abs(decoded.shape[0] - frames) <= MP3_SLACK, (track.name, decoded.shape[0])
        assert track.audio.frames == decoded.shape[0]  # the manifest's duration is the decoded one
        assert 192 <= kbps_of(path, decoded.shape[0] / RATE) < 192 * 1.04, track.name
        # Loudness and peaks describe the file as it decodes.
        levels = measure(decoded.T, RATE)
        assert track.loudness.sample_peak_dbfs == pytest.approx(levels.sample_peak_dbfs, abs=1e-4)
        assert track.loudness.true_peak_dbtp == pytest.approx(levels.true_peak_dbtp, abs=1e-4)
        if np.isfinite(levels.integrated_lufs):
            assert track.loudness.integrated_lufs == pytest.approx(levels.integrated_lufs, abs=1e-4)
    # Only the normalize stage writes MP3: what stages pass each other stays float WAV.
    for node in job.nodes:
        for output in node.outputs:
            lossless = (output.audio.format, output.audio.subtype) == ("WAV", "FLOAT")
            assert lossless == (node.stage != "normalize"), (node.name, output.key)


def test_manifest_records_the_encoding(mp3_job, file_mesh) -> None:
    doc = json.loads(_store_path(file_mesh, mp3_job.manifest_key).read_bytes())
    jsonschema.validate(doc, manifest.schema())
    options = doc["job"]["options"]
    assert (options["encoding"], options["mp3BitrateKbps"]) == ("AUDIO_ENCODING_MP3", 192)
    assert {t["audio"]["format"] for t in doc["job"]["tracks"]} == {"MP3"}


async def test_out_of_range_bitrate_is_invalid_argument(orchestrator, mp3_job) -> None:
    for bad in (16, 321):
        options = orchestrator_pb2.JobOptions(encoding=MP3, mp3_bitrate_kbps=bad)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await orchestrator.CreateJob(
                orchestrator_pb2.CreateJobRequest(input_key=mp3_job.input.key, options=options)
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "mp3_bitrate_kbps" in caught.value.details() and "32 to 320" in caught.value.details()


def test_http_api_takes_the_encoding_and_bitrate(gateway_url, mp3_job) -> None:
    with httpx.Client(base_url=gateway_url, timeout=60) as http:
        doc = http.get("/openapi.json").json()
        prop = doc["components"]["schemas"]["audiomesh.v1.JobOptions"]["properties"]["mp3BitrateKbps"]
        assert prop["maximum"] == 320 and {"minimum": 32} in prop["anyOf"]
        for options, kbps in (({"mp3BitrateKbps": 192}, 192), ({}, 320)):
            body = {"inputKey": mp3_job.input.key, "options": {"encoding": "AUDIO_ENCODING_MP3", **options}}
            created = http.post("/v1/jobs", json=body)
            assert created.status_code == 200, created.text
            job = created.json()["job"]
            assert (job["options"]["encoding"], job["options"]["mp3BitrateKbps"]) == ("AUDIO_ENCODING_MP3", kbps)
            http.post(f"/v1/jobs/{job['jobId']}:cancel", json={})
            assert http.delete(f"/v1/jobs/{job['jobId']}").status_code == 200
        refused = http.post(
            "/v1/jobs",
            json={"inputKey": mp3_job.input.key, "options": {"encoding": "AUDIO_ENCODING_MP3", "mp3BitrateKbps": 500}},
        )
        assert refused.status_code == 400, refused.text
        assert "mp3_bitrate_kbps" in refused.json()["message"] and "32 to 320" in refused.json()["message"]
        # Downloads name and type the file as what it is.
        download = http.get(f"/download/{mp3_job.job_id}/vocals")
        assert download.status_code == 200
        assert download.headers["content-type"] == "audio/mpeg"
        assert '_vocals.mp3"; filename*=' in download.headers["content-disposition"]
