"""Where metrics are served: a port of their own per process, what each service shows, settings
that turn it off or make it fail clearly. (What the values are after a job: test_metrics.py.)"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from audiomesh import metrics
from audiomesh.gateway.metrics import RequestMetrics
from tests.helpers.mesh import BASE_ENV


def _serve(tmp_path: Path, service: str, **env: str) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / f"{service}.ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "audiomesh.cli", "serve", service, "--port", "0", "--ready-file", str(ready)],
        env={**os.environ, **BASE_ENV, "AUDIOMESH_STORE_URL": f"file://{tmp_path / 'data'}", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return proc, ready


def _wait_ready(proc: subprocess.Popen, ready: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready.exists():
            return json.loads(ready.read_text())
        time.sleep(0.1)
    raise AssertionError(f"not ready (exit {proc.poll()})")


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.terminate()
    out, _ = proc.communicate(timeout=60)
    return out.decode("utf-8", "replace")


def test_a_worker_serves_its_metrics_and_not_the_orchestrators(tmp_path):
    proc, ready = _serve(tmp_path, "composite", AUDIOMESH_METRICS_PORT="0")
    try:
        info = _wait_ready(proc, ready)
        body = httpx.get(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=10).text
    finally:
        _stop(proc)
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert families["audiomesh_worker_slots"].samples[0].labels == {"service": "composite"}
    assert "process_resident_memory_bytes" in families  # the process collector: memory, CPU, fds
    assert not metrics.ORCHESTRATOR_ONLY & set(families), "a worker shows the orchestrator's job metrics"
    assert not [s for f in families.values() for s in f.samples if s.name.endswith("_created")]


def test_metrics_off_means_no_port(tmp_path):
    proc, ready = _serve(tmp_path, "composite", AUDIOMESH_METRICS_ENABLED="false")
    try:
        assert "metrics_port" not in _wait_ready(proc, ready)
    finally:
        out = _stop(proc)
    assert "/metrics" not in out


def test_a_taken_metrics_port_stops_the_service_with_a_message_naming_the_setting(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, ready = _serve(tmp_path, "composite", AUDIOMESH_METRICS_PORT=str(port))
        proc.wait(timeout=60)  # it exits on its own
        out = _stop(proc)
    assert proc.returncode != 0 and not ready.exists()
    assert f"127.0.0.1:{port}" in out and "AUDIOMESH_METRICS_PORT" in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.parametrize(
    ("configured", "expected"), [(-1, metrics.DEFAULT_METRICS_PORTS["hpss"]), (0, 0), (9100, 9100)]
)
def test_metrics_port_setting(configured, expected):
    assert metrics.metrics_port("hpss", configured) == expected


async def test_http_metrics_label_the_route_template_never_the_path():
    async def job(request):
        return PlainTextResponse(request.path_params["job_id"])

    app = Starlette(
        routes=[Route("/v1/jobs/{job_id:str}", job, methods=["GET"])], middleware=[Middleware(RequestMetrics)]
    )
    job_id = "0d2f3c1e-aaaa-4bbb-8ccc-123456789abc"

    def count(route: str, status: str) -> float:
        labels = {"http_request_method": "GET", "http_route": route, "http_response_status_code": status}
        return metrics.REGISTRY.get_sample_value("http_server_request_duration_seconds_count", labels) or 0.0

    before = count("/v1/jobs/{job_id}", "200"), count("unmatched", "404")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        assert (await client.get(f"/v1/jobs/{job_id}")).text == job_id
        assert (await client.get(f"/elsewhere/{job_id}")).status_code == 404
    assert (count("/v1/jobs/{job_id}", "200"), count("unmatched", "404")) == (before[0] + 1, before[1] + 1)
    exposed = metrics.REGISTRY.collect()
    assert not [s for f in exposed for s in f.samples if job_id in "".join(s.labels.values())]


def test_readme_lists_every_metric_and_only_real_ones():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Metrics", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    named = {re.sub(r"_total$", "", name) for cell in first_cells for name in re.findall(r"`([a-z_]+)", cell)}
    assert named == set(metrics.NAMES), named ^ set(metrics.NAMES)
