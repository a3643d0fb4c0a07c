"""Uploads stream straight into the store and are checked there, in place: nothing goes through
the orchestrator's disk, and a refused upload leaves no object behind (file store and S3 on moto).

Each test runs an orchestrator in this process with its own store, using the shared mesh's
workers (CreateJob and create_job uploads check the options against the separation model).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf

from audiomesh import scratch
from audiomesh.config import load_settings
from audiomesh.launcher import auth_policy
from audiomesh.rpc.server import start_server
from audiomesh.services.orchestrator.server import build
from audiomesh.store import FileStore, ObjectStore, S3Store
from audiomesh.store.file import LOCK_NAME
from audiomesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.mesh import write_song
from tests.helpers.s3 import ACCESS_KEY, REGION, SECRET_KEY, incomplete_uploads

LIMIT = 2 << 20  # bytes
MAX_SECONDS = 8.0


@contextlib.asynccontextmanager
async def orchestrator(
    file_mesh, store_env: dict
) -> AsyncIterator[tuple[orchestrator_pb2_grpc.OrchestratorServiceStub, ObjectStore]]:
    env = {k.removeprefix("AUDIOMESH_").lower(): v for k, v in file_mesh.env.items() if k.startswith("AUDIOMESH_")}
    env.update(store_env, max_upload_bytes=str(LIMIT), max_duration_seconds=str(MAX_SECONDS))
    settings = load_settings(**env)
    spec = build(settings)
    server = await start_server(
        spec.registrations, service="orchestrator", warmup=spec.warmup, auth=auth_policy(settings, "orchestrator")
    )
    store = settings.open_store()
    try:
        await asyncio.wait_for(server.ready.wait(), 30)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            for _ in range(300):  # SERVING may come before every manifest is read: wait for that too
                try:
                    await stub.ListJobs(orchestrator_pb2.ListJobsRequest())
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    await asyncio.sleep(0.1)
            yield stub, store
    finally:
        await spec.on_stop()
        await server.stop(1)
        store.close()


@pytest.fixture(params=["file", "s3"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict:
    if request.param == "file":
        return {"store_url": f"file://{tmp_path / 'store'}"}
    endpoint = request.getfixturevalue("s3_server")
    return {
        "store_url": f"s3://upload-{os.urandom(6).hex()}/t",
        "s3_endpoint": endpoint,
        "s3_access_key": ACCESS_KEY,
        "s3_secret_key": SECRET_KEY,
        "s3_region": REGION,
    }


def _messages(data: bytes, *, create_job: bool, filename: str = "song.wav", chunk: int = 64 * 1024):
    async def gen():
        yield orchestrator_pb2.UploadAudioRequest(
            metadata=orchestrator_pb2.UploadMetadata(filename=filename, create_job=create_job)
        )
        for start in range(0, len(data), chunk):
            yield orchestrator_pb2.UploadAudioRequest(chunk=data[start : start + chunk])

    return gen()


def _wav(seconds: float, tmp_path: Path) -> bytes:
    return write_song(tmp_path / f"song-{seconds}.wav", seconds).read_bytes()


def _nan_wav() -> bytes:
    y = np.zeros((44100 * 2, 2), np.float32)
    y[30000, 1] = np.nan
    out = io.BytesIO()
    sf.write(out, y, 44100, format="WAV", subtype="FLOAT")
    return out.getvalue()


def _leftovers(store: ObjectStore) -> list[str]:
    """Everything the store holds: objects, and (file store) any temp file; (S3) unfinished multipart uploads."""
    found = [i.key for i in store.list()]
    if isinstance(store, FileStore):
        found += [
            os.path.relpath(os.path.join(d, f), store.root)
            for d, _, files in os.walk(store.root)
            for f in files
            if f != LOCK_NAME
        ]
    elif isinstance(store, S3Store):
        found += [u["Key"] for u in incomplete_uploads(store.endpoint, store.bucket)]
    return found


def _scratch_files() -> list[Path]:
    folder = scratch.root() / str(os.getpid())
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


REFUSED = {
    "empty": (lambda tmp: b"", grpc.StatusCode.INVALID_ARGUMENT, r"song\.wav: the file is empty \(0 bytes\)"),
    "not-audio": (
        lambda tmp: b"just some text, certainly not a song\n" * 100,
        grpc.StatusCode.INVALID_ARGUMENT,
        r"'song\.wav' is not a supported audio file",
    ),
    "too-long": (
        lambda tmp: _wav(MAX_SECONDS + 2, tmp),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"song\.wav: 10 s of audio exceeds the limit of 8 s",
    ),
    "nan-samples": (
        lambda tmp: _nan_wav(),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"'song\.wav' contains 1 NaN or infinite sample\(s\), the first at frame 30000",
    ),
    "truncated": (
        lambda tmp: _wav(3.0, tmp)[:200_000],
        grpc.StatusCode.INVALID_ARGUMENT,
        r"'song\.wav' is a truncated WAV file",
    ),
    "too-large": (
        lambda tmp: _wav(3.0, tmp) + b"\0" * LIMIT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        rf"upload exceeds the limit of {LIMIT} bytes",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_refused_upload_leaves_no_object(file_mesh, store_env, tmp_path, case) -> None:
    make, code, message = REFUSED[case]
    data = make(tmp_path)
    scratch_before = _scratch_files()
    async with orchestrator(file_mesh, store_env) as (stub, store):
        for create_job in (True, False):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.UploadAudio(_messages(data, create_job=create_job))
            assert err.value.code() == code, err.value.details()
            assert err.value.details() and re.search(message, err.value.details()), err.value.details()
            assert _leftovers(store) == []
        assert _scratch_files() == scratch_before, "the upload went through the orchestrator's disk"


async def test_upload_streams_into_the_store_and_create_job_reads_it_in_place(file_mesh, store_env, tmp_path) -> None:
    data = _wav(3.0, tmp_path)
    async with orchestrator(file_mesh, store_env) as (stub, store):
        resp = await stub.UploadAudio(_messages(data, create_job=False))
        assert resp.size_bytes == len(data) and resp.input_key.startswith("uploads/anonymous/")
        assert store.get_bytes(resp.input_key) == data
        job = (await stub.CreateJob(orchestrator_pb2.CreateJobRequest(input_key=resp.input_key))).job
        assert job.input.sha256 == hashlib.sha256(data).hexdigest()
        assert (job.input.audio.sample_rate, job.input.audio.channels) == (44100, 2)
        assert job.input.key == resp.input_key
        direct = await stub.UploadAudio(_messages(data, create_job=True))
        assert direct.job.input.sha256 == hashlib.sha256(data).hexdigest()
        assert direct.input_key == f"jobs/{direct.job.job_id}/input/song.wav"
        assert store.get_bytes(direct.input_key) == data
        for job_id in (job.job_id, direct.job.job_id):
            await stub.CancelJob(orchestrator_pb2.CancelJobRequest(job_id=job_id))
        # CreateJob on a stored object that is not audio: refused, and the user's object stays.
        store.put_bytes("uploads/anonymous/x/notes.wav", b"not audio at all, just words " * 10)
        with pytest.raises(grpc.aio.AioRpcError, match="is not a supported audio file") as err:
            await stub.CreateJob(orchestrator_pb2.CreateJobRequest(input_key="uploads/anonymous/x/notes.wav"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert store.exists("uploads/anonymous/x/notes.wav")


async def test_upload_cancelled_mid_stream_leaves_nothing(file_mesh, store_env, tmp_path) -> None:
    data = _wav(3.0, tmp_path)
    async with orchestrator(file_mesh, store_env) as (stub, store):
        release = asyncio.Event()

        async def stalled():
            yield orchestrator_pb2.UploadAudioRequest(
                metadata=orchestrator_pb2.UploadMetadata(filename="song.wav", create_job=False)
            )
            yield orchestrator_pb2.UploadAudioRequest(chunk=data[:100_000])
            await release.wait()  # never: the call is cancelled first

        scratch_before = _scratch_files()
        call = stub.UploadAudio(stalled())
        await asyncio.sleep(1.0)
        # In flight: the bytes are going into the store, not into a spool file on the orchestrator's disk.
        assert _scratch_files() == scratch_before, "the upload is being spooled to the orchestrator's disk"
        if isinstance(store, FileStore):
            in_flight = [f for _, _, files in os.walk(store.root) for f in files if f.startswith(".amtmp-song.wav.")]
            assert in_flight, "no upload in flight in the store"
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        deadline = asyncio.get_running_loop().time() + 10
        while _leftovers(store) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert _leftovers(store) == []


def test_open_seekable_reads_like_a_file(tmp_path, store_env) -> None:
    """The seekable reader over a stored object: random seeks and reads equal the bytes."""
    store = load_settings(**store_env).open_store()
    with store:
        data = np.random.default_rng(1).bytes(3 << 20)
        store.put_bytes("obj", data)
        rng = np.random.default_rng(2)
        with store.open_seekable("obj", read_ahead=64 << 10) as f:
            assert f.seekable() and f.seek(0, os.SEEK_END) == len(data)
            for _ in range(60):
                pos = int(rng.integers(0, len(data) + 10))
                n = int(rng.integers(0, 200_000))
                assert f.seek(pos) == pos and f.tell() == pos
                got = f.read(n)
                assert got == data[pos : pos + n] and f.tell() == pos + len(got)
            f.seek(0)
            assert f.read() == data
        if isinstance(store, S3Store):
            # A sequential read is one ranged GET, not one per buffer.
            with store.open_seekable("obj", read_ahead=64 << 10) as f:
                while f.read(10_000):
                    pass
                assert f.raw.opens == 1  # type: ignore[attr-defined]
        with pytest.raises(Exception, match="'missing'"):
            with store.open_seekable("missing"):
                pass


# --------------------------------------------------------------------------- audio.io on a stream


def _formats(tmp_path: Path) -> dict[str, bytes]:
    y = (np.random.default_rng(0).standard_normal((3 * 22050, 2)) * 0.1).astype(np.float32)
    out = {}
    for fmt in ("WAV", "FLAC", "OGG", "MP3"):
        buf = io.BytesIO()
        sf.write(buf, y, 22050, format=fmt)
        out[fmt] = buf.getvalue()
    out["truncated-flac"] = out["FLAC"][: len(out["FLAC"]) // 2]
    out["truncated-wav"] = out["WAV"][:50_000]
    out["text"] = b"hello, this is not audio\n" * 20
    return out


def _outcome(fn, source, name: str):
    try:
        return fn(source, name=name)
    except Exception as exc:  # noqa: BLE001 - the refusal itself is compared
        return type(exc).__name__, str(exc)


def test_probe_and_scan_on_a_stored_object_equal_the_local_file(tmp_path, store_env) -> None:
    """Same AudioInfo, frame count and refusal messages from the object read in place as from a file."""
    from audiomesh.audio.io import probe, scan_samples

    store = load_settings(**store_env).open_store()
    with store:
        for label, data in _formats(tmp_path).items():
            local = tmp_path / f"local-{label}"
            local.write_bytes(data)
            store.put_bytes(f"in/{label}", data)
            for fn in (probe, scan_samples):
                with store.open_seekable(f"in/{label}") as f:
                    assert _outcome(fn, f, "song") == _outcome(fn, local, "song"), (label, fn.__name__)


def test_ffmpeg_only_format_is_copied_to_scratch_for_ffmpeg(tmp_path, store_env, monkeypatch) -> None:
    """The one case that needs a local file: ffmpeg gets an exact copy, removed afterwards."""
    from audiomesh.audio.io import probe

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "ffmpeg-saw"
    (bin_dir / "ffmpeg").write_text(
        f"#!{sys.executable}\n"
        "import shutil, sys\n"
        "import numpy as np, soundfile as sf\n"
        f"shutil.copy(sys.argv[sys.argv.index('-i') + 1], {str(seen)!r})\n"
        "sf.write(sys.argv[-1], np.zeros((22050, 2)), 22050, format='WAV', subtype='FLOAT')\n"
    )
    (bin_dir / "ffmpeg").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    data = b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00M4A isommp42" + bytes(range(256)) * 40
    store = load_settings(**store_env).open_store()
    scratch_before = _scratch_files()
    with store:
        store.put_bytes("in/song.m4a", data)
        with store.open_seekable("in/song.m4a") as f:
            info = probe(f, name="song.m4a")
    assert (info.format, info.sample_rate, info.frames) == ("M4A", 22050, 22050)
    assert seen.read_bytes() == data
    assert _scratch_files() == scratch_before
