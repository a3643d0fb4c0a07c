"""One job, one trace: spans from every service share the job's trace id; logs carry both ids."""

from __future__ import annotations

import asyncio
import json
import time

from tests.helpers.mesh import SUCCEEDED, upload, wait_for, write_song


async def test_job_spans_cross_services_and_logs_carry_ids(orchestrator, file_mesh, otlp_collector, tmp_path):
    collector, _ = otlp_collector
    song = write_song(tmp_path / "t.wav", 2.0)
    job = (await upload(orchestrator, song.read_bytes(), "t.wav")).job
    job, _ = await wait_for(orchestrator, job.job_id)
    assert job.state == SUCCEEDED

    # The orchestrator's job log lines carry the job id and the trace id of its "job" span.
    log = (file_mesh.log_dir / "orchestrator.log").read_text().splitlines()
    lines = [json.loads(x) for x in log if job.job_id in x]
    trace_ids = {x.get("trace_id") for x in lines if x.get("event") == "job succeeded"}
    assert len(trace_ids) == 1
    (trace_id,) = trace_ids
    worker_lines = [
        json.loads(x) for x in (file_mesh.log_dir / "separation.log").read_text().splitlines() if job.job_id in x
    ]
    assert worker_lines and all(x["trace_id"] == trace_id for x in worker_lines)

    # Spans reach the OTLP collector from the orchestrator and every worker, in one trace.
    want = {f"audiomesh-{s}" for s in ("orchestrator", "separation", "hpss", "composite", "normalize")}
    deadline = time.monotonic() + 20
    while collector.services_in_trace(trace_id) < want and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert collector.services_in_trace(trace_id) >= want


def test_gateway_continues_the_callers_trace(gateway_url, file_mesh, otlp_collector, tmp_path):
    """A W3C traceparent on an HTTP request: the gateway's span is its child, and the
    orchestrator's spans for the gRPC calls the gateway makes are in the same trace."""
    import secrets

    import httpx

    collector, _ = otlp_collector
    missing = "5b1c1d3e-0000-4000-8000-000000000000"
    cases = []  # (trace id, parent span id, gateway span name, orchestrator span name)
    with httpx.Client(base_url=gateway_url, timeout=60) as http:
        trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
        resp = http.get(f"/v1/jobs/{missing}", headers={"traceparent": f"00-{trace_id}-{parent}-01"})
        assert resp.status_code == 404
        cases.append((trace_id, parent, "HTTP GET /v1/jobs/{job_id}", "OrchestratorService/GetJob"))
        # The upload handler too (refused at once for its model: cheap, still one UploadAudio call).
        trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
        song = write_song(tmp_path / "t.wav", 0.5).read_bytes()
        resp = http.post(
            "/v1/jobs:upload",
            data={"model": "kazoo"},
            files={"file": ("t.wav", song)},
            headers={"traceparent": f"00-{trace_id}-{parent}-01"},
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
