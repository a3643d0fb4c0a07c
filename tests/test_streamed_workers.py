"""Composite and normalize over gRPC (port 0), on signals longer than one block: the streamed
results equal the whole-signal functions, levels are measured once, failures leave nothing."""

from __future__ import annotations

import math
from dataclasses import astuple

import grpc
import numpy as np
import pytest

from audiomesh.audio.stream import BLOCK_FRAMES
from audiomesh.demo import synth_song
from audiomesh.dsp.composite import mix
from audiomesh.dsp.loudness import measure
from audiomesh.dsp.normalize import apply_gain_db
from audiomesh.tracks import SILENCE_LUFS, loudness_pb, measurement_from_pb
from audiomesh.v1 import common_pb2, composite_pb2, composite_pb2_grpc, normalize_pb2, normalize_pb2_grpc
from tests.helpers.workers import F32

RATE = 44100
SECONDS = 2.5 * BLOCK_FRAMES / RATE  # three blocks, the last one partial


def levels(loudness: common_pb2.Loudness) -> tuple[float, float, float]:
    m = measurement_from_pb(loudness)
    return m.integrated_lufs, m.sample_peak_dbfs, m.true_peak_dbtp


def stems(n: int) -> list[np.ndarray]:
    return [(synth_song(SECONDS, seed=10 + i) * (0.5 - 0.1 * i)).astype(np.float32) for i in range(n)]


async def test_composites_equal_whole_signal_mix_bit_for_bit(composite):
    signals = {f"s{i}.wav": y for i, y in enumerate(stems(3))}
    for key, y in signals.items():
        composite.put(key, y)
    recipes = {"main": ["s0.wav", "s1.wav", "s2.wav"], "pair": ["s2.wav", "s0.wav"], "one": ["s1.wav"]}
    stub = composite_pb2_grpc.CompositeServiceStub(composite.channel)
    resp = await stub.Composite(
        composite_pb2.CompositeRequest(
            composites=[
                composite_pb2.CompositeSpec(name=name, input_keys=keys, output_key=f"out/{name}.wav")
                for name, keys in recipes.items()
            ],
            encoding=F32,
        )
    )
    assert [t.name for t in resp.tracks] == list(recipes)  # request order, though run on threads
    for track in resp.tracks:
        expected = mix({k: signals[k] for k in recipes[track.name]})
        written = composite.get(track.key)
        np.testing.assert_array_equal(written, expected)
        assert track.audio.frames == expected.shape[1] and track.audio.sample_rate == RATE
        assert levels(track.loudness) == pytest.approx(astuple(measure(expected, RATE)), abs=1e-9)


@pytest.mark.parametrize(
    ("second", "rate", "words"),
    [
        (np.zeros((2, 1000), np.float32), RATE, "'b.wav' has 1000 samples but 'a.wav' has"),
        (np.zeros((1, 5000), np.float32), RATE, "'b.wav' has 1 channels but 'a.wav' has 2"),
        (np.zeros((2, 5000), np.float32), 48000, "differ in sample rate"),
    ],
)
async def test_composite_refuses_mismatched_inputs_and_writes_nothing(composite, second, rate, words):
    composite.put("a.wav", np.zeros((2, 5000), np.float32))
    composite.put("b.wav", second, rate)
    composite.put("c.wav", np.zeros((2, 5000), np.float32))
    stub = composite_pb2_grpc.CompositeServiceStub(composite.channel)
    request = composite_pb2.CompositeRequest(
        composites=[
            composite_pb2.CompositeSpec(name="good", input_keys=["a.wav", "c.wav"], output_key="out/good.wav"),
            composite_pb2.CompositeSpec(name="bad", input_keys=["a.wav", "b.wav"], output_key="out/bad.wav"),
        ],
        encoding=F32,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Composite(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()
    assert not (composite.root / "out").exists() or not any((composite.root / "out").iterdir())


async def test_composite_missing_input_is_not_found_and_writes_nothing(composite):
    composite.put("a.wav", stems(1)[0])
    stub = composite_pb2_grpc.CompositeServiceStub(composite.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Composite(
            composite_pb2.CompositeRequest(
                composites=[
                    composite_pb2.CompositeSpec(name="ok", input_keys=["a.wav"], output_key="out/ok.wav"),
                    composite_pb2.CompositeSpec(name="x", input_keys=["a.wav", "nope.wav"], output_key="out/x.wav"),
                ]
            )
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope.wav" in err.value.details()
    assert not (composite.root / "out").exists() or not any((composite.root / "out").iterdir())


def _request(names, *, loudness=None, reference_loudness=None, **kw) -> normalize_pb2.NormalizeRequest:
    request = normalize_pb2.NormalizeRequest(reference_key="mix.wav", encoding=F32, **kw)
    for name in names:
        item = request.items.add(name=name, input_key=f"{name}.wav", output_key=f"out/{name}.wav")
        if loudness is not None:
            item.loudness.CopyFrom(loudness[name])
    if reference_loudness is not None:
        request.reference_loudness.CopyFrom(reference_loudness)
    return request


@pytest.mark.parametrize("linked", [True, False])
async def test_normalize_streamed_equals_whole_signal_gain_with_or_without_known_levels(normalize, linked):
    drums, bass, silent = stems(2) + [np.zeros((2, int(SECONDS * RATE)), np.float32)]
    signals = {"mix": mix([drums, bass, silent]), "drums": drums, "bass": bass, "silent": silent}
    for name, y in signals.items():
        normalize.put(f"{name}.wav", y)
    known = {name: loudness_pb(measure(y, RATE)) for name, y in signals.items()}
    assert known["silent"].integrated_lufs == SILENCE_LUFS  # stored as -200, read back as -inf
    linking = common_pb2.GAIN_LINKING_LINKED if linked else common_pb2.GAIN_LINKING_PER_TRACK
    kwargs = {"options": common_pb2.NormalizeOptions(linking=linking)}
    stub = normalize_pb2_grpc.NormalizeServiceStub(normalize.channel)

    measured_here = await stub.Normalize(_request(signals, **kwargs))
    outputs_here = {name: normalize.get(f"out/{name}.wav") for name in signals}
    given = await stub.Normalize(_request(signals, loudness=known, reference_loudness=known["mix"], **kwargs))
    outputs_given = {name: normalize.get(f"out/{name}.wav") for name in signals}

    for here, there in zip(measured_here.tracks, given.tracks, strict=True):
        assert here.gain_db == there.gain_db and math.isfinite(here.gain_db)
        assert levels(here.before) == pytest.approx(levels(there.before), abs=1e-9)
        assert levels(here.track.loudness) == pytest.approx(levels(there.track.loudness), abs=1e-9)
        np.testing.assert_array_equal(outputs_here[here.track.name], outputs_given[here.track.name])
    assert levels(measured_here.reference) == pytest.approx(levels(given.reference), abs=1e-9)

    for t in given.tracks:
        y = signals[t.track.name]
        np.testing.assert_array_equal(outputs_given[t.track.name], apply_gain_db(y, t.gain_db))
        assert levels(t.before) == pytest.approx(astuple(measure(y, RATE)), abs=1e-9)
        # Levels after gain: loudness and sample peak measured, true peak = before + gain.
        after = measure(outputs_given[t.track.name], RATE)
        assert levels(t.track.loudness) == pytest.approx(astuple(after), abs=1e-4)
    silent_track = next(t for t in given.tracks if t.track.name == "silent")
    assert levels(silent_track.track.loudness) == (-math.inf, -math.inf, -math.inf)
    if linked:
        assert len({t.gain_db for t in given.tracks}) == 1
        np.testing.assert_allclose(
            outputs_given["drums"] + outputs_given["bass"], outputs_given["mix"], atol=1e-5, rtol=0
        )


async def test_normalize_missing_input_fails_and_removes_what_it_wrote(normalize):
    drums = stems(1)[0]
    normalize.put("mix.wav", drums)
    normalize.put("drums.wav", drums)
    stub = normalize_pb2_grpc.NormalizeServiceStub(normalize.channel)
    known = {n: loudness_pb(measure(drums, RATE)) for n in ("mix", "drums", "gone")}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Normalize(_request(["mix", "drums", "gone"], loudness=known))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "gone.wav" in err.value.details()
    assert not (normalize.root / "out").exists() or not any((normalize.root / "out").iterdir())


async def test_measure_equals_whole_signal_measure(normalize):
    y = stems(1)[0]
    normalize.put("a.wav", y)
    stub = normalize_pb2_grpc.NormalizeServiceStub(normalize.channel)
    resp = await stub.Measure(normalize_pb2.MeasureRequest(keys=["a.wav"]))
    (m,) = resp.measurements
    assert levels(m.loudness) == pytest.approx(astuple(measure(y, RATE)), abs=1e-9)
    assert m.audio.frames == y.shape[1] and m.audio.channels == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Measure(normalize_pb2.MeasureRequest(keys=["a.wav", "nope.wav"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
