"""One job, one trace: the spans of every service share the job's trace id, and so does every
log line that names the job — through the gateway, a cancel and a retry, and a take-over by
another orchestrator after the holder is killed."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path

import grpc
import httpx

from audiomesh import telemetry
from audiomesh.launcher import Mesh
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.mesh import BASE_ENV, SUCCEEDED, wait_for, write_song
from tests.helpers.otlp import Collector

WORKERS = ("separation", "hpss", "composite", "normalize")
UPLOAD_RPC = "/audiomesh.v1.OrchestratorService/UploadAudio"


def _traceparent() -> tuple[str, str, str]:
    """A caller's W3C traceparent: (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _job_lines(log_dir: Path, job_id: str) -> dict[str, list[dict]]:
    """Every log line that names ``job_id``, by the instance that wrote it."""
    lines: dict[str, list[dict]] = {}
    for log in sorted(log_dir.glob("*.log")):
        found = [json.loads(line) for line in log.read_text().splitlines() if job_id in line]
        if found:
            lines[log.stem] = found
    return lines


def _off_trace(lines: dict[str, list[dict]], trace_id: str) -> list[tuple[str, str | None, str]]:
    return [
        (name, x.get("trace_id"), x["event"]) for name, xs in lines.items() for x in xs if x.get("trace_id") != trace_id
    ]


async def _spans_when(collector: Collector, trace_id: str, done, *, timeout: float = 20.0) -> list[dict[str, str]]:
    """The trace's spans once ``done(spans)`` holds (the services export every 200 ms), or at the timeout."""
    deadline = time.monotonic() + timeout
    while not done(spans := collector.spans_in_trace(trace_id)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return spans


def _named(spans: list[dict[str, str]], service: str, name: str) -> list[dict[str, str]]:
    return [s for s in spans if s["service"] == f"audiomesh-{service}" and s["name"] == name]


async def test_a_job_through_the_gateway_a_cancel_and_a_retry_is_one_trace(
    gateway_url, file_mesh, otlp_collector, tmp_path
):
    """Uploaded over HTTP with the caller's traceparent, cancelled and retried by calls in another
    trace: the gateway's span, the orchestrator's UploadAudio, both runs of the job and the spans
    of all four workers are in the caller's trace; every line naming the job carries its id."""
    collector, _ = otlp_collector
    header, trace_id, parent = _traceparent()
    other, other_trace, _ = _traceparent()
    song = write_song(tmp_path / "t.wav", 2.0).read_bytes()
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as http:
        resp = await http.post("/v1/jobs:upload", files={"file": ("t.wav", song)}, headers={"traceparent": header})
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["job"]["jobId"]
    assert resp.json()["job"]["traceParent"].split("-")[1] == trace_id  # recorded in the job (and its manifest)
    async with grpc.aio.insecure_channel(file_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        metadata = (("traceparent", other),)
        await stub.CancelJob(orchestrator_pb2.CancelJobRequest(job_id=job_id), metadata=metadata)
        job, _ = await wait_for(stub, job_id)
        assert job.state == common_pb2.JOB_STATE_CANCELLED
        await stub.RetryJob(orchestrator_pb2.RetryJobRequest(job_id=job_id), metadata=metadata)
        job, _ = await wait_for(stub, job_id)
    assert job.state == SUCCEEDED, job.error

    want = {f"audiomesh-{s}" for s in ("gateway", "orchestrator", *WORKERS)}
    spans = await _spans_when(
        collector,
        trace_id,
        lambda spans: {s["service"] for s in spans} >= want and len(_named(spans, "orchestrator", "job")) >= 2,
    )
    names = sorted((s["service"], s["name"]) for s in spans)
    assert {s["service"] for s in spans} >= want, names
    (http_span,) = _named(spans, "gateway", "HTTP POST /v1/jobs:upload")
    assert http_span["parent_span_id"] == parent  # the caller's child
    (upload_span,) = _named(spans, "orchestrator", UPLOAD_RPC)
    # Both runs (cancelled, retried) are children of the call that created the job, not of
    # the RetryJob call (another trace, where no run of the job appears).
    runs = _named(spans, "orchestrator", "job")
    assert len(runs) == 2 and {s["parent_span_id"] for s in runs} == {upload_span["span_id"]}, names
    assert not [s for s in collector.spans_in_trace(other_trace) if s["name"] == "job"]

    lines = _job_lines(file_mesh.log_dir, job_id)
    assert set(lines) >= {"gateway", "orchestrator", *WORKERS}, sorted(lines)
    assert not _off_trace(lines, trace_id)
    # The retry was asked for in another trace: its line about the job says which.
    retried = [x for x in lines["orchestrator"] if x["event"].startswith("job retried")]
    assert retried and all(x["request_trace_id"] == other_trace for x in retried)


async def test_a_job_taken_over_after_its_orchestrator_is_killed_stays_in_its_trace(otlp_collector, tmp_path):
    """Two orchestrators; the one running the job is killed (-9) mid-separation. The other takes
    the job over from its manifest: its run of the job is the child of the creating call, and
    its log lines about the job (and the workers') carry the same trace id."""
    collector, endpoint = otlp_collector
    env = {
        **BASE_ENV,
        "AUDIOMESH_STORE_URL": f"file://{tmp_path / 'data'}",
        "AUDIOMESH_LEASE_TTL_SECONDS": "3",  # taken over ~3 s after the kill
        "AUDIOMESH_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    header, trace_id, _ = _traceparent()
    song = write_song(tmp_path / "t.wav", 4.0).read_bytes()

    async def messages():
        yield orchestrator_pb2.UploadAudioRequest(
            metadata=orchestrator_pb2.UploadMetadata(filename="t.wav", create_job=True)
        )
        yield orchestrator_pb2.UploadAudioRequest(chunk=song)

    with Mesh(env=env, log_dir=tmp_path / "logs", replicas={"orchestrator": 2}) as mesh:
        async with grpc.aio.insecure_channel(mesh.addresses["orchestrator-1"]) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            job_id = (await stub.UploadAudio(messages(), metadata=(("traceparent", header),))).job.job_id
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                job = (await stub.GetJob(orchestrator_pb2.GetJobRequest(job_id=job_id))).job
                if any(n.stage == "separation" and n.state == common_pb2.NODE_STATE_RUNNING for n in job.nodes):
                    break
                await asyncio.sleep(0.05)
            assert job.state == common_pb2.JOB_STATE_RUNNING, job
        # The creating call's span has left orchestrator-1 (killed, it exports nothing more).
        spans = await _spans_when(collector, trace_id, lambda spans: _named(spans, "orchestrator", UPLOAD_RPC))
        (upload_span,) = _named(spans, "orchestrator", UPLOAD_RPC)
        mesh.kill("orchestrator-1")
        async with grpc.aio.insecure_channel(mesh.addresses["orchestrator-2"]) as channel:
            job, _ = await wait_for(orchestrator_pb2_grpc.OrchestratorServiceStub(channel), job_id, timeout=120)
        assert job.state == SUCCEEDED, job.error

        # Only orchestrator-2 can have ended a run of the job (orchestrator-1 died inside its span).
        spans = await _spans_when(
            collector,
            trace_id,
            lambda spans: (
                _named(spans, "orchestrator", "job")
                and _named(spans, "normalize", "/audiomesh.v1.NormalizeService/Normalize")
            ),
        )
        names = sorted((s["service"], s["name"]) for s in spans)
        runs = _named(spans, "orchestrator", "job")
        assert runs and {s["parent_span_id"] for s in runs} == {upload_span["span_id"]}, names
        assert {s["service"] for s in spans} >= {f"audiomesh-{s}" for s in WORKERS}, names
        lines = _job_lines(mesh.log_dir, job_id)
        assert any(x["event"] == "job taken over" for x in lines["orchestrator-2"]), lines["orchestrator-2"]
        assert set(lines) >= {"orchestrator-1", "orchestrator-2", *WORKERS}, sorted(lines)
        assert not _off_trace(lines, trace_id)


def test_a_line_about_a_job_carries_the_jobs_trace_id_whatever_span_is_current():
    """The log processor, in-process: a job whose trace is known (read from its manifest) tags the
    lines naming it with that trace, outside any span or inside another trace's (kept as the
    request's); a traceparent that names no trace teaches nothing."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    job_id, other_job = "0d8a2f7e-0000-4000-8000-000000000001", "0d8a2f7e-0000-4000-8000-000000000002"
    header, trace_id, _ = _traceparent()
    telemetry.remember_job_trace(job_id, header)
    telemetry.remember_job_trace(other_job, "00-not-a-traceparent-01")

    def ids(**event):
        return dict(telemetry._add_trace_ids(None, "info", {"event": "x", **event}))

    assert ids(job_id=job_id)["trace_id"] == trace_id
    assert "trace_id" not in ids(job_id=other_job) and "trace_id" not in ids()
    with trace.use_span(TracerProvider().get_tracer("t").start_span("request"), end_on_exit=True) as span:
        request_trace = format(span.get_span_context().trace_id, "032x")
        inside = ids(job_id=job_id)
        assert (inside["trace_id"], inside["request_trace_id"]) == (trace_id, request_trace)
        assert "span_id" not in inside  # the current span is not in the job's trace
        assert ids()["trace_id"] == request_trace  # a line about no job: the current span's


def test_gateway_continues_the_callers_trace(gateway_url, file_mesh, otlp_collector, tmp_path):
    """A W3C traceparent on an HTTP request: the gateway's span is its child, and the
    orchestrator's spans for the gRPC calls the gateway makes are in the same trace."""
    collector, _ = otlp_collector
    missing = "5b1c1d3e-0000-4000-8000-000000000000"
    cases = []  # (trace id, parent span id, gateway span name, orchestrator span name)
    with httpx.Client(base_url=gateway_url, timeout=60) as http:
        header, trace_id, parent = _traceparent()
        resp = http.get(f"/v1/jobs/{missing}", headers={"traceparent": header})
        assert resp.status_code == 404
        cases.append((trace_id, parent, "HTTP GET /v1/jobs/{job_id}", "OrchestratorService/GetJob"))
        # The upload handler too (refused at once for its model: cheap, still one UploadAudio call).
        header, trace_id, parent = _traceparent()
        song = write_song(tmp_path / "t.wav", 0.5).read_bytes()
        resp = http.post(
            "/v1/jobs:upload",
            data={"model": "kazoo"},
            files={"file": ("t.wav", song)},
            headers={"traceparent": header},
        )
        assert resp.status_code == 404
        cases.append((trace_id, parent, "HTTP POST /v1/jobs:upload", "OrchestratorService/UploadAudio"))

    for trace_id, parent, gateway_span, rpc in cases:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            spans = collector.spans_in_trace(trace_id)
            if any(s["service"] == "audiomesh-orchestrator" and rpc in s["name"] for s in spans) and any(
                s["name"] == gateway_span for s in spans
            ):
                break
            time.sleep(0.2)
        spans = collector.spans_in_trace(trace_id)
        names = [(s["service"], s["name"]) for s in spans]
        servers = [s for s in spans if s["service"] == "audiomesh-gateway" and s["name"] == gateway_span]
        assert servers, names
        assert {s["parent_span_id"] for s in servers} == {parent}  # the caller's child, not a new root
        assert any(s["service"] == "audiomesh-orchestrator" and rpc in s["name"] for s in spans), names


async def test_every_request_has_a_gateway_span_and_its_access_line_carries_it(gateway_url, file_mesh, otlp_collector):
    """No traceparent from the caller: the gateway starts the trace itself, names the span by the
    route template (never the path), and its access log line carries that trace id."""
    collector, _ = otlp_collector
    request_id = secrets.token_hex(8)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as http:
        missing = "5b1c1d3e-0000-4000-8000-00000000abcd"
        resp = await http.get(f"/v1/jobs/{missing}", headers={"x-request-id": request_id})
    assert resp.status_code == 404
    deadline = time.monotonic() + 10
    access: list[dict] = []
    while not access and time.monotonic() < deadline:
        log = (file_mesh.log_dir / "gateway.log").read_text().splitlines()
        access = [json.loads(x) for x in log if request_id in x and '"event": "http"' in x]
        await asyncio.sleep(0.1)
    assert len(access) == 1, access
    trace_id = access[0].get("trace_id")
    assert trace_id, access[0]
    # Each service exports on its own schedule: wait for the orchestrator's span too, not just any two
    # (the gateway's server and client spans came first once, and the check ran without the third).
    spans = await _spans_when(
        collector,
        trace_id,
        lambda s: (
            _named(s, "gateway", "HTTP GET /v1/jobs/{job_id}")
            and any(x["service"] == "audiomesh-orchestrator" and "GetJob" in x["name"] for x in s)
        ),
    )
    assert _named(spans, "gateway", "HTTP GET /v1/jobs/{job_id}"), spans
    assert any(s["service"] == "audiomesh-orchestrator" and "GetJob" in s["name"] for s in spans), spans
