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
from audiomesh.churn import duplicate_owners, worker_calls
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


async def test_an_orchestrator_cut_off_from_the_store_stops_and_a_peer_finishes(s3_mesh, tmp_path):
    """A real partition (a TCP proxy that goes silent) between one orchestrator and S3 while it runs
    a job: its lease renewals hang, it stops at 2/3 of the TTL by its own clock (cancelling its node
    calls), a peer that still reaches the store takes the job over after a TTL and finishes it, and
    once the line is back the cut-off one writes nothing."""
    import asyncio
    import time
    from datetime import datetime

    from tests.helpers.mesh import until_job
    from tests.helpers.proxy import Proxy
    from tests.test_cluster import TTL, events, replicas, separating, timed_watch

    proxy = Proxy(s3_mesh.env["AUDIOMESH_S3_ENDPOINT"])
    song = write_song(tmp_path / "song.wav", 12.0, seed=21).read_bytes()
    try:
        async with (
            replicas(s3_mesh, "kappa", s3_endpoint=proxy.address) as (cut,),
            replicas(s3_mesh, "lambda") as (peer,),
        ):
            job_id = (await upload(cut.stub, song, "song.wav")).job.job_id
            watch = asyncio.ensure_future(timed_watch(peer.stub, job_id, timeout=240))

            await until_job(peer.stub, job_id, separating, 60, "separation did not start")
            proxy.partition()
            cut_at = time.time()
            final, _, _ = await watch
            assert final.state == SUCCEEDED, final.error
            log = events(job_id, s3_mesh)
            # Taken over by a replica that reaches the store: lambda, or the mesh's own orchestrator.
            taken = [e for e in log if "taken over by" in e and "kappa" not in e]
            assert taken, log
            # Events carry the writer's wall-clock time (this process: the same clock as cut_at).
            took = datetime.fromisoformat(taken[0].split(" ", 1)[0]).timestamp() - cut_at
            print(f"partition -> taken over by the peer after {took:.1f} s (TTL {TTL:g} s)")
            assert took >= TTL * 2 / 3  # never before the cut-off holder's own deadline
            assert proxy.dropped or proxy.held  # the cut-off one did try to reach the store
            # The workers' logs: the cut-off holder's calls for this job were cancelled — a worker
            # still finishes the chunk it is computing, then writes nothing — and none succeeded
            # after the peer started the same node.
            calls = worker_calls(list(s3_mesh.log_dir.glob("*.log")), {job_id})
            leases = {c.lease for spans in calls.values() for c in spans}
            assert "kappa@1" in leases and len(leases) > 1, calls
            assert duplicate_owners(calls) == [], calls
            proxy.heal()
            await asyncio.sleep(2 * TTL)  # its hung calls answer or fail now; nothing may land
            after = events(job_id, s3_mesh)
            assert after == log, [e for e in after if e not in log]
            assert not [e for e in after[after.index(taken[0]) :] if "kappa" in e]
    finally:
        proxy.close()
