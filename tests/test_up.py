"""`audiomesh up` as a user runs it: a real process tree, stopped with Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from audiomesh.cli import build_parser
from audiomesh.config import load_settings
from audiomesh.errors import ConfigError
from audiomesh.launcher import Mesh
from audiomesh.rpc.client import CHANNEL_OPTIONS
from audiomesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers.mesh import BASE_ENV, SUCCEEDED, upload, wait_for, write_song


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


# --- several processes per service (audiomesh up --replicas) -------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two orchestrators and two separation workers, each a process of its own."""
    tmp = tmp_path_factory.mktemp("cluster")
    mesh = Mesh(
        env={**BASE_ENV, "AUDIOMESH_STORE_URL": f"file://{tmp / 'data'}"},
        log_dir=tmp / "logs",
        replicas={"orchestrator": 2, "separation": 2},
    )
    mesh.start(timeout=240)
    try:
        yield mesh
    finally:
        mesh.stop()


def _rpc_methods(log: Path) -> list[str]:
    methods = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("event") == "rpc":
                methods.append(entry["method"].rsplit("/", 1)[-1])
    return methods


def test_replicas_get_their_own_names_ports_logs_and_one_round_robin_target(cluster):
    assert cluster.instances("orchestrator") == ["orchestrator-1", "orchestrator-2"]
    assert cluster.instances("separation") == ["separation-1", "separation-2"]
    assert cluster.instances("hpss") == ["hpss"]
    own = [cluster.addresses[name] for name in ("orchestrator-1", "orchestrator-2", "separation-1", "separation-2")]
    assert len(set(own)) == 4
    assert cluster.orchestrator == "ipv4:" + ",".join(own[:2])
    assert cluster.addresses["separation"] == "ipv4:" + ",".join(own[2:])
    # The orchestrators reach the workers through the list, and have identities of their own.
    for i, name in enumerate(("orchestrator-1", "orchestrator-2"), start=1):
        env = cluster.envs[name]
        assert env["AUDIOMESH_SEPARATION_ADDR"] == cluster.addresses["separation"]
        assert env["AUDIOMESH_REPLICA_ID"] == f"orchestrator-{i}"
    for name in cluster.procs:
        assert (cluster.log_dir / f"{name}.log").stat().st_size > 0, name
    with pytest.raises(KeyError, match="orchestrator-1, orchestrator-2"):
        cluster.kill("orchestrator")  # ambiguous: which one?
    with pytest.raises(ConfigError, match="gateway runs once"):
        Mesh(replicas={"gateway": 2})


async def test_jobs_spread_over_separation_replicas_and_an_orchestrator_can_die(cluster, tmp_path):
    song = write_song(tmp_path / "song.wav", 2.0).read_bytes()
    # Jobs go to one orchestrator (today a job lives in the replica that took it); its
    # separation calls go round-robin over the two separation processes.
    async with grpc.aio.insecure_channel(cluster.addresses["orchestrator-1"]) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        created = [await upload(stub, song, f"song{i}.wav") for i in range(4)]
        finished = await asyncio.gather(*(wait_for(stub, r.job.job_id, timeout=180) for r in created))
    assert [job.state for job, _ in finished] == [SUCCEEDED] * 4, [job.error for job, _ in finished]
    calls = {
        name: _rpc_methods(cluster.log_dir / f"{name}.log").count("Separate")
        for name in cluster.instances("separation")
    }
    assert sum(calls.values()) >= 4 and all(calls.values()), calls

    # Through the list: both orchestrators answer; with one killed, the other answers alone.
    async with grpc.aio.insecure_channel(cluster.orchestrator, options=CHANNEL_OPTIONS) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        for _ in range(4):
            await stub.GetConfig(orchestrator_pb2.GetConfigRequest(), timeout=10)
        before = cluster.pid("orchestrator-2")
        cluster.kill("orchestrator-2")
        for _ in range(6):
            await stub.GetConfig(orchestrator_pb2.GetConfigRequest(), timeout=10)
        cluster.restart("orchestrator-2")
        assert cluster.pid("orchestrator-2") != before
    async with grpc.aio.insecure_channel(cluster.addresses["orchestrator-2"]) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        await stub.GetConfig(orchestrator_pb2.GetConfigRequest(), timeout=10)  # back on its port


def test_pause_and_terminate_one_instance(cluster):
    """SIGSTOP holds an instance without answering; SIGCONT brings it back; SIGTERM drains it."""
    target = cluster.addresses["orchestrator-2"]
    cluster.pause("orchestrator-2")
    try:
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as stuck:
            orchestrator_pb2_grpc.OrchestratorServiceStub(channel).GetConfig(
                orchestrator_pb2.GetConfigRequest(), timeout=1.0
            )
        assert stuck.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        cluster.resume("orchestrator-2")
    with grpc.insecure_channel(target) as channel:
        orchestrator_pb2_grpc.OrchestratorServiceStub(channel).GetConfig(
            orchestrator_pb2.GetConfigRequest(), timeout=10
        )
    assert cluster.terminate("orchestrator-2") == 0
    cluster.restart("orchestrator-2")


def test_grpc_targets_are_checked_at_start():
    ok = ["127.0.0.1:1", "dns:///separation:50052", "ipv4:127.0.0.1:1,127.0.0.1:2", "ipv6:[::1]:1,[::1]:2"]
    for value in ok:
        assert load_settings(separation_addr=value).separation_addr == value
    for value, why in [
        ("ipv4:localhost:1", "is not an ipv4 address"),
        ("ipv4:127.0.0.1", "is not an ipv4 address"),
        ("a:1,b:2", "not a gRPC target"),
        ("dns:///separation", "not a gRPC target"),
    ]:
        with pytest.raises(ConfigError, match=f"AUDIOMESH_SEPARATION_ADDR.*{why}"):
            load_settings(environ={"AUDIOMESH_SEPARATION_ADDR": value})


def test_up_replicas_flag_is_parsed_and_checked(capsys):
    args = build_parser().parse_args(["up", "--replicas", "orchestrator=3", "--replicas", "separation=2"])
    assert dict(args.replicas) == {"orchestrator": 3, "separation": 2}
    for bad in ("gateway=2", "separation=0", "separation"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["up", "--replicas", bad])
        assert "SERVICE=N" in capsys.readouterr().err
