"""Bad input gets the documented status code, a message naming the problem, and leaves nothing."""

from __future__ import annotations

import asyncio
import io
import struct
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc

from audiomesh.config import load_settings
from audiomesh.rpc.server import start_server
from audiomesh.services.orchestrator.server import build
from audiomesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.mesh import new_stored_files, stored_files, upload, write_song


def wav_bytes(y: np.ndarray, rate: int = 44100) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y.T, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def truncated_wav(tmp_path: Path) -> bytes:
    data = write_song(tmp_path / "t.wav", 2.0).read_bytes()
    return data[: len(data) // 3]


def zero_frames() -> bytes:
    return wav_bytes(np.zeros((2, 0), dtype=np.float32))


def lying_header() -> bytes:
    data = bytearray(wav_bytes(np.zeros((2, 4410), dtype=np.float32)))
    struct.pack_into("<I", data, 40, 0x7FFFFFF0)  # data chunk claims ~2 GB
    return bytes(data)


def damaged(fmt: str):
    """A FLAC cut at 60 %, or an MP3 with junk in the middle: their headers probe fine (#14.3)."""

    def make(tmp: Path) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, np.stack([np.sin(np.arange(3 * 44100) / 10.0)] * 2, axis=1) * 0.3, 44100, format=fmt)
        data = bytearray(buf.getvalue())
        if fmt == "FLAC":
            return bytes(data[: int(len(data) * 0.6)])
        middle = len(data) // 3
        data[middle : middle + 4000] = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
        return bytes(data)

    return make


CASES = {
    "empty": (lambda tmp: b"", "empty"),
    "not audio": (lambda tmp: b"this is a text file, not a song\n" * 20, "not a supported audio"),
    "truncated wav": (truncated_wav, "truncated"),
    "zero frames": (lambda tmp: zero_frames(), "no audio"),
    "lying header": (lambda tmp: lying_header(), "truncated"),
    "truncated flac": (damaged("FLAC"), "damaged or truncated"),
    "mp3 with junk": (damaged("MP3"), "damaged or truncated"),
}


async def assert_healthy(channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service="audiomesh.v1.OrchestratorService"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_upload_is_refused_and_leaves_nothing(case, file_mesh, tmp_path):
    make, words = CASES[case]
    before = stored_files(file_mesh)
    async with grpc.aio.insecure_channel(file_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await upload(stub, make(tmp_path), "bad.wav")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details()
        assert words in details.lower()
        # The user's name, never the server's spool path (#14.15).
        assert "bad.wav" in details and "upload-" not in details and "scratch" not in details, details
        await assert_healthy(channel)
    assert not new_stored_files(file_mesh, before)


async def test_unknown_model_is_not_found(orchestrator, file_mesh, tmp_path):
    before = stored_files(file_mesh)
    song = write_song(tmp_path / "s.wav", 1.0).read_bytes()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(orchestrator, song, "s.wav", orchestrator_pb2.JobOptions(model="no_such_model"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no_such_model" in err.value.details()
    assert not new_stored_files(file_mesh, before)


async def test_bad_recipe_is_invalid(orchestrator, tmp_path):
    song = write_song(tmp_path / "s.wav", 1.0).read_bytes()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(orchestrator, song, "s.wav", orchestrator_pb2.JobOptions(main_stems=["kazoo"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kazoo" in err.value.details()


def _options(**fields) -> orchestrator_pb2.JobOptions:
    from google.protobuf import json_format

    return json_format.ParseDict(fields, orchestrator_pb2.JobOptions())


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (_options(hpss={"marginHarmonic": 0.5}), "margin"),
        (_options(hpss={"kernelSizePercussive": -3}), "kernel"),
        (_options(hpss={"hopLength": -5}), "hop"),
        (_options(normalize={"target": "NaN"}), "target"),
        (_options(separation={"twoStems": "kazoo"}), "kazoo"),
        (_options(separation={"overlap": 1.5}), "overlap"),
        (_options(encoding=42), "encoding"),
    ],
)
async def test_bad_options_are_refused_before_anything_is_stored(orchestrator, file_mesh, tmp_path, options, words):
    before = stored_files(file_mesh)
    song = write_song(tmp_path / "s.wav", 1.0).read_bytes()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(orchestrator, song, "s.wav", options)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details().lower()
    assert not new_stored_files(file_mesh, before)


# Values with no upper bound before #14.4 (each made a worker try a giant allocation, answer
# INTERNAL and be retried); the message names the field and its range from audiomesh.ranges.
OUT_OF_RANGE = {
    "huge segment": ({"separation": {"segmentSeconds": 1e9}}, "separation.segment_seconds", "0.1 to 60"),
    "shifts 21": ({"separation": {"shifts": 21}}, "separation.shifts", "0 to 20"),
    "overlap 0.995": ({"separation": {"overlap": 0.995}}, "separation.overlap", "0 to 0.99"),
    "kernel 2^31-1": ({"hpss": {"kernelSizeHarmonic": 2**31 - 1}}, "hpss.kernel_size_harmonic", "1 to 1023"),
    "percussive kernel": ({"hpss": {"kernelSizePercussive": 5000}}, "hpss.kernel_size_percussive", "1 to 1023"),
    "n_fft 2^24": ({"hpss": {"nFft": 2**24}}, "hpss.n_fft", "16 to 65536"),
    "hop over n_fft": ({"hpss": {"hopLength": 4096}}, "hpss.hop_length", "<= hpss.n_fft"),
    "power 1000": ({"hpss": {"power": 1000}}, "hpss.power", "> 0 and <= 100"),
    "margin 1000": ({"hpss": {"marginPercussive": 1000}}, "hpss.margin_percussive", "1 to 100"),
    "target +10 LUFS": ({"normalize": {"target": 10}}, "normalize.target", "-70 to 0 lufs"),
    "target -1000 LUFS": ({"normalize": {"target": -1000}}, "normalize.target", "-70 to 0 lufs"),
    "peak target -65": ({"normalize": {"mode": "NORMALIZE_MODE_PEAK", "target": -65}}, "normalize.target", "-60 to 0"),
    "ceiling +5 dBTP": ({"normalize": {"truePeakCeilingDbtp": 5}}, "normalize.true_peak_ceiling_dbtp", "-20 to 0"),
    "17 main stems": ({"mainStems": ["drums"] * 17}, "main_stems", "at most 16"),
    "model name 200 chars": ({"model": "m" * 200}, "model", "at most 128"),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
async def test_out_of_range_options_are_refused(orchestrator, file_mesh, tmp_path, case):
    fields, field, words = OUT_OF_RANGE[case]
    before = stored_files(file_mesh)
    song = write_song(tmp_path / "s.wav", 1.0).read_bytes()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(orchestrator, song, "s.wav", _options(**fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert details.startswith(field + " must be") and words in details.lower(), details
    assert not new_stored_files(file_mesh, before)


async def test_negative_size_bytes_is_invalid(orchestrator, file_mesh):
    before = stored_files(file_mesh)

    async def messages():
        meta = orchestrator_pb2.UploadMetadata(filename="s.wav", size_bytes=-5, create_job=True)
        yield orchestrator_pb2.UploadAudioRequest(metadata=meta)
        yield orchestrator_pb2.UploadAudioRequest(chunk=b"RIFF")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await orchestrator.UploadAudio(messages())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "size_bytes must be >= 0" in err.value.details() and "-5" in err.value.details()
    assert not new_stored_files(file_mesh, before)


async def test_missing_key_is_not_found(orchestrator):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await orchestrator.CreateJob(orchestrator_pb2.CreateJobRequest(input_key="incoming/nope.wav"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "incoming/nope.wav" in err.value.details()


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs/key.wav", "a//b.wav", "a/\x00.wav"])
async def test_hostile_key_is_invalid(orchestrator, key):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await orchestrator.CreateJob(orchestrator_pb2.CreateJobRequest(input_key=key))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_and_malformed_job_ids(orchestrator):
    missing = str(uuid.uuid4())
    for call in (orchestrator.GetJob, orchestrator.CancelJob, orchestrator.DeleteJob):
        request_type = {
            "GetJob": orchestrator_pb2.GetJobRequest,
            "CancelJob": orchestrator_pb2.CancelJobRequest,
            "DeleteJob": orchestrator_pb2.DeleteJobRequest,
        }[call._method.decode().rsplit("/", 1)[1]]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request_type(job_id=missing))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and missing in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request_type(job_id="../../etc"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in orchestrator.WatchJob(orchestrator_pb2.WatchJobRequest(job_id=missing)):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_page_token(orchestrator):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await orchestrator.ListJobs(orchestrator_pb2.ListJobsRequest(page_token="garbage!"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_upload_over_the_limit_is_refused_as_bytes_arrive(file_mesh, tmp_path):
    """An orchestrator in this process with a 64 kB limit, using the mesh's workers."""
    env = {k: v for k, v in file_mesh.env.items() if k.startswith("AUDIOMESH_")}
    overrides = {k.removeprefix("AUDIOMESH_").lower(): v for k, v in env.items()}
    settings = load_settings(**{**overrides, "max_upload_bytes": 64 * 1024})
    spec = build(settings)
    server = await start_server(spec.registrations, service="orchestrator", warmup=spec.warmup)
    await asyncio.wait_for(server.ready.wait(), 60)  # its warm-up reads every manifest in the shared store
    before = stored_files(file_mesh)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            song = write_song(tmp_path / "big.wav", 3.0).read_bytes()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await upload(stub, song, "big.wav")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit" in err.value.details()
            await assert_healthy(channel)
    finally:
        await spec.on_stop()
        await server.stop(1)
    assert not new_stored_files(file_mesh, before)
