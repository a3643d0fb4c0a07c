"""`audiomesh up` as a user runs it: a real process tree, stopped with Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest

from audiomesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.mesh import BASE_ENV, write_song


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_up_stops_cleanly_with_a_watch_open_and_leaves_no_run_folder(tmp_path):
    """Ctrl-C while a WatchJob stream is open: no traceback in the output, no
    ``audiomesh-mesh-*`` folder (nor scratch folder) left in the temp dir."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    names = ("orchestrator", "separation", "hpss", "composite", "normalize", "gateway")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    env = {
        **os.environ,
        **BASE_ENV,
        "AUDIOMESH_LOG_FORMAT": "console",
        "AUDIOMESH_STORE_URL": f"file://{tmp_path / 'data'}",
        "TMPDIR": str(tmp),
        **{f"AUDIOMESH_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in ports.items()},
    }
    # Its own session, so a signal to the group is what a terminal's Ctrl-C sends.
    up = subprocess.Popen(
        [sys.executable, "-m", "audiomesh.cli", "up"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.extend(up.stdout), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{ports['gateway']}"
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and up.poll() is None:
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            assert http.get("/health").status_code == 200, b"".join(output).decode()[-3000:]
            song = write_song(tmp_path / "long.wav", 30.0).read_bytes()
            resp = http.post("/v1/jobs:upload", files={"file": ("long.wav", song)})
            assert resp.status_code == 200, resp.text
            job_id = resp.json()["job"]["jobId"]
            # Two watchers: one through the gateway, one straight to the orchestrator (the CLI's way).
            with (
                http.stream("GET", f"/v1/jobs/{job_id}:watch") as stream,
                grpc.insecure_channel(f"127.0.0.1:{ports['orchestrator']}") as channel,
            ):
                next(stream.iter_lines())
                watch = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).WatchJob(
                    orchestrator_pb2.WatchJobRequest(job_id=job_id)
                )
                next(watch)
                stopped_at = time.monotonic()
                os.killpg(up.pid, signal.SIGINT)
                # The watch ends at once with UNAVAILABLE (watch again after a restart) instead of
                # holding the orchestrator's drain for its whole grace and being cancelled.
                with pytest.raises(grpc.RpcError) as ended:
                    for _ in watch:
                        pass
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
                assert up.wait(timeout=90) == 0
                assert time.monotonic() - stopped_at < 20
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(timeout=30)
    reader.join(timeout=10)
    text = b"".join(output).decode("utf-8", "replace")
    assert "Traceback" not in text and "CancelledError" not in text, text[-5000:]
    assert list(tmp.glob("audiomesh-mesh-*")) == []
    assert list((tmp / "audiomesh-scratch").glob("*")) == []
