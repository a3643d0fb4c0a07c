"""Every worker over gRPC, in this process on port 0: health, reflection, RPCs, errors."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from audiomesh.demo import synth_song
from audiomesh.dsp.loudness import measure
from audiomesh.separation import SeparationOptions
from audiomesh.services.composite.server import build as build_composite
from audiomesh.services.hpss.server import build as build_hpss
from audiomesh.services.normalize.server import build as build_normalize
from audiomesh.services.separation.server import build as build_separation
from audiomesh.v1 import (
    common_pb2,
    composite_pb2,
    composite_pb2_grpc,
    hpss_pb2,
    hpss_pb2_grpc,
    normalize_pb2,
    normalize_pb2_grpc,
    separation_pb2,
    separation_pb2_grpc,
)
from tests.helpers.workers import F32, Worker, running_worker


@pytest.mark.parametrize("build", [build_separation, build_hpss, build_composite, build_normalize])
async def test_health_and_reflection(build, tmp_path):
    async with running_worker(build, tmp_path) as worker:
        await _check_health_and_reflection(worker)


async def _check_health_and_reflection(worker: Worker) -> None:
    health = health_pb2_grpc.HealthStub(worker.channel)
    for service in ("", worker.full_name):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(worker.channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for resp in reflection.ServerReflectionInfo(ask()):
        names = {s.name for s in resp.list_services_response.service}
        assert {worker.full_name, "grpc.health.v1.Health"} <= names
        break


async def _separate(stub, request):
    progress, result = [], None
    async for msg in stub.Separate(request):
        if msg.HasField("progress"):
            progress.append(msg.progress.fraction)
        else:
            result = msg.result
    return progress, result


@pytest.mark.parametrize("model", ["demucs_unittest", "tiny_ht"])
async def test_separate_streams_progress_and_writes_stems(separation, model):
    key = separation.put("in/mix.wav", synth_song(3.0))
    stub = separation_pb2_grpc.SeparationServiceStub(separation.channel)
    progress, result = await _separate(
        stub, separation_pb2.SeparateRequest(input_key=key, output_prefix="out", model=model, encoding=F32)
    )
    assert progress and progress == sorted(progress)
    assert {t.name for t in result.stems} == {"drums", "bass", "other", "vocals"}
    for track in result.stems:
        y = separation.get(track.key)
        assert y.shape == (2, 3 * 44100) and np.isfinite(y).all()
        assert track.sha256 and track.audio.sample_rate == 44100


class _WholeSignalOnly:
    """A separator without ``separate_stream`` (as a non-Demucs model may be): the whole-signal path."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, attr: str):
        if attr == "separate_stream":
            raise AttributeError(attr)
        return getattr(self._inner, attr)


async def test_separate_whole_signal_path_for_models_that_do_not_stream(separation):
    factory = separation.servicer.factory
    model = factory.get("tiny_ht")
    assert factory.swap("tiny_ht", model.device, model, _WholeSignalOnly(model))
    y = synth_song(2.0)
    key = separation.put("in/mix.wav", y)
    stub = separation_pb2_grpc.SeparationServiceStub(separation.channel)
    request = separation_pb2.SeparateRequest(
        input_key=key,
        output_prefix="out",
        model="tiny_ht",
        encoding=F32,
        options=common_pb2.SeparationOptions(shifts=0),
    )
    _, result = await _separate(stub, request)
    expected = model.separate(y, options=SeparationOptions(shifts=0))
    assert {t.name for t in result.stems} == set(expected)
    for track in result.stems:
        np.testing.assert_allclose(separation.get(track.key), expected[track.name], atol=1e-6, rtol=0)
        assert track.HasField("loudness") and track.audio.frames == y.shape[1]


async def test_separate_models_listed(separation):
    stub = separation_pb2_grpc.SeparationServiceStub(separation.channel)
    models = await stub.ListModels(separation_pb2.ListModelsRequest())
    by_name = {m.name: m for m in models.models}
    assert by_name["tiny_ht"].origin == "local_repo" and by_name["tiny_ht"].available
    assert by_name["demucs_unittest"].available


@pytest.mark.parametrize(
    ("request_kwargs", "code", "words"),
    [
        ({"input_key": "in/missing.wav", "output_prefix": "o"}, grpc.StatusCode.NOT_FOUND, "in/missing.wav"),
        ({"input_key": "in/mix.wav", "output_prefix": "o", "model": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
        ({"input_key": "in/mix.wav", "output_prefix": ""}, grpc.StatusCode.INVALID_ARGUMENT, "output_prefix"),
        (
            {"input_key": "in/mix.wav", "output_prefix": "o", "options": common_pb2.SeparationOptions(overlap=1.5)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "overlap",
        ),
        (
            {"input_key": "in/mix.wav", "output_prefix": "o", "model": "htdemucs"},
            grpc.StatusCode.FAILED_PRECONDITION,
            "AUDIOMESH_MODEL_REPO",
        ),
    ],
)
async def test_separate_errors(separation, request_kwargs, code, words):
    separation.put("in/mix.wav", synth_song(1.0))
    stub = separation_pb2_grpc.SeparationServiceStub(separation.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _separate(stub, separation_pb2.SeparateRequest(**request_kwargs))
    assert err.value.code() == code
    assert words in err.value.details()
    assert not (separation.root / "o").exists()


async def test_separate_busy_worker_says_resource_exhausted(separation):
    key = separation.put("in/long.wav", synth_song(20.0))
    stub = separation_pb2_grpc.SeparationServiceStub(separation.channel)
    request = separation_pb2.SeparateRequest(input_key=key, output_prefix="busy", model="tiny_ht")
    labels = {"service": "separation"}
    refused_before = REGISTRY.get_sample_value("audiomesh_worker_refusals_total", labels) or 0.0
    first = asyncio.ensure_future(_separate(stub, request))
    await asyncio.sleep(0.5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _separate(stub, request)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The metrics an autoscaler and the dashboard read: every slot busy, one refusal more.
    slots = REGISTRY.get_sample_value("audiomesh_worker_slots", labels)
    assert slots is not None and REGISTRY.get_sample_value("audiomesh_worker_slots_busy", labels) == slots
    assert REGISTRY.get_sample_value("audiomesh_worker_refusals_total", labels) == refused_before + 1
    # Cheap calls still answer while the heavy slot is taken.
    assert (await stub.ListModels(separation_pb2.ListModelsRequest())).models
    first.cancel()  # the client going away cancels the work


@pytest.mark.parametrize("skip_loudness", [False, True])
async def test_hpss_parts_sum_to_input(hpss, skip_loudness):
    y = synth_song(3.0)
    key = hpss.put("in/x.wav", y)
    stub = hpss_pb2_grpc.HpssServiceStub(hpss.channel)
    result = None
    async for msg in stub.Decompose(
        hpss_pb2.DecomposeRequest(
            input_key=key, harmonic_key="h.wav", percussive_key="p.wav", encoding=F32, skip_loudness=skip_loudness
        )
    ):
        if msg.HasField("result"):
            result = msg.result
    assert result.harmonic.key == "h.wav" and result.percussive.key == "p.wav"
    assert np.abs(hpss.get("h.wav") + hpss.get("p.wav") - y).max() < 1e-4
    for part, track in (("h.wav", result.harmonic), ("p.wav", result.percussive)):
        assert track.audio.frames == y.shape[1] and track.sha256
        # Measured unless told it is an intermediate nobody reports.
        assert track.HasField("loudness") != skip_loudness
        if not skip_loudness:
            assert track.loudness.integrated_lufs == pytest.approx(measure(hpss.get(part), 44100).integrated_lufs)


async def test_hpss_rejects_bad_margin(hpss):
    key = hpss.put("in/x.wav", synth_song(1.0))
    stub = hpss_pb2_grpc.HpssServiceStub(hpss.channel)
    options = common_pb2.HpssOptions(margin_harmonic=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Decompose(
            hpss_pb2.DecomposeRequest(input_key=key, harmonic_key="h.wav", percussive_key="p.wav", options=options)
        ):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not (hpss.root / "h.wav").exists()


async def test_composite_sums_inputs(composite):
    a, b = synth_song(2.0, seed=1) * 0.4, synth_song(2.0, seed=2) * 0.4
    composite.put("a.wav", a)
    composite.put("b.wav", b)
    stub = composite_pb2_grpc.CompositeServiceStub(composite.channel)
    resp = await stub.Composite(
        composite_pb2.CompositeRequest(
            composites=[composite_pb2.CompositeSpec(name="main", input_keys=["a.wav", "b.wav"], output_key="m.wav")],
            encoding=F32,
        )
    )
    assert resp.tracks[0].name == "main"
    assert np.abs(composite.get("m.wav") - (a + b)).max() < 1e-6
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Composite(composite_pb2.CompositeRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_normalize_linked_keeps_sums_and_measures(normalize):
    drums, rest = synth_song(3.0, seed=3) * 0.3, synth_song(3.0, seed=4) * 0.2
    mix = drums + rest
    for name, y in {"mix": mix, "drums": drums, "rest": rest}.items():
        normalize.put(f"{name}.wav", y)
    stub = normalize_pb2_grpc.NormalizeServiceStub(normalize.channel)
    resp = await stub.Normalize(
        normalize_pb2.NormalizeRequest(
            items=[
                normalize_pb2.NormalizeItem(name=n, input_key=f"{n}.wav", output_key=f"out/{n}.wav")
                for n in ("mix", "drums", "rest")
            ],
            reference_key="mix.wav",
            encoding=F32,
        )
    )
    gains = {t.track.name: t.gain_db for t in resp.tracks}
    assert len(set(gains.values())) == 1 and gains["mix"] == resp.linked_gain_db
    out = {n: normalize.get(f"out/{n}.wav") for n in gains}
    assert np.abs(out["drums"] + out["rest"] - out["mix"]).max() < 1e-5
    mix_after = next(t.track for t in resp.tracks if t.track.name == "mix")
    assert mix_after.loudness.true_peak_dbtp <= -1.0 + 0.05
    if not resp.limited_by_ceiling:
        assert abs(mix_after.loudness.integrated_lufs - -14.0) < 0.1
    measured = await stub.Measure(normalize_pb2.MeasureRequest(keys=["out/mix.wav"]))
    assert abs(measured.measurements[0].loudness.integrated_lufs - mix_after.loudness.integrated_lufs) < 0.01
