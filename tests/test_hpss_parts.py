"""A stem's HPSS in parts (issue 19): each part decomposes a run of the signal's blocks from the
samples it needs, anywhere; joined in order the parts are the whole signal's HPSS, bit for bit.

The pure functions (hpss_blocks(part=...), part_samples, block_count), the reader that joins
parts (JoinedSource), the hpss worker writing a part and the composite worker summing inputs
given in parts — each over real gRPC on port 0 where a worker is involved.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from audiomesh.audio.stream import ArraySource, JoinedSource
from audiomesh.demo import synth_song
from audiomesh.dsp.hpss import block_count, hpss, hpss_blocks, part_samples
from audiomesh.errors import InvalidInput
from audiomesh.v1 import common_pb2, composite_pb2, composite_pb2_grpc, hpss_pb2, hpss_pb2_grpc
from tests.helpers.workers import F32

# Small frames so a few seconds make many blocks: hop 128 x 64 frames = 8192 samples a block.
SMALL = {"n_fft": 512, "hop_length": 128}
STEP = 64 * 128


def joined_parts(y: np.ndarray, count: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Every part computed on its own (a fresh generator each: nothing shared), joined in order."""
    harmonic, percussive = [], []
    for index in range(count):
        blocks = list(hpss_blocks(ArraySource(y, 44100), block_frames=64, part=(index, count), **kwargs))
        harmonic += [h for _, h, _ in blocks]
        percussive += [p for _, _, p in blocks]
    return np.concatenate(harmonic, axis=1), np.concatenate(percussive, axis=1)


@pytest.mark.parametrize("count", [2, 3, 5, 11])  # 11: every part one block (11 blocks), the last ragged
@pytest.mark.parametrize("settings", [SMALL, {**SMALL, "center": False}, {**SMALL, "kernel_size": (17, 9)}])
def test_parts_joined_equal_the_whole_bit_for_bit(count, settings):
    y = synth_song(2.0, seed=7)  # 88200 samples: 10 full blocks and a ragged 11th
    assert block_count(y.shape[1], hop_length=128, block_frames=64) == 11
    whole_h, whole_p = hpss(y, **settings)
    h, p = joined_parts(y, count, **settings)
    np.testing.assert_array_equal(h, whole_h)
    np.testing.assert_array_equal(p, whole_p)


def test_part_samples_tile_the_signal_on_block_boundaries():
    frames = 10 * STEP + 5
    spans = [part_samples(frames, (i, 4), hop_length=128, block_frames=64) for i in range(4)]
    assert spans == [(0, 2 * STEP), (2 * STEP, 5 * STEP), (5 * STEP, 8 * STEP), (8 * STEP, frames)]
    assert part_samples(frames, (0, 11), hop_length=128, block_frames=64) == (0, STEP)


@pytest.mark.parametrize(
    ("part", "words"),
    [
        ((0, 12), "is 11 blocks of HPSS frames: it cannot be split into 12 parts"),
        ((3, 3), "0 <= index < count"),
        ((-1, 2), "0 <= index < count"),
        ((0, 0), "1 <= count <= 64"),
        ((0, 65), "1 <= count <= 64"),
    ],
)
def test_a_part_that_does_not_exist_is_refused(part, words):
    with pytest.raises(InvalidInput, match=words):
        part_samples(10 * STEP + 5, part, hop_length=128, block_frames=64)


def test_joined_source_reads_across_part_boundaries():
    y = np.arange(2 * 23, dtype=np.float32).reshape(2, 23)
    joined = JoinedSource([ArraySource(y[:, :5], 8000), ArraySource(y[:, 5:6], 8000), ArraySource(y[:, 6:], 8000)])
    assert (joined.frames, joined.channels, joined.sample_rate) == (23, 2, 8000)
    for start, stop in [(0, 23), (3, 7), (5, 6), (4, 5), (6, 23), (10, 10), (0, 1), (22, 23)]:
        np.testing.assert_array_equal(joined.read(start, stop), y[:, start:stop])


def test_joined_source_refuses_parts_that_disagree():
    with pytest.raises(InvalidInput, match="b.wav is 1 channels at 8000 Hz, but a.wav is 2 at 8000 Hz"):
        JoinedSource([ArraySource(np.zeros((2, 4)), 8000), ArraySource(np.zeros((1, 4)), 8000)], ["a.wav", "b.wav"])
    with pytest.raises(InvalidInput, match="at least one part"):
        JoinedSource([])


# --- the workers -----------------------------------------------------------------------------
async def decompose(stub, **fields) -> hpss_pb2.DecomposeResult:
    result = None
    async for msg in stub.Decompose(hpss_pb2.DecomposeRequest(encoding=F32, **fields)):
        if msg.HasField("result"):
            result = msg.result
    assert result is not None
    return result


async def test_the_hpss_worker_writes_one_part_and_the_parts_join_to_the_whole(hpss):
    y = synth_song(8.0, seed=3)  # 3 of the worker's blocks (1024 frames of 128 samples)
    key = hpss.put("in/stem.wav", y)
    stub = hpss_pb2_grpc.HpssServiceStub(hpss.channel)
    options = common_pb2.HpssOptions(**SMALL)
    whole = await decompose(stub, input_key=key, harmonic_key="h.wav", percussive_key="p.wav", options=options)
    parts = [
        await decompose(
            stub,
            input_key=key,
            harmonic_key=f"h.{i}.wav",
            percussive_key=f"p.{i}.wav",
            options=options,
            part=hpss_pb2.HpssPart(index=i, count=3),
        )
        for i in range(3)
    ]
    blocks = block_count(y.shape[1], hop_length=128)  # the worker's own block size (1024 frames)
    assert blocks == 3
    for i, result in enumerate(parts):
        start, stop = part_samples(y.shape[1], (i, 3), hop_length=128)
        assert result.harmonic.audio.frames == stop - start
        assert not result.harmonic.HasField("loudness")  # a part is nobody's track
    for name in ("h", "p"):
        joined = np.concatenate([hpss.get(f"{name}.{i}.wav") for i in range(3)], axis=1)
        np.testing.assert_array_equal(joined, hpss.get(f"{name}.wav"))
    assert whole.harmonic.HasField("loudness")


@pytest.mark.parametrize(
    ("part", "words"),
    [
        (hpss_pb2.HpssPart(index=0, count=40), "cannot be split into 40 parts"),
        (hpss_pb2.HpssPart(index=2, count=2), "index < count"),
        (hpss_pb2.HpssPart(index=1, count=1), "needs part.count >= 2"),
        (hpss_pb2.HpssPart(index=0, count=65), "count <= 64"),
    ],
)
async def test_the_hpss_worker_refuses_a_part_that_does_not_exist(hpss, part, words):
    key = hpss.put("in/stem.wav", synth_song(4.0, seed=3))
    stub = hpss_pb2_grpc.HpssServiceStub(hpss.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await decompose(
            stub,
            input_key=key,
            harmonic_key="h.wav",
            percussive_key="p.wav",
            options=common_pb2.HpssOptions(**SMALL),
            part=part,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
    assert not (hpss.root / "h.wav").exists() and not (hpss.root / "p.wav").exists()


async def test_the_composite_sums_inputs_given_in_parts_as_it_sums_whole_ones(composite):
    a, b = synth_song(3.0, seed=1) * 0.4, synth_song(3.0, seed=2) * 0.4
    composite.put("a.wav", a)
    composite.put("b.wav", b)
    cuts = [0, 1000, 50_000, a.shape[1]]  # ragged parts
    for i in range(3):
        composite.put(f"a.{i}.wav", a[:, cuts[i] : cuts[i + 1]])
        composite.put(f"b.{i}.wav", b[:, cuts[i] : cuts[i + 1]])
    stub = composite_pb2_grpc.CompositeServiceStub(composite.channel)
    parted = [composite_pb2.InputParts(keys=[f"{x}.{i}.wav" for i in range(3)]) for x in "ab"]
    await stub.Composite(
        composite_pb2.CompositeRequest(
            composites=[
                composite_pb2.CompositeSpec(name="whole", input_keys=["a.wav", "b.wav"], output_key="w.wav"),
                composite_pb2.CompositeSpec(name="parted", input_parts=parted, output_key="p.wav"),
                composite_pb2.CompositeSpec(
                    name="both", input_keys=["a.wav"], input_parts=parted[1:], output_key="m.wav"
                ),
            ],
            encoding=F32,
        )
    )
    np.testing.assert_array_equal(composite.get("p.wav"), composite.get("w.wav"))
    np.testing.assert_array_equal(composite.get("m.wav"), composite.get("w.wav"))


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (composite_pb2.CompositeSpec(name="x", output_key="o.wav"), "input_keys or input_parts"),
        (
            composite_pb2.CompositeSpec(name="x", output_key="o.wav", input_parts=[composite_pb2.InputParts()]),
            "has 0 keys; it needs 1 to 64",
        ),
        (
            composite_pb2.CompositeSpec(
                name="x", output_key="o.wav", input_parts=[composite_pb2.InputParts(keys=["a.wav", "mono.wav"])]
            ),
            "mono.wav is 1 channels at 44100 Hz, but a.wav is 2",
        ),
        (
            composite_pb2.CompositeSpec(
                name="x",
                output_key="o.wav",
                input_keys=["a.wav"],
                input_parts=[composite_pb2.InputParts(keys=["a.wav", "a.wav"])],
            ),
            "input 'a.wav + a.wav' has 88200 samples but 'a.wav' has 44100",
        ),
    ],
)
async def test_the_composite_refuses_parts_that_cannot_join(composite, spec, words):
    composite.put("a.wav", synth_song(1.0, seed=1))
    composite.put("mono.wav", synth_song(1.0, seed=1)[:1])
    stub = composite_pb2_grpc.CompositeServiceStub(composite.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Composite(composite_pb2.CompositeRequest(composites=[spec], encoding=F32))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details(), err.value.details()
    assert not (composite.root / "o.wav").exists()
