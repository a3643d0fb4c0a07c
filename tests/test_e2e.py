"""A song through the real mesh: five processes on 127.0.0.1, the file store, gRPC only."""

from __future__ import annotations

import json

import grpc
import jsonschema
import numpy as np
import pytest

from audiomesh import manifest
from audiomesh.v1 import common_pb2, orchestrator_pb2
from tests.helpers.mesh import SUCCEEDED, read, upload, wait_for, write_song

DELIVERED = {"vocals", "drums", "bass", "other", "harmonic", "percussive", "main", "main_harmonic", "main_percussive"}


def store_path(mesh, key: str):
    root = mesh.env["AUDIOMESH_STORE_URL"].removeprefix("file://")
    from pathlib import Path

    return Path(root) / key


async def test_song_becomes_every_track_and_a_valid_manifest(orchestrator, file_mesh, tmp_path):
    song = write_song(tmp_path / "song.wav", 6.0)
    response = await upload(orchestrator, song.read_bytes(), "my song.wav")
    assert response.job.state == common_pb2.JOB_STATE_QUEUED
    job, seen = await wait_for(orchestrator, response.job.job_id)

    assert job.state == SUCCEEDED, job.error
    assert {t.name for t in job.tracks} == DELIVERED
    # Progress is streamed: a snapshot first, fractions never go back, the last is 1.
    fractions = [j.fraction for j in seen]
    assert len(seen) >= 5
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {n.name for n in job.nodes} >= {"decode", "separation", "hpss:mix", "composite", "normalize"}
    assert all(n.state == common_pb2.NODE_STATE_SUCCEEDED and n.attempts == 1 for n in job.nodes)

    doc = json.loads(store_path(file_mesh, job.manifest_key).read_bytes())
    jsonschema.validate(doc, manifest.schema())
    assert doc["job"]["state"] == "JOB_STATE_SUCCEEDED"
    assert doc["job"]["input"]["name"] == "my_song.wav"
    assert doc["job"]["input"]["audio"]["sampleRate"] == 44100
    assert doc["software"]["demucs"]

    for track in job.tracks:
        path = store_path(file_mesh, track.key)
        assert path.is_file(), track.key
        assert track.key.startswith(f"jobs/{job.job_id}/output/") and track.key.endswith(".wav")
        assert track.audio.sample_rate == 44100 and track.audio.channels == 2
        assert track.audio.subtype == "PCM_16"
        # Linked normalization never crosses the true-peak ceiling.
        assert track.loudness.true_peak_dbtp <= -1.0 + 0.05

    # Invariant: main_harmonic + main_percussive ≈ main (STFT round-trip error only; the
    # delivered tracks share one linked gain, so the sum survives normalization up to 16-bit
    # quantization).
    out = {t.name: read(store_path(file_mesh, t.key)) for t in job.tracks}
    resid = out["main_harmonic"] + out["main_percussive"] - out["main"]
    assert np.abs(resid).max() < 5e-4
    # Stems sum back to the normalized mix's stems recipe: main = Σ accompaniment stems.
    assert np.abs(out["drums"] + out["bass"] + out["other"] - out["main"]).max() < 5e-4


async def test_get_and_list_jobs(orchestrator, tmp_path):
    song = write_song(tmp_path / "a.wav", 2.0)
    first = (await upload(orchestrator, song.read_bytes(), "a.wav")).job
    second = (await upload(orchestrator, song.read_bytes(), "b.wav")).job
    await wait_for(orchestrator, first.job_id)
    await wait_for(orchestrator, second.job_id)
    got = (await orchestrator.GetJob(orchestrator_pb2.GetJobRequest(job_id=first.job_id))).job
    assert got.job_id == first.job_id and got.state == SUCCEEDED
    page = await orchestrator.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=1))
    assert page.jobs[0].job_id == second.job_id  # newest first
    assert page.next_page_token
    nxt = await orchestrator.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=1, page_token=page.next_page_token))
    assert nxt.jobs[0].job_id == first.job_id


async def test_delete_job_removes_every_object(orchestrator, file_mesh, tmp_path):
    song = write_song(tmp_path / "d.wav", 2.0)
    job = (await upload(orchestrator, song.read_bytes(), "d.wav")).job
    await wait_for(orchestrator, job.job_id)
    folder = store_path(file_mesh, f"jobs/{job.job_id}")
    assert folder.is_dir()
    resp = await orchestrator.DeleteJob(orchestrator_pb2.DeleteJobRequest(job_id=job.job_id))
    assert resp.deleted_objects > 10
    assert not folder.exists()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await orchestrator.GetJob(orchestrator_pb2.GetJobRequest(job_id=job.job_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_create_job_from_existing_key(orchestrator, file_mesh, tmp_path):
    song = write_song(tmp_path / "k.wav", 2.0)
    target = store_path(file_mesh, "incoming/k.wav")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(song.read_bytes())
    job = (await orchestrator.CreateJob(orchestrator_pb2.CreateJobRequest(input_key="incoming/k.wav"))).job
    job, _ = await wait_for(orchestrator, job.job_id)
    assert job.state == SUCCEEDED and job.input.key == "incoming/k.wav"


async def test_config_and_models(orchestrator):
    from audiomesh.v1 import separation_pb2

    config = await orchestrator.GetConfig(orchestrator_pb2.GetConfigRequest())
    assert config.config["default_model"] == "demucs_unittest"
    assert "s3_secret_key" not in config.config
    models = await orchestrator.ListModels(separation_pb2.ListModelsRequest())
    names = {m.name for m in models.models}
    assert "demucs_unittest" in names and "htdemucs" in names
