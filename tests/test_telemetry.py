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
