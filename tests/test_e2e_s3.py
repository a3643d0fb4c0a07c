"""The same mesh on the S3 backend: the real minio client against moto's S3 server on 127.0.0.1.

moto checks no request signatures, so this says nothing about S3 authentication.
"""

from __future__ import annotations

import json

import grpc
import jsonschema
import numpy as np
import pytest
import soundfile as sf

from audiomesh import manifest
from audiomesh.v1 import orchestrator_pb2_grpc
from tests.helpers.mesh import SUCCEEDED, start_mesh, upload, wait_for, write_song
from tests.helpers.s3 import ACCESS_KEY, REGION, SECRET_KEY, boto3_client

BUCKET = "audiomesh-e2e"


@pytest.fixture(scope="module")
def s3_mesh(s3_server, tmp_path_factory):
    mesh = start_mesh(
        tmp_path_factory.mktemp("s3mesh"),
        AUDIOMESH_STORE_URL=f"s3://{BUCKET}/tenant-a",
        AUDIOMESH_S3_ENDPOINT=s3_server,
        AUDIOMESH_S3_ACCESS_KEY=ACCESS_KEY,
        AUDIOMESH_S3_SECRET_KEY=SECRET_KEY,
        AUDIOMESH_S3_REGION=REGION,
    )
    try:
        yield mesh
    finally:
        mesh.stop()


async def test_job_on_s3(s3_mesh, s3_server, tmp_path):
    song = write_song(tmp_path / "song.wav", 4.0)
    async with grpc.aio.insecure_channel(s3_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        job = (await upload(stub, song.read_bytes(), "song.wav")).job
        job, _ = await wait_for(stub, job.job_id)
    assert job.state == SUCCEEDED, job.error
    s3 = boto3_client(s3_server)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"tenant-a/jobs/{job.job_id}/")["Contents"]}
    for track in job.tracks:
        assert f"tenant-a/{track.key}" in keys
    doc = json.loads(s3.get_object(Bucket=BUCKET, Key=f"tenant-a/{job.manifest_key}")["Body"].read())
    jsonschema.validate(doc, manifest.schema())
    assert doc["job"]["state"] == "JOB_STATE_SUCCEEDED"
    main = next(t for t in job.tracks if t.name == "main")
    body = s3.get_object(Bucket=BUCKET, Key=f"tenant-a/{main.key}")["Body"].read()
    local = tmp_path / "main.wav"
    local.write_bytes(body)
    y, rate = sf.read(local, always_2d=True)
    assert rate == 44100 and y.shape[1] == 2 and np.isfinite(y).all()
    assert main.sha256 == __import__("hashlib").sha256(body).hexdigest()
