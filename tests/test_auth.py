"""Authentication and ownership, over every RPC and every HTTP route (walked, not listed).

A mesh with two principals (alice, bob) and no service token configured: the launcher
generates one for the run, so the workers answer only the orchestrator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import httpx
import pytest
from google.protobuf.message_factory import GetMessageClass

from audiomesh.auth import hash_key
from audiomesh.v1 import common_pb2, hpss_pb2, hpss_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.mesh import start_mesh, write_song

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
KEYS = f"alice=sha256:{hash_key(ALICE)},bob=sha256:{hash_key(BOB)}"
PUBLIC = {("GET", "/health"), ("GET", "/openapi.json")}
ORCHESTRATOR = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"]


@pytest.fixture(scope="module")
def keyed_mesh(tmp_path_factory):
    mesh = start_mesh(
        tmp_path_factory.mktemp("auth"),
        gateway=True,
        AUDIOMESH_API_KEYS=KEYS,
        AUDIOMESH_SERVICE_TOKEN="",  # none configured: Mesh generates one (secure by default)
    )
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def alice_job(keyed_mesh, tmp_path_factory) -> dict:
    song = write_song(tmp_path_factory.mktemp("song") / "s.wav", 1.5)
    with httpx.Client(base_url=keyed_mesh.url, timeout=120) as http:
        resp = http.post(
            "/v1/jobs:upload",
            files={"file": ("s.wav", song.read_bytes())},
            headers={"Authorization": f"Bearer {ALICE}"},
        )
        assert resp.status_code == 200, resp.text
        job = resp.json()["job"]
        with http.stream("GET", f"/v1/jobs/{job['jobId']}:watch", headers={"Authorization": f"Bearer {ALICE}"}) as s:
            lines = [json.loads(x) for x in s.iter_lines() if x]
    final = lines[-1]["result"]["job"]
    assert final["state"] == "JOB_STATE_SUCCEEDED" and final["owner"] == "alice"
    return final


def http_operations(keyed_mesh) -> list[tuple[str, str]]:
    """Every (method, path) the gateway documents — annotated routes and custom handlers."""
    doc = httpx.get(f"{keyed_mesh.url}/openapi.json").json()
    return [(verb.upper(), path) for path, ops in doc["paths"].items() for verb in ops]


def _request(http: httpx.Client, verb: str, path: str, job_id: str, key: str | None) -> httpx.Response:
    url = path.replace("{job_id}", job_id).replace("{track}", "vocals")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    kwargs = {}
    if verb == "POST" and path in ("/v1/jobs:upload", "/process"):
        kwargs["files"] = {"file": ("x.wav", b"RIFF0000WAVE")}
    elif verb == "POST":
        kwargs["json"] = {"inputKey": f"jobs/{job_id}/input/s.wav"} if path == "/v1/jobs" else {}
    return http.request(verb, url, headers=headers, **kwargs)


def test_every_http_route_needs_a_key_and_hides_other_principals_jobs(keyed_mesh, alice_job):
    job_id = alice_job["jobId"]
    operations = http_operations(keyed_mesh)
    assert len(operations) >= 15
    with httpx.Client(base_url=keyed_mesh.url, timeout=60) as http:
        for verb, path in operations:
            if (verb, path) in PUBLIC:
                continue
            for key in (None, "wrong-key"):
                resp = _request(http, verb, path, job_id, key)
                assert resp.status_code == 401, (verb, path, key, resp.text)
                assert resp.json()["code"] == 16 and resp.headers["www-authenticate"].startswith("Bearer")
            if "{job_id}" in path or path == "/v1/jobs" and verb == "POST":
                resp = _request(http, verb, path, job_id, BOB)
                assert resp.status_code == 404, (verb, path, resp.text)
        # Bob's list has none of Alice's jobs; Alice's has hers; her job is intact after Bob tried.
        bob = http.get("/v1/jobs", headers={"Authorization": f"Bearer {BOB}"}).json()
        assert job_id not in {j["jobId"] for j in bob.get("jobs", [])}
        alice = http.get("/v1/jobs", headers={"Authorization": f"Bearer {ALICE}"}).json()
        assert job_id in {j["jobId"] for j in alice["jobs"]}
        zip_resp = http.get(f"/download/{job_id}/all", params={"access_token": ALICE})
        assert zip_resp.status_code == 200 and zip_resp.headers["content-type"] == "application/zip"
        assert http.get("/health").status_code == 200


async def test_every_rpc_needs_a_key_and_hides_other_principals_jobs(keyed_mesh, alice_job):
    job_id = alice_job["jobId"]
    async with grpc.aio.insecure_channel(keyed_mesh.orchestrator) as channel:
        for method in ORCHESTRATOR.methods:
            request_class = GetMessageClass(method.input_type)
            response_class = GetMessageClass(method.output_type)
            path = f"/{ORCHESTRATOR.full_name}/{method.name}"
            request = request_class()
            if "job_id" in request_class.DESCRIPTOR.fields_by_name:
                request.job_id = job_id
            if method.client_streaming:
                call = channel.stream_unary(path, request_class.SerializeToString, response_class.FromString)

                def invoke(md, call=call, request=request):
                    async def one():
                        yield orchestrator_pb2.UploadAudioRequest(
                            metadata=orchestrator_pb2.UploadMetadata(filename="x.wav", create_job=True)
                        )

                    return call(one(), metadata=md)
            elif method.server_streaming:
                call = channel.unary_stream(path, request_class.SerializeToString, response_class.FromString)

                def invoke(md, call=call, request=request):
                    async def first():
                        async for msg in call(request, metadata=md):
                            return msg

                    return first()
            else:
                call = channel.unary_unary(path, request_class.SerializeToString, response_class.FromString)

                def invoke(md, call=call, request=request):
                    return call(request, metadata=md)

            for md in ((), (("authorization", "Bearer nope"),)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await invoke(md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method.name
            if "job_id" in request_class.DESCRIPTOR.fields_by_name:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await invoke((("authorization", f"Bearer {BOB}"),))
                assert err.value.code() == grpc.StatusCode.NOT_FOUND, method.name
                assert job_id in err.value.details()
        get = channel.unary_unary(
            f"/{ORCHESTRATOR.full_name}/GetJob",
            orchestrator_pb2.GetJobRequest.SerializeToString,
            orchestrator_pb2.GetJobResponse.FromString,
        )
        mine = await get(
            orchestrator_pb2.GetJobRequest(job_id=job_id), metadata=(("authorization", f"Bearer {ALICE}"),)
        )
        assert mine.job.state == common_pb2.JOB_STATE_SUCCEEDED


def test_a_worker_with_api_keys_and_no_service_token_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOMESH_")}
    env.update(AUDIOMESH_API_KEYS=KEYS, AUDIOMESH_STORE_URL=f"file://{tmp_path}", AUDIOMESH_LOG_FORMAT="json")
    proc = subprocess.run(
        [sys.executable, "-m", "audiomesh.cli", "serve", "hpss", "--port", "0"],
        env=env,
        cwd=tmp_path,  # no .env here
        capture_output=True,
        text=True,
        timeout=120,  # before the fix it served until killed: TimeoutExpired
    )
    assert proc.returncode != 0
    assert "AUDIOMESH_SERVICE_TOKEN" in proc.stderr and "Set AUDIOMESH_SERVICE_TOKEN" in proc.stderr, proc.stderr


async def test_workers_refuse_calls_without_the_service_token(keyed_mesh, alice_job):
    # The token was generated for this run and handed to every child, never configured.
    token = keyed_mesh.env["AUDIOMESH_SERVICE_TOKEN"]
    assert len(token) >= 32
    async with grpc.aio.insecure_channel(keyed_mesh.addresses["hpss"]) as channel:
        stub = hpss_pb2_grpc.HpssServiceStub(channel)
        request = hpss_pb2.DecomposeRequest(
            input_key=alice_job["tracks"][0]["key"], harmonic_key="stolen/h.wav", percussive_key="stolen/p.wav"
        )
        for md in ((), (("x-audiomesh-service-token", "guess"),)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Decompose(request, metadata=md):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_create_job_cannot_read_another_principals_objects(keyed_mesh, alice_job):
    async with grpc.aio.insecure_channel(keyed_mesh.orchestrator) as channel:
        create = channel.unary_unary(
            f"/{ORCHESTRATOR.full_name}/CreateJob",
            orchestrator_pb2.CreateJobRequest.SerializeToString,
            orchestrator_pb2.CreateJobResponse.FromString,
        )
        request = orchestrator_pb2.CreateJobRequest(input_key=alice_job["input"]["key"])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create(request, metadata=(("authorization", f"Bearer {BOB}"),))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        own = await create(request, metadata=(("authorization", f"Bearer {ALICE}"),))
        assert own.job.owner == "alice"
        stub_get = channel.unary_stream(
            f"/{ORCHESTRATOR.full_name}/WatchJob",
            orchestrator_pb2.WatchJobRequest.SerializeToString,
            orchestrator_pb2.WatchJobResponse.FromString,
        )
        final = None
        async for msg in stub_get(
            orchestrator_pb2.WatchJobRequest(job_id=own.job.job_id), metadata=(("authorization", f"Bearer {ALICE}"),)
        ):
            final = msg.job
        assert final.state == common_pb2.JOB_STATE_SUCCEEDED


def _stored(mesh, key: str) -> bool:
    return os.path.isfile(os.path.join(mesh.env["AUDIOMESH_STORE_URL"].removeprefix("file://"), key))


async def test_upload_then_create_job_works_for_the_owner_only(keyed_mesh, tmp_path):
    """The two-step flow: UploadAudio without create_job (proto3 default false) stores the upload
    under its owner; CreateJob from it works for that key, is NOT_FOUND for another, and the
    upload goes with the last job that used it."""
    song = write_song(tmp_path / "two-step.wav", 1.5).read_bytes()
    alice, bob = (("authorization", f"Bearer {ALICE}"),), (("authorization", f"Bearer {BOB}"),)

    async def messages():
        yield orchestrator_pb2.UploadAudioRequest(metadata=orchestrator_pb2.UploadMetadata(filename="two-step.wav"))
        yield orchestrator_pb2.UploadAudioRequest(chunk=song)

    async with grpc.aio.insecure_channel(keyed_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        uploaded = await stub.UploadAudio(messages(), metadata=alice)
        assert not uploaded.HasField("job") and uploaded.size_bytes == len(song)
        assert uploaded.input_key.startswith("uploads/alice/") and uploaded.input_key.endswith("/two-step.wav")
        request = orchestrator_pb2.CreateJobRequest(input_key=uploaded.input_key)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateJob(request, metadata=bob)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and uploaded.input_key in err.value.details()
        job = (await stub.CreateJob(request, metadata=alice)).job
        assert job.owner == "alice" and job.input.key == uploaded.input_key and job.input.name == "two-step.wav"
        assert _stored(keyed_mesh, uploaded.input_key)
        await stub.DeleteJob(orchestrator_pb2.DeleteJobRequest(job_id=job.job_id), metadata=alice)
        assert not _stored(keyed_mesh, uploaded.input_key)


def test_web_page_asks_for_the_key_then_shows_the_callers_jobs(keyed_mesh, alice_job, browser):
    """The page on a keyed server: a readable error first; with Alice's key, her job."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{keyed_mesh.url}/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "alert").text.strip())
    assert "API key" in browser.find_element(By.ID, "alert").text
    browser.find_element(By.CSS_SELECTOR, "details.api-key summary").click()
    browser.find_element(By.ID, "api-key").send_keys(ALICE)
    browser.find_element(By.CSS_SELECTOR, "#api-key-form button").click()
    selector = f'#history [data-job-id="{alice_job["jobId"]}"]'
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, selector))
