"""`audiomesh up` as a user runs it: a real process tree, stopped with Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
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
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from tests.helpers import browser as browser_helpers
from tests.helpers.mesh import BASE_ENV, SUCCEEDED, upload, wait_for, write_song

browser = browser_helpers.browser  # the headless Chromium fixture (tests/helpers/browser.py)


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
    ``audiomesh-mesh-*`` folder (nor scratch folder) left in the temp dir. Two separation
    processes (``--replicas``): `up` lists both and the target listing them."""
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
        "AUDIOMESH_METRICS_PORT": "0",  # free ports: the defaults (9450…) may be taken on a test machine
    }
    # Its own session, so a signal to the group is what a terminal's Ctrl-C sends.
    up = subprocess.Popen(
        [sys.executable, "-m", "audiomesh.cli", "up", "--replicas", "separation=2"],
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
            # `up` says where every process's metrics are, and they answer there.
            want = {*names, "separation-1", "separation-2"} - {"separation"}
            printed: dict[str, str] = {}
            deadline = time.monotonic() + 30  # `up` prints once every process is up, the gateway last
            while set(printed) != want and time.monotonic() < deadline:
                time.sleep(0.2)
                printed = dict(re.findall(r"^ {4}(\S+) +http://(\S+)/metrics$", b"".join(output).decode(), re.M))
            assert set(printed) == want, printed
            scraped = http.get(f"http://{printed['separation-2']}/metrics").text
            assert 'audiomesh_worker_slots{service="separation"}' in scraped, scraped[:2000]
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
                # being held for the orchestrator's whole drain (30 s) and cancelled. The stop as a
                # whole is not timed: the drain lets the running separation finish first, which
                # took the whole grace on a loaded machine.
                with pytest.raises(grpc.RpcError) as ended:
                    for _ in watch:
                        pass
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
                assert time.monotonic() - stopped_at < 15
                assert up.wait(timeout=90) == 0
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(timeout=30)
    reader.join(timeout=10)
    text = b"".join(output).decode("utf-8", "replace")
    assert "Traceback" not in text and "CancelledError" not in text, text[-5000:]
    # Every instance's address, and the one target the orchestrator uses for them.
    assert f"separation    ipv4:127.0.0.1:{ports['separation']},127.0.0.1:" in text, text[-5000:]
    assert f"separation-1    127.0.0.1:{ports['separation']}" in text and "separation-2    127.0.0.1:" in text
    assert list(tmp.glob("audiomesh-mesh-*")) == []
    assert list((tmp / "audiomesh-scratch").glob("*")) == []


# --- several processes per service (audiomesh up --replicas) -------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two orchestrators and two separation workers, each a process of its own, and the gateway.
    A short lease: a killed orchestrator's jobs are taken over within seconds."""
    tmp = tmp_path_factory.mktemp("cluster")
    mesh = Mesh(
        env={**BASE_ENV, "AUDIOMESH_STORE_URL": f"file://{tmp / 'data'}", "AUDIOMESH_LEASE_TTL_SECONDS": "5"},
        log_dir=tmp / "logs",
        replicas={"orchestrator": 2, "separation": 2},
        gateway=True,
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
    # Every call through the orchestrators' list (any replica answers for any job); the
    # separation calls go round-robin over the two separation processes.
    async with grpc.aio.insecure_channel(cluster.orchestrator, options=CHANNEL_OPTIONS) as channel:
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


# --- watches that outlive their orchestrator ---------------------------------------------------


async def _wait_running(target: str, name: str, *, timeout: float = 120.0) -> str:
    """The id of the newest job named ``name`` once it is RUNNING (mid-job: time to kill)."""
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = (await stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=20), timeout=10)).jobs
            for job in jobs:
                if job.input.name == name and job.state == common_pb2.JOB_STATE_RUNNING:
                    return job.job_id
            await asyncio.sleep(0.1)
    raise AssertionError(f"no RUNNING job named {name} within {timeout:.0f} s")


async def test_cli_watch_survives_its_orchestrator_being_killed_and_restarted(cluster, tmp_path):
    """`audiomesh process` watching through orchestrator-1 alone: kill -9 it mid-job, start it
    again; the CLI reconnects (its bar says so) and prints the finished job."""
    song = write_song(tmp_path / "resume.wav", 4.0)
    env = {**{k: v for k, v in cluster.env.items() if k.startswith("AUDIOMESH_")}}
    env["AUDIOMESH_ORCHESTRATOR_ADDR"] = cluster.addresses["orchestrator-1"]
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audiomesh.cli", "process", str(song), "--out", str(tmp_path / "out"),
        env={**os.environ, **env}, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        job_id = await _wait_running(cluster.orchestrator, "resume.wav")
        cluster.kill("orchestrator-1")
        await asyncio.sleep(1.0)  # the watch is down: the CLI retries, backing off
        await asyncio.to_thread(cluster.restart, "orchestrator-1")
        out, err = await asyncio.wait_for(cli.communicate(), 180)
    finally:
        if cli.returncode is None:
            cli.kill()
            await cli.wait()
    text = err.decode("utf-8", "replace")
    assert cli.returncode == 0, text[-3000:]
    assert f"job {job_id} done" in out.decode(), out
    assert "Reconnecting" in text and "Traceback" not in text, text[-3000:]
    assert len(list((tmp_path / "out" / "resume").glob("*.wav"))) == 9


def test_gateway_watch_streams_continue_across_orchestrator_restarts(cluster, tmp_path):
    """NDJSON and SSE watches through the gateway, with every orchestrator killed and restarted
    mid-job: both streams go on (the gateway reopens the watch upstream), each snapshot once,
    and end with the finished job; SSE also tells the page it is reconnecting."""
    song = write_song(tmp_path / "relay.wav", 4.0).read_bytes()
    with httpx.Client(base_url=cluster.url, timeout=60) as http:
        resp = http.post("/v1/jobs:upload", files={"file": ("relay.wav", song)})
        assert resp.status_code == 200, resp.text
        job_id = resp.json()["job"]["jobId"]
        lines: dict[str, list[str]] = {"ndjson": [], "sse": []}
        first = {name: threading.Event() for name in lines}

        def read(name: str, accept: str) -> None:
            with http.stream("GET", f"/v1/jobs/{job_id}:watch", headers={"accept": accept}) as stream:
                for line in stream.iter_lines():
                    if line:
                        lines[name].append(line)
                        first[name].set()

        readers = [
            threading.Thread(target=read, args=("ndjson", "application/x-ndjson"), daemon=True),
            threading.Thread(target=read, args=("sse", "text/event-stream"), daemon=True),
        ]
        for reader in readers:
            reader.start()
        assert all(event.wait(60) for event in first.values()), lines
        asyncio.run(_wait_running(cluster.orchestrator, "relay.wav"))
        for name in cluster.instances("orchestrator"):
            cluster.kill(name)
        time.sleep(1.0)
        for name in cluster.instances("orchestrator"):
            cluster.restart(name)
        for reader in readers:
            reader.join(timeout=180)
            assert not reader.is_alive(), lines
    results = [json.loads(line) for line in lines["ndjson"]]
    assert all("result" in r for r in results), results[-3:]
    assert results[-1]["result"]["job"]["state"] == "JOB_STATE_SUCCEEDED"
    assert all(a != b for a, b in itertools.pairwise(lines["ndjson"])), "a snapshot was repeated"
    assert "event: reconnecting" in lines["sse"], lines["sse"][:10]
    data = [json.loads(line.removeprefix("data: ")) for line in lines["sse"] if line.startswith("data: ")]
    assert data[-1]["result"]["job"]["state"] == "JOB_STATE_SUCCEEDED", data[-3:]


@pytest.mark.timeout(300)
def test_web_page_keeps_watching_through_orchestrator_and_gateway_restarts(cluster, browser, tmp_path):
    """The page follows a job while every orchestrator is killed (the gateway reopens the watch
    upstream and says so: "Reconnecting…") and then the gateway too (the page retries itself:
    "Connection lost"); once they are back it shows the finished job, with no error."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def until(seconds: float, condition, message: str) -> None:
        WebDriverWait(browser, seconds, poll_frequency=0.2).until(lambda d: condition(d), message)

    def text(selector: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, selector).get_attribute("textContent")

    song = write_song(tmp_path / "page.wav", 4.0)
    browser.get(cluster.url + "/")
    until(30, lambda d: d.execute_script("return document.body.dataset.ready") == "true", "page never got ready")
    browser.execute_script(
        """window.__notes = [];
        const note = document.getElementById("job-connection");
        new MutationObserver(() => window.__notes.push(note.textContent))
          .observe(note, {childList: true, characterData: true, subtree: true});"""
    )
    browser.find_element(By.CSS_SELECTOR, "#file-input").send_keys(str(song))
    # The page shows RUNNING: its watch stream is open (the kill must break it, not precede it).
    until(
        60,
        lambda d: d.find_element(By.CSS_SELECTOR, "#job-state").get_attribute("data-state") == "JOB_STATE_RUNNING",
        "the page never showed the job running",
    )
    for name in cluster.instances("orchestrator"):
        cluster.kill(name)
    until(30, lambda d: "Reconnecting…" in d.execute_script("return window.__notes"), "no reconnecting note")
    cluster.kill("gateway")
    until(30, lambda d: text("#job-connection").startswith("Connection lost"), "no connection-lost note")
    for name in cluster.instances("orchestrator"):
        cluster.restart(name)
    cluster.restart("gateway")
    until(
        180,
        lambda d: d.find_element(By.CSS_SELECTOR, "#job-state").get_attribute("data-state") == "JOB_STATE_SUCCEEDED",
        f"the page did not show the job finished; notes {browser.execute_script('return window.__notes')}",
    )
    assert text("#job-connection") == ""
    assert text("#alert") == ""


def test_a_taken_default_metrics_port_gives_way_to_a_free_one():
    """A second `up` on one machine: the services' default /metrics ports are held by the first;
    the launcher gives each such instance any free port instead of a service that cannot start."""
    import socket

    from audiomesh.launcher import Mesh

    held = socket.create_server(("127.0.0.1", 0))
    taken = held.getsockname()[1]
    (free,) = free_ports(1)
    mesh = Mesh(env=dict(BASE_ENV), metrics_ports={"hpss": taken, "composite": free})
    try:
        assert mesh._metrics_port("hpss") == 0  # any free one
        assert mesh._metrics_port("composite") == free  # its own, still free
        assert mesh._metrics_port("normalize") == 0  # none preferred
    finally:
        held.close()
        mesh.stop()
