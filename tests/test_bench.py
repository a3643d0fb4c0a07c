"""`audiomesh bench`: one short real run (every step, every key), and its pure helpers.

Figures are reported, never asserted against targets: only that each one exists and is sane.
The run uses ``--model tiny`` (the HTDemucs architecture, shrunk): every step is the same code
as with the released configuration, but tracing full HTDemucs for the compiled steps took
~100 s per compile on a 2-core AVX2 machine (two compiles: most of the suite's time). That the
released configuration itself builds is checked on its own below. The song is 4 s, two of the
tiny model's 4 s chunks, so the split run (``--separation-workers 2 --pin``) really cuts it in two; the warm-up jobs are
left out (``--no-warmup-job``) to pay for that third mesh.

The RoFormer run uses ``--model tiny_roformer`` (Kimberley Jensen's Mel-Band RoFormer shrunk):
raw is MSST's own ``demix`` on MSST's own network, the job the mesh's; that the released
RoFormer configurations build, at their parameter counts, as files MSST loads, is checked
without a forward.
"""

from __future__ import annotations

import argparse
import ctypes.util
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from audiomesh.bench import KEYS, add_arguments, check_model, cmd_bench, critical_path, format_table, read_peak_rss_mb

SERVICES = {"orchestrator", "separation", "hpss", "composite", "normalize"}
PIN = len(os.sched_getaffinity(0)) >= 2  # --pin needs a core per separation worker


@pytest.mark.timeout(420)
def test_bench_runs_end_to_end_and_reports_every_key(tmp_path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = ["bench", "--duration", "4", "--model", "tiny", "--json", str(out), "--timeout", "400"]
    command += ["--compile-backend", "aot_eager", "--no-warmup-job", "--separation-workers", "2"]
    command += ["--pin"] if PIN else []
    proc = subprocess.run(
        [sys.executable, "-m", "audiomesh.cli", *command],
        capture_output=True,
        text=True,
        timeout=415,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(KEYS) <= set(report)
    assert report["errors"] == []
    assert "e2e / raw" in proc.stdout and "hpss speedup" in proc.stdout  # the table

    assert report["duration_s"] == 4.0
    assert report["model"]["name"] == "bench_tiny_htdemucs" and report["model"]["parameters_m"] > 0
    for key in ("raw_separation_s", "e2e_s", "hpss_reference_s", "hpss_s", "critical_path_s", "mesh_start_s"):
        assert report[key] > 0, key
    assert report["e2e_over_raw"] == pytest.approx(report["e2e_s"] / report["raw_separation_s"], rel=1e-3)
    assert report["hpss_speedup"] > 0
    assert report["hpss_max_abs_diff"] <= 1e-5  # equality with librosa is the one thing checked
    assert report["hpss_signal_s"] == 4.0
    # The job's nodes, the longest chain through them, and what the mesh added on top.
    assert {"decode", "separation", "hpss:mix", "composite", "normalize"} <= set(report["stage_s"])
    assert report["critical_path"][0] == "decode" and report["critical_path"][-1] == "normalize"
    assert report["critical_path_s"] <= report["e2e_s"]
    assert report["overhead_s"] == pytest.approx(report["e2e_s"] - report["critical_path_s"], abs=2e-3)
    # Peak RSS of the raw run and of every service.
    assert set(report["service_peak_rss_mb"]) == SERVICES
    assert all(mb > 50 for mb in report["service_peak_rss_mb"].values())
    assert report["separation_peak_rss_mb"] == report["service_peak_rss_mb"]["separation"]
    assert report["raw_separation_peak_rss_mb"] > 100
    # The launcher's thread budget, as the services actually got it.
    assert report["thread_budget"]["hpss"]["AUDIOMESH_HPSS_THREADS"] == "1"
    # The allocator the launcher preloaded, as the worker itself reports it: jemalloc where the
    # system has it (.ci/run installs it), else mimalloc from the cmeel-mimalloc wheel.
    expected = "jemalloc" if ctypes.util.find_library("jemalloc") else "mimalloc"
    assert expected in report["thread_budget"]["separation"]["LD_PRELOAD"]
    assert report["separation_allocator"] == expected
    assert "LD_PRELOAD" not in report["thread_budget"]["hpss"]
    # The compiled model (aot_eager here: no Inductor compile in CI): same stems, in the same run.
    assert report["compile_backend"] == "aot_eager"
    for key in ("separation_compiled_s", "compile_cold_s", "compile_warm_s", "e2e_compiled_s"):
        assert report[key] > 0, key
    assert report["compiled_max_abs_diff"] <= 1e-5
    assert report["machine"]["compiled_calls"] > 0  # its chunks really ran the compiled graphs
    assert report["e2e_over_raw_compiled"] == pytest.approx(
        report["e2e_compiled_s"] / report["raw_separation_s"], rel=1e-3
    )
    assert "separation" in report["stage_compiled_s"] and "compiled apply_model" in proc.stdout
    # The split run: two separation workers (each on its own cores, with that many torch threads),
    # two parts and a stitch, the same stems as raw apply_model with the job's shift seed.
    assert report["separation_workers"] == 2 and report["split_pinned"] is PIN
    assert report["split_parts"] == 2
    assert {"separation:part1of2", "separation:part2of2", "stitch"} <= set(report["split_stage_s"])
    assert "separation" not in report["split_stage_s"]
    assert 0 < report["split_stitch_s"] < report["split_separation_wall_s"] < report["split_e2e_s"]
    assert 0 < report["separation_wall_s"] == report["stage_s"]["separation"]
    assert report["split_over_single"] == pytest.approx(report["split_e2e_s"] / report["e2e_s"], rel=1e-3)
    assert report["split_max_abs_diff"] <= 1e-5 and report["split_seed"] > 0
    workers = ["separation-1", "separation-2"]
    assert list(report["split_worker_peak_rss_mb"]) == workers
    assert all(mb > 50 for mb in report["split_worker_peak_rss_mb"].values())
    assert report["split_worker_allocator"] == dict.fromkeys(workers, expected)
    cpus = report["split_worker_cpus"]
    if PIN:
        assert sorted(cpus["separation-1"] + cpus["separation-2"]) == sorted(os.sched_getaffinity(0))
        for worker in workers:
            assert report["split_thread_budget"][worker]["AUDIOMESH_TORCH_THREADS"] == str(len(cpus[worker]))
    assert "split / single e2e" in proc.stdout
    machine = report["machine"]
    assert machine["usable_cpus"] >= 1 and machine["torch_threads"] >= 1
    assert machine["versions"]["torch"] and machine["versions"]["demucs"]


def test_bench_builds_the_released_htdemucs_configuration(tmp_path) -> None:
    """`--model htdemucs` (the default, what BENCHMARKS.md measures): the released shape, saved
    into a local repo that demucs' own get_model loads."""
    from demucs.pretrained import get_model

    from audiomesh.bench import _prepare_model

    repo, name, params = _prepare_model("htdemucs", tmp_path)
    assert name == "bench_htdemucs" and params > 40e6  # htdemucs has 41.98 M parameters
    model = get_model(name, repo=repo)
    assert sum(p.numel() for p in model.parameters()) == params and model.segment == pytest.approx(7.8)


def _bench(tmp_path, *args: str, timeout: int) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "audiomesh.cli", "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.timeout(300)
def test_bench_runs_a_roformer_end_to_end_against_msst(tmp_path) -> None:
    """`--model tiny_roformer`: the job's stems equal MSST's demix on the same weights and the
    same decoded mix; every key present, the Demucs-only ones null."""
    args = ["--model", "tiny_roformer", "--duration", "4", "--skip", "hpss", "--no-warmup-job", "--timeout", "280"]
    proc, report = _bench(tmp_path, *args, timeout=295)
    assert set(KEYS) <= set(report)
    assert report["errors"] == []
    model = report["model"]
    assert model["name"] == "bench_tiny_roformer" and model["network"] == "mel_band_roformer"
    assert model["chunk_size"] == 44100 and model["num_overlap"] == 2 and model["batch_size"] == 4
    assert model["sources"] == ["vocals", "other"] and 1 < model["parameters_m"] < 3
    expected = "msst.demix" if importlib.util.find_spec("msst") else "RoformerModel.separate"
    assert report["raw_reference"] == expected
    # MSST's geometry: a 4 s song reflect-padded by 0.5 s at both ends, 1 s chunks every 0.5 s.
    assert report["raw_chunks"] == 10
    assert report["raw_chunk_s"] == pytest.approx(report["raw_separation_s"] / 10, rel=1e-2)
    assert report["raw_separation_s"] > 0 and report["raw_separation_peak_rss_mb"] > 100
    assert report["e2e_s"] > 0
    assert report["e2e_over_raw"] == pytest.approx(report["e2e_s"] / report["raw_separation_s"], rel=1e-3)
    # batch_size 4: MSST's batched forward rounds differently from the worker's chunk-by-chunk one.
    assert report["e2e_max_abs_diff"] <= 1e-5
    assert {"decode", "separation", "normalize"} <= set(report["stage_s"])
    assert report["separation_peak_rss_mb"] > 50
    for key in ("compile_backend", "separation_compiled_s", "split_e2e_s", "split_max_abs_diff", "hpss_s"):
        assert report[key] is None, key
    assert report["separation_workers"] == 1 and model["shifts"] is None
    assert f"raw {expected}" in proc.stdout and "e2e max abs diff vs raw" in proc.stdout
    assert re.search(r"raw chunks, per chunk +10, ", proc.stdout)


@pytest.mark.parametrize(
    ("kind", "constant", "params"),
    [("bs_roformer", "BS_ROFORMER_EP317", 159_848_380), ("mel_roformer", "MEL_ROFORMER_KJ", 228_202_852)],
)
def test_bench_writes_the_released_roformers_as_msst_loads_them(tmp_path, kind, constant, params) -> None:
    """`--model bs_roformer` / `mel_roformer`: the released configuration, at its parameter count,
    written as NAME.yaml + NAME.ckpt that the model repo lists and whose keys and shapes are those
    of MSST's own network (built on the meta device: no weights, no forward)."""
    import torch
    import yaml

    from audiomesh.bench import _prepare_model
    from audiomesh.separation import roformer_model
    from audiomesh.separation.repo import scan_repo

    repo, name, count = _prepare_model(kind, tmp_path)
    assert (repo, name, count) == (tmp_path, f"bench_{kind}", params)
    entry = scan_repo(tmp_path)[name]
    assert entry.kind == "roformer" and entry.checkpoint == tmp_path / f"{name}.ckpt"
    text = entry.path.read_text()
    assert "!!python/tuple" in text  # as the community's files
    released = roformer_model.config_from_mapping(getattr(roformer_model, constant))
    assert roformer_model.load_config(entry.path) == dataclasses.replace(released, origin=str(entry.path))
    msst = pytest.importorskip("msst.models.bs_roformer")
    with entry.path.open() as fh:
        msst_model = yaml.load(fh, Loader=yaml.FullLoader)["model"]  # as MSST reads it
    klass = msst.BSRoformer if kind == "bs_roformer" else msst.MelBandRoformer
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in klass(**msst_model).state_dict().items()}
    saved = torch.load(entry.checkpoint, map_location="cpu", weights_only=True, mmap=True)
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected
    assert all(v.dtype == torch.float32 and v.abs().sum() > 0 for k, v in saved.items() if "weight" in k)


def test_bench_refuses_what_a_roformer_does_not_do(capsys) -> None:
    """RoFormer jobs run one pass, eager, unsplit: refused before any work, with the reason."""
    assert check_model("tiny_roformer", 1, 1, None) is None
    assert check_model("htdemucs", 2, 2, "inductor") is None
    assert "not split" in check_model("bs_roformer", 1, 2, None)
    assert "eager" in check_model("mel_roformer", 1, 1, "inductor")
    assert "Demucs option" in check_model("tiny_roformer", 2, 1, None)
    assert "must be one of" in check_model("nope", 1, 1, None)
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", "tiny_roformer", "--separation-workers", "2"]
    )
    assert cmd_bench(args) == 2
    assert "does not split a RoFormer job" in capsys.readouterr().err


def test_roformer_reference_falls_back_without_msst(tmp_path, monkeypatch) -> None:
    """Where msst cannot be imported, raw is RoformerModel.separate on the whole song, said so in the
    result; it gives MSST's stems (compared with msst's demix here, computed before msst is hidden)."""
    pytest.importorskip("msst")
    from audiomesh.bench import _child_raw_roformer, _prepare_model
    from tests.helpers.roformer import msst_reference, msst_separate

    repo, name, _ = _prepare_model("tiny_roformer", tmp_path / "models")
    rng = np.random.default_rng(0)
    mix = (0.1 * rng.standard_normal((2, 3 * 44100))).astype(np.float32)
    np.save(tmp_path / "mix.npy", mix)
    config, network = msst_reference(repo / f"{name}.yaml", repo / f"{name}.ckpt", "mel_band_roformer")
    vocals = msst_separate(config, network, mix, "mel_band_roformer")["vocals"]
    np.savez(tmp_path / "msst.npz", vocals=vocals, other=mix - vocals)
    monkeypatch.setitem(sys.modules, "msst.utils.model_utils", None)  # `import` raises ImportError
    spec = {"song": str(tmp_path / "mix.npy"), "repo": str(repo), "name": name, "compare": str(tmp_path / "msst.npz")}
    result = _child_raw_roformer(spec)
    assert result["reference"] == "RoformerModel.separate" and "msst cannot be imported" in result["reference_problem"]
    assert result["chunks"] == 8  # 3 s + 2 x 0.5 s of reflect border, a chunk every 0.5 s
    assert result["seconds"] > 0 and result["max_abs_diff"] <= 1e-6


def test_critical_path_follows_the_longest_chain() -> None:
    nodes = {
        "decode": (0.5, []),
        "separation": (40.0, ["decode"]),
        "hpss:mix": (3.0, ["decode"]),
        "hpss:drums": (2.0, ["separation"]),
        "hpss:bass": (4.0, ["separation"]),
        "composite": (1.0, ["separation", "hpss:drums", "hpss:bass"]),
        "normalize": (2.0, ["separation", "hpss:mix", "composite"]),
    }
    path, total = critical_path(nodes)
    assert path == ["decode", "separation", "hpss:bass", "composite", "normalize"]
    assert total == pytest.approx(47.5)
    assert critical_path({}) == ([], 0.0)
    with pytest.raises(ValueError, match="cycle"):
        critical_path({"a": (1.0, ["b"]), "b": (1.0, ["a"])})


def test_table_shows_missing_figures_and_errors() -> None:
    report = dict.fromkeys(KEYS)
    report.update(duration_s=3.0, errors=["e2e: TimeoutError: no time left"], stage_s={}, critical_path=[])
    text = format_table(report)
    assert "e2e: TimeoutError" in text and "—" in text


def test_peak_rss_of_this_process() -> None:
    assert read_peak_rss_mb() > 10
    assert read_peak_rss_mb(2**22 + 12345) is None  # no such process
