"""CORS from configuration, and one structured access-log line per request."""

from __future__ import annotations

import json
import time

import httpx

from audiomesh.config import load_settings
from audiomesh.gateway.app import create_app


async def test_cors_allows_configured_origins_only(tmp_path):
    settings = load_settings(store_url=f"file://{tmp_path}", cors_origins="https://app.example")
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        ok = await http.options(
            "/v1/jobs",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
        )
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        denied = await http.options(
            "/v1/jobs",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in denied.headers
    app = create_app(load_settings(store_url=f"file://{tmp_path}"))  # no origins configured: no CORS
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        resp = await http.get("/openapi.json", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in resp.headers


def test_access_log_line_per_request(gateway_url, file_mesh):
    with httpx.Client(base_url=gateway_url) as http:
        http.get("/v1/jobs/5b1c1d3e-0000-4000-8000-000000000000", headers={"X-Request-ID": "log-check-42"})
    # The line is written once the response has been sent, so the client can be faster than
    # the log (seen on a loaded machine): wait for it, boundedly.
    deadline = time.monotonic() + 10
    while True:
        text = (file_mesh.log_dir / "gateway.log").read_text()
        lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
        mine = [x for x in lines if x.get("request_id") == "log-check-42"]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(mine) == 1
    line = mine[0]
    assert line["event"] == "http" and line["status"] == 404 and line["method"] == "GET"
    assert line["path"].startswith("/v1/jobs/") and line["duration_ms"] >= 0
