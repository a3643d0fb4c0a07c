"""The DSP workers without torch: what the Dockerfile's ``worker-dsp`` image holds.

hpss, composite and normalize run as real ``audiomesh serve NAME`` processes in which importing
torch, torchaudio or demucs fails as it would where they are not installed (and with no ffmpeg
on PATH, as in that image); each answers a real request against a file store. The Dockerfile's
``worker-dsp`` target is read to check that it installs neither torch nor anything that needs it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc

from audiomesh.demo import synth_song
from audiomesh.v1 import (
    common_pb2,
    composite_pb2,
    composite_pb2_grpc,
    hpss_pb2,
    hpss_pb2_grpc,
    normalize_pb2,
    normalize_pb2_grpc,
)
from tests.helpers.mesh import BASE_ENV

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("torch", "torchaudio", "demucs")  # what worker-dsp lacks
DSP_WORKERS = ("hpss", "composite", "normalize")
FULL_NAMES = {
    "hpss": hpss_pb2.DESCRIPTOR.services_by_name["HpssService"].full_name,
    "composite": composite_pb2.DESCRIPTOR.services_by_name["CompositeService"].full_name,
    "normalize": normalize_pb2.DESCRIPTOR.services_by_name["NormalizeService"].full_name,
}
RATE = 44100
F32 = common_pb2.AUDIO_ENCODING_WAV_FLOAT32

# Run before anything else in the child: a finder first on sys.meta_path that refuses ABSENT,
# printing the importer's stack (the chain to fix) to stderr.
GUARD = f"""
import importlib.abc, sys, traceback

ABSENT = {ABSENT!r}
assert not [m for m in sys.modules if m.partition(".")[0] in ABSENT], "imported before the guard"


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in ABSENT:
            stack = "".join(traceback.format_stack(limit=25))
            print(f"refused import {{fullname}}\\n{{stack}}", file=sys.stderr, flush=True)
            raise ModuleNotFoundError(f"No module named {{fullname!r}}", name=fullname)
        return None


sys.meta_path.insert(0, Absent())
"""
SERVE = GUARD + "from audiomesh.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _env(store: Path, bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOMESH_")}
    return {
        **env,
        **BASE_ENV,
        "AUDIOMESH_STORE_URL": f"file://{store}",
        "AUDIOMESH_METRICS_PORT": "0",
        "AUDIOMESH_DRAIN_SECONDS": "5",
        "PATH": str(bin_dir),  # no ffmpeg, as in worker-dsp (the child is started by its full path)
    }


@dataclass
class SlimWorker:
    name: str
    proc: subprocess.Popen
    ready: Path
    log: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.info['port']}"

    def explain(self) -> str:
        return f"{self.name} (exit {self.proc.poll()}):\n" + "".join(self.log[-60:])


@dataclass
class Slim:
    store: Path
    workers: dict[str, SlimWorker]

    def put(self, key: str, y: np.ndarray) -> str:
        path = self.store / key
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, y.T, RATE, subtype="FLOAT")
        return key

    def get(self, key: str) -> np.ndarray:
        y, rate = sf.read(self.store / key, dtype="float32", always_2d=True)
        assert rate == RATE
        return y.T


@pytest.fixture(scope="module")
def slim(tmp_path_factory) -> Iterator[Slim]:
    """The three DSP workers, started together, SERVING; stopped with SIGTERM at the end, which
    each must survive with exit 0."""
    tmp = tmp_path_factory.mktemp("slim")
    store, bin_dir = tmp / "store", tmp / "bin"
    store.mkdir()
    bin_dir.mkdir()
    workers: dict[str, SlimWorker] = {}
    try:
        for name in DSP_WORKERS:
            ready = tmp / f"{name}.ready.json"
            proc = subprocess.Popen(
                [sys.executable, "-c", SERVE, "serve", name, "--port", "0", "--ready-file", str(ready)],
                env=_env(store, bin_dir),
                cwd=tmp,  # no project .env
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            workers[name] = worker = SlimWorker(name, proc, ready)
            threading.Thread(target=worker.read_log, daemon=True).start()
        deadline = time.monotonic() + 120
        for worker in workers.values():  # the ready file is written once health is SERVING
            while not worker.ready.exists():
                assert worker.proc.poll() is None, f"did not start without torch: {worker.explain()}"
                assert time.monotonic() < deadline, f"not SERVING within 120 s: {worker.explain()}"
                time.sleep(0.1)
            worker.info = json.loads(worker.ready.read_text())
        yield Slim(store, workers)
        for worker in workers.values():
            worker.proc.send_signal(signal.SIGTERM)
        for worker in workers.values():
            assert worker.proc.wait(timeout=60) == 0, f"unclean stop: {worker.explain()}"
    finally:
        for worker in workers.values():
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait(timeout=30)


@pytest.fixture
def channel(slim: Slim, request) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(slim.workers[request.param].address) as ch:
        yield ch


def _assert_untouched(slim: Slim) -> None:
    """No worker even tried to import what the image lacks (the log shows who did)."""
    for worker in slim.workers.values():
        assert not any(line.startswith("refused import") for line in worker.log), worker.explain()


def test_the_guard_refuses_what_worker_dsp_lacks(tmp_path):
    """The children's guard works: importing demucs (which imports torch) fails as if absent."""
    proc = subprocess.run(
        [sys.executable, "-c", GUARD + "import demucs.apply\n"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "ModuleNotFoundError: No module named 'demucs" in proc.stderr, proc.stderr
    assert "refused import demucs" in proc.stderr


@pytest.mark.parametrize("channel", DSP_WORKERS, indirect=True)
def test_a_dsp_worker_serves_without_torch(slim, channel, request):
    name = request.node.callspec.params["channel"]
    for service in ("", FULL_NAMES[name]):
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    metrics_port = slim.workers[name].info.get("metrics_port")
    if metrics_port:  # /metrics needs no torch either
        response = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert response.status_code == 200 and "# TYPE" in response.text
    _assert_untouched(slim)


@pytest.mark.parametrize("channel", ["hpss"], indirect=True)
def test_decompose_without_torch(slim, channel):
    """A real Decompose: harmonic + percussive sum back to the input (soft masks, margin 1)."""
    song = synth_song(2.0, RATE, 2)
    key = slim.put("slim/hpss/mix.wav", song)
    request = hpss_pb2.DecomposeRequest(
        input_key=key, harmonic_key="slim/hpss/harmonic.wav", percussive_key="slim/hpss/percussive.wav", encoding=F32
    )
    messages = list(hpss_pb2_grpc.HpssServiceStub(channel).Decompose(request, timeout=120))
    results = [m.result for m in messages if m.HasField("result")]
    assert len(results) == 1
    result = results[0]
    harmonic, percussive = slim.get(result.harmonic.key), slim.get(result.percussive.key)
    assert harmonic.shape == percussive.shape == song.shape
    assert np.allclose(harmonic + percussive, song, atol=1e-4)
    assert np.abs(harmonic - song).max() > 1e-2 and np.abs(percussive).max() > 1e-3  # a real split
    assert result.harmonic.audio.sample_rate == RATE and result.harmonic.loudness.integrated_lufs > -100
    _assert_untouched(slim)


@pytest.mark.parametrize("channel", ["composite"], indirect=True)
def test_composite_without_torch(slim, channel):
    a, b = 0.4 * synth_song(1.0, RATE, 2, seed=1), 0.4 * synth_song(1.0, RATE, 2, seed=2)
    keys = [slim.put("slim/composite/a.wav", a), slim.put("slim/composite/b.wav", b)]
    request = composite_pb2.CompositeRequest(
        composites=[composite_pb2.CompositeSpec(name="main", input_keys=keys, output_key="slim/composite/main.wav")],
        encoding=F32,
    )
    response = composite_pb2_grpc.CompositeServiceStub(channel).Composite(request, timeout=60)
    (track,) = response.tracks
    assert track.name == "main" and np.allclose(slim.get(track.key), a + b, atol=1e-6)
    _assert_untouched(slim)


@pytest.mark.parametrize("channel", ["normalize"], indirect=True)
def test_normalize_without_torch(slim, channel):
    """Peak mode to -6 dBFS: the written track is the input times the reported gain."""
    song = 0.1 * synth_song(1.0, RATE, 2, seed=3)
    key = slim.put("slim/normalize/mix.wav", song)
    request = normalize_pb2.NormalizeRequest(
        items=[normalize_pb2.NormalizeItem(name="mix", input_key=key, output_key="slim/normalize/mix.out.wav")],
        options=common_pb2.NormalizeOptions(mode=common_pb2.NORMALIZE_MODE_PEAK, target=-6.0),
        encoding=F32,
    )
    response = normalize_pb2_grpc.NormalizeServiceStub(channel).Normalize(request, timeout=60)
    (item,) = response.tracks
    out = slim.get(item.track.key)
    assert np.allclose(out, song * 10 ** (item.gain_db / 20), atol=1e-5)
    assert 20 * np.log10(np.abs(out).max()) == pytest.approx(-6.0, abs=0.05)
    _assert_untouched(slim)


# ---- the Dockerfile's worker-dsp target --------------------------------------------------------


def _stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Stage name → its instructions (heredoc bodies folded away, continuations joined)."""
    text = re.sub(r"<<'?EOF'?([^\n]*)\n.*?\nEOF\n", r"<<EOF\1\n", text, flags=re.S)
    text = text.replace("\\\n", " ")
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            current = []
            stages[rest.split()[-1] if " AS " in rest.upper() else rest] = current
        current.append((word.upper(), rest.strip()))
    return stages


def _chain(stages: dict[str, list[tuple[str, str]]], target: str) -> list[str]:
    """The stages ``target`` is built from: its FROM bases and COPY --from sources, recursively."""
    seen: list[str] = []
    todo = [target]
    while todo:
        name = todo.pop()
        if name in seen or name not in stages:
            continue
        seen.append(name)
        for word, rest in stages[name]:
            if word == "FROM":
                todo.append(rest.split()[0])
            elif word == "COPY" and (m := re.search(r"--from=(\S+)", rest)):
                todo.append(m.group(1))
    return seen


def _requirements_script(text: str) -> str:
    match = re.search(r"COPY [^\n]*<<'?EOF'? /usr/local/bin/audiomesh-requirements\n(.*?)\nEOF\n", text, re.S)
    assert match, "no audiomesh-requirements heredoc"
    return match.group(1) + "\n"


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def test_dockerfile_worker_dsp_installs_no_torch(tmp_path):
    text = (ROOT / "Dockerfile").read_text()
    stages = _stages(text)
    assert "worker-dsp" in stages and list(stages)[-1] == "runtime", "runtime stays the default (last) target"
    chain = _chain(stages, "worker-dsp")
    assert "build" not in chain and "build-dsp" in chain, chain
    instructions = [(word, rest) for name in chain for word, rest in stages[name]]
    assert not [rest for word, rest in instructions if word == "ARG" and "TORCH" in rest]
    runs = [rest for word, rest in instructions if word == "RUN"]
    assert not [
        run for run in runs if re.search(r"download\.pytorch\.org|TORCH_|torch==|pip install [^&]*\btorch", run)
    ]
    # Same user, entrypoint and healthcheck as the full image (they come from the shared base).
    assert [rest for word, rest in instructions if word == "USER"][-1] == "10001:10001"
    assert ("ENTRYPOINT", '["audiomesh"]') in instructions
    assert any(word == "HEALTHCHECK" and "audiomesh-healthcheck" in rest for word, rest in instructions)

    # What its `pip install -r` gets: the requirements script, run as the stage runs it.
    (call,) = [run for run in runs if "audiomesh-requirements" in run]
    words = shlex.split(call)
    args = words[: words.index(">")]
    assert args[:2] == ["audiomesh-requirements", "pyproject.toml"], call
    script = tmp_path / "audiomesh-requirements"
    script.write_text(_requirements_script(text))
    proc = subprocess.run(
        [sys.executable, str(script), str(ROOT / "pyproject.toml"), *args[2:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    installed = {_name(line) for line in proc.stdout.splitlines() if line.strip()}
    assert installed and not installed & set(ABSENT), installed
    # Nor anything that pulls torch in (pip would fetch it: PyPI's torch is a multi-GB CUDA build).
    for name in sorted(installed):
        needs = importlib.metadata.requires(name) or []
        assert not [r for r in needs if "extra ==" not in r and _name(r) in ABSENT], f"{name} requires {needs}"


def test_requirements_script_refuses_a_name_that_is_no_dependency(tmp_path):
    """A renamed torch must not slip back into worker-dsp: --without fails on unknown names."""
    script = tmp_path / "audiomesh-requirements"
    script.write_text(_requirements_script((ROOT / "Dockerfile").read_text()))
    proc = subprocess.run(
        [sys.executable, str(script), str(ROOT / "pyproject.toml"), "--without", "torch", "pytorch"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "pytorch" in proc.stderr, proc.stdout + proc.stderr


def test_separation_in_a_slim_install_says_it_needs_the_full_image(tmp_path):
    """Where torch is missing, `serve separation` ends with one line naming the image to use."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", SERVE, "serve", "separation", "--port", "0"],
        env=_env(tmp_path / "store", bin_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "full audiomesh image" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
