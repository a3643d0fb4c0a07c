"""RoFormer models beside Demucs through the whole mesh (issue 20).

A local model repository holds what the community shares — Music-Source-Separation-Training
configs and checkpoints (``NAME.yaml`` + ``NAME.ckpt``) — for a tiny BS-RoFormer (vocals as its
target: vocals + other = mix - vocals) and a tiny 4-stem Mel-Band RoFormer, saved from MSST's own
network classes with seeded random weights (tests/helpers/roformer.py), plus a config whose
checkpoint is missing. A real mesh lists them, runs whole jobs with them (stems, HPSS,
composites, loudness) and refuses what a RoFormer cannot do, with messages that say why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from audiomesh.launcher import Mesh
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, separation_pb2
from tests.helpers.mesh import SUCCEEDED, read, start_mesh, upload, wait_for, write_song
from tests.helpers.roformer import write_roformer

BS = "tiny_bs_roformer"
MEL = "tiny_mel_roformer"
NO_WEIGHTS = "roformer_without_weights"


@pytest.fixture(scope="module")
def roformer_mesh(tmp_path_factory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("roformer")
    repo = tmp / "models"
    repo.mkdir()
    write_roformer(repo, BS, network="bs_roformer", instruments=("vocals", "other"), target="vocals", seed=1)
    write_roformer(
        repo, MEL, network="mel_band_roformer", instruments=("drums", "bass", "other", "vocals"), target=None, seed=2
    )
    _, checkpoint = write_roformer(repo, NO_WEIGHTS, network="bs_roformer", instruments=("vocals", "other"))
    checkpoint.unlink()
    mesh = start_mesh(tmp, AUDIOMESH_MODEL_REPO=str(repo), AUDIOMESH_COMPILE="false")
    try:
        yield mesh
    finally:
        mesh.stop()


def root(mesh: Mesh) -> Path:
    return Path(mesh.env["AUDIOMESH_STORE_URL"].removeprefix("file://"))


async def run_job(mesh: Mesh, song: bytes, model: str, **separation) -> orchestrator_pb2.Job:
    options = orchestrator_pb2.JobOptions(model=model)
    for name, value in separation.items():
        setattr(options.separation, name, value)
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        created = (await upload(stub, song, "song.wav", options)).job
        job, _ = await wait_for(stub, created.job_id, timeout=180)
    return job


async def test_the_models_are_listed_with_their_stems_and_whether_their_weights_are_here(roformer_mesh):
    async with grpc.aio.insecure_channel(roformer_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        models = {m.name: m for m in (await stub.ListModels(separation_pb2.ListModelsRequest())).models}
    assert "demucs_unittest" in models  # beside Demucs, not instead
    bs, mel, missing = models[BS], models[MEL], models[NO_WEIGHTS]
    assert (bs.kind, list(bs.sources), bs.available, bs.sample_rate, bs.audio_channels) == (
        "roformer",
        ["vocals", "other"],
        True,
        44100,
        2,
    )
    assert (mel.kind, list(mel.sources), mel.available) == ("roformer", ["drums", "bass", "other", "vocals"], True)
    assert "BS-RoFormer" in bs.description and "Mel" in mel.description
    assert missing.kind == "roformer" and not missing.available


async def stems_of(mesh: Mesh, job: orchestrator_pb2.Job, model_name: str) -> dict[str, np.ndarray]:
    """The job's stems computed here: its decoded mix through the same model, loaded from the repo."""
    from audiomesh.audio.stream import ArraySource
    from audiomesh.separation import SeparatorFactory

    model = SeparatorFactory(model_repo=Path(mesh.env["AUDIOMESH_MODEL_REPO"]), device="cpu").get(model_name)
    mix = read(root(mesh) / f"jobs/{job.job_id}/decode/mix.wav")
    blocks = list(model.separate_stream(ArraySource(mix, 44100)))
    return {stem: np.concatenate([b[stem] for _, b in blocks], axis=1) for stem in blocks[0][1]}


@pytest.mark.parametrize(
    ("model", "stems", "main"),
    [
        (BS, ["vocals", "other"], ["other"]),  # two stems: main is the instrumental
        (MEL, ["drums", "bass", "other", "vocals"], ["drums", "bass", "other"]),
    ],
)
async def test_a_whole_job_runs_on_a_roformer(roformer_mesh, tmp_path, model, stems, main):
    song = write_song(tmp_path / "song.wav", 3.0, seed=4).read_bytes()
    job = await run_job(roformer_mesh, song, model)
    assert job.state == SUCCEEDED, job.error
    assert job.separation_parts == 1  # a RoFormer is never split into chunk ranges (Demucs only)
    delivered = {t.name for t in job.tracks}
    assert delivered == {*stems, "harmonic", "percussive", "main", "main_harmonic", "main_percussive"}
    names = [n.name for n in job.nodes]
    assert [f"hpss:{s}" for s in main] == [n for n in names if n.startswith("hpss:") and n != "hpss:mix"]
    store = root(roformer_mesh)
    expected = await stems_of(roformer_mesh, job, model)
    assert list(expected) == stems
    for stem in stems:
        got = read(store / f"jobs/{job.job_id}/separation/{stem}.wav")
        np.testing.assert_allclose(got, expected[stem], atol=1e-6, err_msg=stem)
    composite = read(store / f"jobs/{job.job_id}/composite/main.wav")
    np.testing.assert_allclose(composite, sum(expected[s] for s in main), atol=1e-5)
    manifest = json.loads((store / job.manifest_key).read_bytes())
    assert manifest["job"]["options"]["model"] == model
    assert all(t.HasField("loudness") for t in job.tracks)


@pytest.mark.parametrize(
    ("model", "separation", "code", "words"),
    [
        (BS, {"shifts": 2}, grpc.StatusCode.INVALID_ARGUMENT, "is a RoFormer, which runs one pass"),
        (BS, {"overlap": 0.5}, grpc.StatusCode.INVALID_ARGUMENT, "separation.overlap"),
        (BS, {"two_stems": "drums"}, grpc.StatusCode.INVALID_ARGUMENT, "of model 'tiny_bs_roformer' (vocals, other)"),
    ],
)
async def test_what_a_roformer_cannot_do_is_refused_when_the_job_is_created(
    roformer_mesh, tmp_path, model, separation, code, words
):
    song = write_song(tmp_path / "song.wav", 1.0).read_bytes()
    options = orchestrator_pb2.JobOptions(model=model)
    for name, value in separation.items():
        setattr(options.separation, name, value)
    async with grpc.aio.insecure_channel(roformer_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await upload(stub, song, "song.wav", options)
    assert err.value.code() == code and words in err.value.details(), err.value.details()


async def test_a_model_without_its_checkpoint_fails_fast_and_says_where_to_put_it(roformer_mesh, tmp_path):
    """As for a Demucs model without weights: the job is taken (its config lists it) and fails
    in seconds, naming the missing file and the folder."""
    song = write_song(tmp_path / "song.wav", 1.0).read_bytes()
    job = await run_job(roformer_mesh, song, NO_WEIGHTS)
    assert job.state == common_pb2.JOB_STATE_FAILED
    assert f"{NO_WEIGHTS}.yaml has no weights beside it: put its checkpoint in" in job.error.message, job.error


async def test_shifts_one_and_two_stems_work_as_for_demucs(roformer_mesh, tmp_path):
    song = write_song(tmp_path / "song.wav", 2.0, seed=8).read_bytes()
    job = await run_job(roformer_mesh, song, MEL, shifts=1, two_stems="vocals")
    assert job.state == SUCCEEDED, job.error
    assert {t.name for t in job.tracks} >= {"vocals", "no_vocals", "main"}
    assert job.state == common_pb2.JOB_STATE_SUCCEEDED
