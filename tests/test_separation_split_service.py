"""One song split across separation workers, through a real worker and store (issue 19).

Separate with ``chunk_range`` writes part ``index`` of ``count`` of the song's chunks to
``range_key``; Stitch joins the parts into the stems one whole Separate with the same
``shift_seed`` writes. A tiny HTDemucs (``tiny_ht``) cut into 0.5 s chunks keeps it cheap: a
1.5 s song is 5 to 6 chunks per pass, so 2 and 5 parts cover ragged and one-chunk parts.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf

from audiomesh import scratch
from audiomesh.demo import synth_song
from audiomesh.services.separation.server import build as build_separation
from audiomesh.store import ObjectStore, open_store
from audiomesh.v1 import common_pb2, separation_pb2, separation_pb2_grpc
from tests.helpers.models import make_tiny_repo
from tests.helpers.s3 import ACCESS_KEY, REGION, SECRET_KEY, open_test_store
from tests.helpers.workers import F32, running_worker

SEED = 20240611
MODEL = "tiny_ht"
RATE = 44100


def _options(shifts: int = 1, **kwargs) -> common_pb2.SeparationOptions:
    return common_pb2.SeparationOptions(shifts=shifts, segment_seconds=0.5, **kwargs)


class Mesh:
    """A separation worker, a stub to it and the store it works on."""

    def __init__(self, channel: grpc.aio.Channel, store: ObjectStore, servicer) -> None:
        self.stub = separation_pb2_grpc.SeparationServiceStub(channel)
        self.store = store
        self.servicer = servicer

    def put(self, key: str, y: np.ndarray, tmp: Path) -> str:
        local = tmp / f"put-{hashlib.sha256(key.encode()).hexdigest()[:8]}.wav"
        sf.write(local, y.T, RATE, subtype="FLOAT")
        self.store.put_file(key, local)
        return key

    def get(self, key: str, tmp: Path) -> np.ndarray:
        local = tmp / "get.wav"
        self.store.get_to_file(key, local)
        y, _ = sf.read(local, dtype="float32", always_2d=True)
        return y.T

    def keys(self) -> set[str]:
        return {info.key for info in self.store.list("")}


async def _collect(call) -> tuple[list[common_pb2.Progress], separation_pb2.SeparateResult]:
    progress, result = [], None
    async for message in call:
        if message.HasField("progress"):
            progress.append(message.progress)
        else:
            assert result is None, "one result only"
            result = message.result
    assert result is not None
    return progress, result


async def _whole(mesh: Mesh, key: str, prefix: str, *, shifts: int, seed: int) -> separation_pb2.SeparateResult:
    request = separation_pb2.SeparateRequest(
        input_key=key, output_prefix=prefix, model=MODEL, options=_options(shifts), encoding=F32, shift_seed=seed
    )
    return (await _collect(mesh.stub.Separate(request)))[1]


async def _parts(mesh: Mesh, key: str, prefix: str, count: int, *, shifts: int) -> list[common_pb2.Track]:
    parts = []
    for index in range(count):
        request = separation_pb2.SeparateRequest(
            input_key=key,
            model=MODEL,
            options=_options(shifts),
            chunk_range=separation_pb2.ChunkRange(index=index, count=count),
            range_key=f"{prefix}/ranges/{index}-of-{count}.range",
            shift_seed=SEED,
        )
        progress, result = await _collect(mesh.stub.Separate(request))
        fractions = [p.fraction for p in progress]
        assert fractions == sorted(fractions) and {p.message for p in progress} <= {
            "loading audio",
            "separating",
            "writing part",
        }
        assert not result.stems and result.model == MODEL
        parts.append(result.range)
    return parts


async def _stitch(mesh: Mesh, keys: list[str], prefix: str, **kwargs) -> separation_pb2.SeparateResult:
    request = separation_pb2.StitchRequest(range_keys=keys, output_prefix=prefix, encoding=F32, model=MODEL, **kwargs)
    progress, result = await _collect(mesh.stub.Stitch(request))
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions) and {p.message for p in progress} <= {
        "downloading parts",
        "stitching",
        "writing stems",
    }
    return result


async def _split_equals_whole(mesh: Mesh, tmp: Path, count: int, shifts: int, seconds: float = 1.5) -> None:
    key = mesh.put("in/mix.wav", synth_song(seconds, seed=count), tmp)
    whole = await _whole(mesh, key, "whole", shifts=shifts, seed=SEED)
    parts = await _parts(mesh, key, "split", count, shifts=shifts)
    for index, part in enumerate(parts):
        assert (part.name, part.key) == (f"range-{index}-of-{count}", f"split/ranges/{index}-of-{count}.range")
        local = tmp / "part.range"
        mesh.store.get_to_file(part.key, local)
        assert part.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
        assert part.size_bytes == local.stat().st_size
    stitched = await _stitch(mesh, [p.key for p in parts], "split/stems")
    assert [t.name for t in stitched.stems] == [t.name for t in whole.stems] == ["drums", "bass", "other", "vocals"]
    for mine, theirs in zip(stitched.stems, whole.stems, strict=True):
        assert mine.key == f"split/stems/{mine.name}.wav"
        assert mine.audio.frames == theirs.audio.frames == round(seconds * RATE)
        got, want = mesh.get(mine.key, tmp), mesh.get(theirs.key, tmp)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=mine.name)
        # overlap 0.25: at most two chunks overlap, so the parts add up in apply_model's order, bit for bit
        assert np.array_equal(got, want), mine.name  # (not the files' sha256: a float WAV's PEAK chunk has a time)


@pytest.fixture
async def mesh(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    make_tiny_repo(repo, MODEL)
    async with running_worker(
        build_separation, tmp_path, model_repo=str(repo), default_model=MODEL, worker_concurrency=2
    ) as worker:
        with open_store(f"file://{worker.root}") as store:
            yield Mesh(worker.channel, store, worker.servicer)


@pytest.mark.parametrize(("count", "shifts"), [(2, 1), (5, 2)])
async def test_parts_stitch_into_the_whole_song_stems(mesh, tmp_path, count, shifts):
    """2 ragged parts with one shift; 5 parts of one chunk (two for the last when a shift's lead adds one) with two."""
    await _split_equals_whole(mesh, tmp_path, count, shifts)


async def test_shift_seed_seeds_the_whole_song_and_zero_leaves_random_alone(mesh, tmp_path):
    """K = 1 with a seed is reproducible and leaves `random` as it was; seed 0 draws from `random` as before."""
    key = mesh.put("in/mix.wav", synth_song(1.0), tmp_path)
    state = random.getstate()
    seeded = await _whole(mesh, key, "seeded", shifts=1, seed=SEED)
    assert random.getstate() == state
    random.seed(SEED)  # what shift_seed=SEED does inside the worker (which runs in this process)
    seeded_state = random.getstate()
    unseeded = await _whole(mesh, key, "unseeded", shifts=1, seed=0)
    assert random.getstate() != seeded_state  # seed 0 drew its offsets from `random`, as before shift_seed
    for a, b in zip(seeded.stems, unseeded.stems, strict=True):
        assert np.array_equal(mesh.get(a.key, tmp_path), mesh.get(b.key, tmp_path)), a.name


def _request(**kwargs) -> separation_pb2.SeparateRequest:
    base = {"input_key": "in/mix.wav", "model": MODEL, "options": _options(), "shift_seed": SEED}
    return separation_pb2.SeparateRequest(**{**base, **kwargs})


def _part(index: int, count: int, **kwargs) -> separation_pb2.SeparateRequest:
    fields = {"chunk_range": separation_pb2.ChunkRange(index=index, count=count), "range_key": "out/part.range"}
    return _request(**{**fields, **kwargs})


SEPARATE_ERRORS = [
    (_part(0, 65), grpc.StatusCode.INVALID_ARGUMENT, "chunk_range.count"),
    (_part(2, 2), grpc.StatusCode.INVALID_ARGUMENT, "chunk_range.index"),
    (
        _request(chunk_range=separation_pb2.ChunkRange(index=1, count=1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunk_range.index",
    ),
    (_request(chunk_range=separation_pb2.ChunkRange(index=0, count=2)), grpc.StatusCode.INVALID_ARGUMENT, "range_key"),
    (_request(output_prefix="out", range_key="out/part.range"), grpc.StatusCode.INVALID_ARGUMENT, "range_key"),
    (_part(0, 2, range_key="../out/part.range"), grpc.StatusCode.INVALID_ARGUMENT, "range_key"),
    (_part(0, 2, shift_seed=0), grpc.StatusCode.INVALID_ARGUMENT, "shift_seed"),
    (_part(0, 2, input_key=""), grpc.StatusCode.INVALID_ARGUMENT, "input_key"),
    (_part(0, 2, input_key="in/missing.wav"), grpc.StatusCode.NOT_FOUND, "in/missing.wav"),
    (_part(0, 2, options=_options(overlap=1.5)), grpc.StatusCode.INVALID_ARGUMENT, "overlap"),
    (_part(0, 2, encoding=99), grpc.StatusCode.INVALID_ARGUMENT, "encoding"),
]


@pytest.mark.parametrize(("request_", "code", "words"), SEPARATE_ERRORS)
async def test_bad_separate_is_refused_and_writes_nothing(mesh, tmp_path, request_, code, words):
    mesh.put("in/mix.wav", synth_song(0.5), tmp_path)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(mesh.stub.Separate(request_))
    assert err.value.code() == code, err.value.details()
    assert words in err.value.details()
    assert mesh.keys() == {"in/mix.wav"}


class _WholeSignalOnly:
    """A registered separator that is not a Demucs model: it cannot separate chunk ranges."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, attr: str):
        return getattr(self._inner, attr)


async def test_a_model_that_cannot_be_split_is_refused(mesh, tmp_path):
    mesh.put("in/mix.wav", synth_song(0.5), tmp_path)
    factory = mesh.servicer.factory
    model = factory.get(MODEL)
    assert factory.swap(MODEL, model.device, model, _WholeSignalOnly(model))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(mesh.stub.Separate(_part(0, 2)))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert MODEL in err.value.details() and "chunk_range" in err.value.details()
    assert mesh.keys() == {"in/mix.wav"}


async def test_bad_stitch_is_refused_and_writes_nothing(mesh, tmp_path):
    key = mesh.put("in/mix.wav", synth_song(0.6), tmp_path)
    other = mesh.put("in/other.wav", synth_song(0.6, seed=3), tmp_path)
    three = [p.key for p in await _parts(mesh, key, "three", 3, shifts=1)]
    two = [p.key for p in await _parts(mesh, key, "two", 2, shifts=1)]
    other_two = [p.key for p in await _parts(mesh, other, "other", 2, shifts=1)]
    mesh.store.put_bytes("bad/garbage.range", b"not a part" * 10)
    stored = mesh.keys()
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        ({"range_keys": two[:1]}, invalid, "range_keys must name 2 to 64"),
        ({"range_keys": [f"p/{i}" for i in range(65)]}, invalid, "range_keys must name 2 to 64"),
        ({"range_keys": [two[0], two[0]]}, invalid, "distinct"),
        ({"range_keys": [two[0], "a/../b"]}, invalid, "range_keys[1]"),
        ({"range_keys": two, "output_prefix": ""}, invalid, "output_prefix"),
        ({"range_keys": two, "output_prefix": "a//b"}, invalid, "output_prefix"),
        ({"range_keys": [two[0], "missing/part.range"]}, grpc.StatusCode.NOT_FOUND, "missing/part.range"),
        ({"range_keys": three[:2]}, invalid, "part 0 of 3"),  # a part left out
        ({"range_keys": [two[1], two[0]]}, invalid, "index order"),
        ({"range_keys": [two[0], other_two[1]]}, invalid, "do not belong together"),  # another song
        ({"range_keys": [two[0], "bad/garbage.range"]}, invalid, "range_keys[1].range is not a range file"),
        ({"range_keys": two, "options": common_pb2.SeparationOptions(two_stems="kazoo")}, invalid, "two_stems"),
        ({"range_keys": two, "model": "demucs_unittest"}, invalid, "model"),
        ({"range_keys": two, "encoding": 99}, invalid, "encoding"),
    ]
    for fields, code, words in cases:
        request = separation_pb2.StitchRequest(**{"output_prefix": "stems", "model": MODEL, **fields})
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _collect(mesh.stub.Stitch(request))
        assert err.value.code() == code, (fields, err.value.details())
        assert words in err.value.details(), (fields, err.value.details())
        assert mesh.keys() == stored, fields
    # The parts themselves were fine: they stitch, two_stems applied at the stitch.
    result = await _stitch(mesh, two, "stems", options=common_pb2.SeparationOptions(two_stems="vocals"))
    assert [t.name for t in result.stems] == ["vocals", "no_vocals"]


async def test_a_cancelled_part_leaves_nothing(mesh, tmp_path):
    key = mesh.put("in/long.wav", synth_song(8.0), tmp_path)
    request = _part(0, 2, input_key=key, options=_options(shifts=2))
    call = mesh.stub.Separate(request)
    async for message in call:
        if message.progress.message == "separating":
            break
    call.cancel()
    deadline = time.monotonic() + 30
    own = scratch.process_dir()
    while time.monotonic() < deadline and any(own.glob("sep-*")):
        await asyncio.sleep(0.1)  # the worker's thread stops at its next chunk and cleans up
    assert not any(own.glob("sep-*"))
    assert mesh.keys() == {key}


async def test_split_on_s3(s3_server, tmp_path):
    """The same through an S3 store (moto): parts go up and come down as objects."""
    bucket = open_test_store(s3_server)
    repo = tmp_path / "repo"
    repo.mkdir()
    make_tiny_repo(repo, MODEL)
    settings = {
        "store_url": f"s3://{bucket.bucket}",
        "s3_endpoint": s3_server,
        "s3_access_key": ACCESS_KEY,
        "s3_secret_key": SECRET_KEY,
        "s3_region": REGION,
    }
    try:
        async with running_worker(
            build_separation, tmp_path, model_repo=str(repo), default_model=MODEL, **settings
        ) as worker:
            await _split_equals_whole(Mesh(worker.channel, bucket, worker.servicer), tmp_path, 3, 1, seconds=1.0)
    finally:
        bucket.close()
