"""``audiomesh bench``: audiomesh measured against raw Demucs (or a RoFormer's reference inference) and
librosa, side by side, in one run.

What one run does (every step bounded in time; a step that fails or runs out of time is
reported as missing, the others still run):

1. Synthesizes a stereo 44.1 kHz song of ``--duration`` seconds (:func:`audiomesh.demo.synth_song`)
   and writes it as a 16-bit WAV, as a user would upload it.
2. Builds the separation model: by default an HTDemucs with the configuration of the released
   ``htdemucs`` and random weights (same compute as the real one; nothing is downloaded),
   saved into a temporary local model repository. ``--model bs_roformer`` / ``mel_roformer``:
   a RoFormer at the released sizes (:data:`~audiomesh.separation.roformer_model.BS_ROFORMER_EP317`,
   159.8 M parameters; :data:`~audiomesh.separation.roformer_model.MEL_ROFORMER_KJ`, 228.2 M),
   random weights (seed 0), saved as the community shares them: ``NAME.yaml`` (MSST's config,
   tuples as ``!!python/tuple``) + ``NAME.ckpt`` (MSST-keyed ``state_dict``); ``tiny_roformer``:
   the Mel-Band one shrunk (dim 16, one layer, 1 s chunks) for tests.
3. ``raw``: ``demucs.apply.apply_model`` on the song in a child process (so its peak RSS is its
   own), with the options a job uses by default (``shifts=1, overlap=0.25, split=True``) and
   the input normalized as ``demucs.api.Separator`` does; only the ``apply_model`` call is timed.
   For a RoFormer, the reference inference (``raw_reference``): MSST's own ``demix``
   (``msst.utils.model_utils.demix``, the config's ``batch_size``) on MSST's own network class
   loaded from the same ``NAME.yaml`` + ``NAME.ckpt`` as MSST's inference loads them, or, where
   the test-only ``msst`` package cannot be imported, :meth:`RoformerModel.separate
   <audiomesh.separation.roformer_model.RoformerModel.separate>` on the whole array; only that
   call is timed. ``raw_chunks`` is the chunks MSST's geometry computes (``ceil(padded length /
   step)``) and ``raw_chunk_s`` the raw time per chunk. A RoFormer's raw step runs after ``e2e``,
   on the mix the job decoded, and ``e2e_max_abs_diff`` is the job's stems against raw's (the
   residual stem, e.g. ``other``, as ``mix - target`` for both, as MSST's ``--extract_instrumental``).
4. ``hpss``: ``librosa.effects.hpss`` (STFT → ``decompose.hpss`` → ISTFT) versus
   :func:`audiomesh.dsp.hpss.hpss` on the same stereo float32 signal, each in its own child
   process after its numba JIT is warm: times, speedup, max abs difference, peak RSS.
5. ``e2e``: an ephemeral :class:`~audiomesh.launcher.Mesh` (every service a process, file store
   in a temp folder) with ``AUDIOMESH_MODEL_REPO`` pointing at that repository. After a short
   warm-up job, the song is uploaded over gRPC, the job followed to its end and every delivered
   track read back from the store: ``e2e_s`` is submit → last byte of the last track. Per-node
   wall times come from the job's manifest; ``critical_path_s`` is the longest dependency chain
   of node durations and ``overhead_s = e2e_s - critical_path_s`` (upload, scheduling, reading
   tracks back). Peak RSS (``VmHWM``) of every service is read from ``/proc`` before the mesh stops.

6. ``--compile-backend B`` (e.g. ``inductor``): ``compiled``: in a child process with an empty
   compile cache, :func:`audiomesh.separation.compiled.compile_model` builds the compiled model
   (``compile_cold_s``: the compile, plus its check against eager on one chunk) and the same
   ``apply_model`` call as ``raw`` runs on it with the same random state (``separation_compiled_s``;
   ``compiled_max_abs_diff`` against raw's stems). Then ``e2e_compiled``: a second mesh with
   ``AUDIOMESH_COMPILE=true`` on that (now warm) cache; once its worker reports the model compiled
   (``compile_warm_s``: that worker's compile, from the cache's marker file), the same job as
   ``e2e`` (``e2e_compiled_s``, ``e2e_over_raw_compiled = e2e_compiled_s / raw_separation_s``).
   The worker times one chunk eager and compiled before serving the compiled model (Inductor
   only): ``worker_chunk_s`` and ``worker_serves_compiled`` (false: eager was faster there, and
   the compiled job ran eager).
7. ``--separation-workers N`` (N >= 2): ``e2e_split``: the same job on a mesh with N separation
   workers (``--pin``: each on its own share of the cores, with that many torch threads, as if
   each were a pod; see :func:`audiomesh.launcher.pin_cores`), where the orchestrator splits the
   song's chunks into parts (nodes ``separation:partIofK``) and a ``stitch`` node joins them;
   ``e2e`` is then the single-worker baseline on all cores. Reported: ``split_e2e_s``,
   ``split_over_single``, ``split_separation_wall_s`` (first part's start → stitch's end, from the
   manifest; ``separation_wall_s`` is the baseline's), ``split_stitch_s``, ``split_parts``, each
   worker's peak RSS, and ``split_max_abs_diff``: the job's stems against raw ``apply_model`` on
   the job's decoded mix with the shift seed the orchestrator sent
   (:func:`audiomesh.separation.split.shift_seed` of the job id). To get that seed, ``raw`` runs
   after the split job and its stems are the reference (its time is raw's figure as usual).

RoFormer models run one pass, eager, on one worker: ``--shifts`` other than 1,
``--compile-backend`` and ``--separation-workers`` >= 2 are refused for them (the mesh does not
split a RoFormer job, nor compile it), and the Demucs-only keys stay ``null``.

Figures are reported, never asserted; :data:`KEYS` are always present in the JSON (``null``
when a step did not produce them, with the reason in ``errors``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["KEYS", "add_arguments", "cmd_bench", "critical_path", "read_peak_rss_mb", "run_bench"]

SAMPLE_RATE = 44100

#: Keys every JSON report has (``None`` when the step that measures it failed).
KEYS = (
    "duration_s",
    "model",
    "raw_reference",
    "raw_separation_s",
    "raw_separation_peak_rss_mb",
    "raw_chunks",
    "raw_chunk_s",
    "e2e_s",
    "e2e_over_raw",
    "e2e_max_abs_diff",
    "compile_backend",
    "separation_compiled_s",
    "compiled_max_abs_diff",
    "compile_cold_s",
    "compile_warm_s",
    "e2e_compiled_s",
    "e2e_over_raw_compiled",
    "stage_compiled_s",
    "worker_serves_compiled",
    "worker_chunk_s",
    "hpss_reference_s",
    "hpss_s",
    "hpss_speedup",
    "hpss_max_abs_diff",
    "hpss_signal_s",
    "hpss_reference_peak_rss_mb",
    "hpss_peak_rss_mb",
    "stage_s",
    "critical_path",
    "critical_path_s",
    "overhead_s",
    "separation_peak_rss_mb",
    "service_peak_rss_mb",
    "service_idle_rss_mb",
    "mesh_start_s",
    "thread_budget",
    "separation_allocator",
    "separation_wall_s",
    "separation_workers",
    "split_pinned",
    "split_e2e_s",
    "split_over_single",
    "split_separation_wall_s",
    "split_stitch_s",
    "split_parts",
    "split_stage_s",
    "split_worker_peak_rss_mb",
    "split_worker_cpus",
    "split_worker_allocator",
    "split_thread_budget",
    "split_max_abs_diff",
    "split_seed",
    "machine",
    "errors",
)

#: Models ``--model`` accepts: name → HTDemucs overrides (None: demucs' built-in ``demucs_unittest``).
MODELS: Mapping[str, dict[str, Any] | None] = {
    "htdemucs": {},  # the released configuration, random weights
    # Same shape, ~1/100 of the compute; 4 s chunks, so a 4 s song is two (a split run cuts it in two).
    "tiny": {"channels": 8, "bottom_channels": 0, "t_layers": 1, "segment": 4},
    "demucs_unittest": None,
}
_REPO_NAME = {"htdemucs": "bench_htdemucs", "tiny": "bench_tiny_htdemucs"}


def _tiny_roformer() -> dict[str, Any]:
    """Kimberley Jensen's Mel-Band RoFormer shrunk: dim 16, one layer of 2 heads of 8, 1 s chunks
    (a 4 s song is 10 chunks, batched by 4 as the released config)."""
    from audiomesh.separation.roformer_model import MEL_ROFORMER_KJ

    config = copy.deepcopy(MEL_ROFORMER_KJ)
    config["model"].update(dim=16, depth=1, heads=2, dim_head=8)
    config["audio"]["chunk_size"] = SAMPLE_RATE
    return config


def _released_roformer(constant: str) -> dict[str, Any]:
    from audiomesh.separation import roformer_model

    return copy.deepcopy(getattr(roformer_model, constant))


#: RoFormer models ``--model`` accepts: name → a function returning the MSST-shaped config (random weights, seed 0).
ROFORMER_MODELS: Mapping[str, Callable[[], dict[str, Any]]] = {
    "bs_roformer": lambda: _released_roformer("BS_ROFORMER_EP317"),
    "mel_roformer": lambda: _released_roformer("MEL_ROFORMER_KJ"),
    "tiny_roformer": _tiny_roformer,
}


_CHILD = "_child"  # argv[1] of this module's child processes


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``audiomesh bench`` (kept here so the CLI entry stays one line)."""
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of synthesized song (default 180)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument(
        "--model",
        choices=sorted([*MODELS, *ROFORMER_MODELS]),
        default="htdemucs",
        help="htdemucs: released configuration with random weights (default); tiny: same architecture, "
        "shrunk, 4 s chunks; demucs_unittest: demucs' built-in test model; bs_roformer / mel_roformer: "
        "viperx' BS-RoFormer ep317 / Kimberley Jensen's Mel-Band RoFormer configuration with random "
        "weights; tiny_roformer: the Mel-Band one shrunk, 1 s chunks",
    )
    parser.add_argument("--shifts", type=int, default=1, help="apply_model shifts, for raw and the job (default 1)")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["raw", "hpss", "e2e"],
        help="leave a step out (repeatable)",
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        metavar="BACKEND",
        help="also measure the compiled model (torch.compile with BACKEND: inductor, or aot_eager to test "
        "cheaply): cold and warm compile, separation, max abs diff from raw, end to end",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds for the whole run (default 600 + 12 x duration); each step gets what is left",
    )
    parser.add_argument(
        "--no-warmup-job",
        action="store_true",
        help="measure the first job of a fresh mesh (default: run a 3 s job first)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the mesh's services, e.g. AUDIOMESH_THREAD_BUDGET=false (repeatable)",
    )
    parser.add_argument(
        "--separation-workers",
        type=int,
        default=1,
        metavar="N",
        help="also run the job on a mesh with N separation workers, which splits the song across them "
        "(default 1: no split run); e2e is then the 1-worker baseline",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="with --separation-workers: each worker on its own share of the cores (N <= cores), as if a pod",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folder (song, repo, store, logs) here")
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    """``audiomesh bench``: run, print the table, write the JSON; 0 when every step produced figures."""
    extra_env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"error: --env expects NAME=VALUE, got {item!r}", file=sys.stderr)
            return 2
        extra_env[name] = value
    if not args.duration > 0:
        print("error: --duration must be > 0", file=sys.stderr)
        return 2
    if problem := check_split(args.separation_workers, args.pin) or check_model(
        args.model, args.shifts, args.separation_workers, args.compile_backend
    ):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    report = run_bench(
        duration=args.duration,
        model=args.model,
        shifts=args.shifts,
        skip=set(args.skip),
        timeout=args.timeout,
        warmup_job=not args.no_warmup_job,
        mesh_env=extra_env,
        keep=args.keep,
        compile_backend=args.compile_backend,
        separation_workers=args.separation_workers,
        pin=args.pin,
        log=lambda text: print(text, file=sys.stderr, flush=True),
    )
    print(format_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
        print(f"figures written to {args.json}")
    return 1 if report["errors"] else 0


def check_split(workers: int, pin: bool) -> str | None:
    """What is wrong with ``--separation-workers``/``--pin`` (None: nothing)."""
    from audiomesh.parallel import usable_cores

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        return f"--separation-workers must be a whole number >= 1, got {workers!r}"
    if pin and workers > (cores := usable_cores()):
        return f"--pin gives each of the {workers} separation workers its own cores, but only {cores} are usable"
    return None


def check_model(model: str, shifts: int, separation_workers: int, compile_backend: str | None) -> str | None:
    """What the model cannot do of what was asked (None: nothing): a RoFormer runs one pass, eager, unsplit."""
    if model not in MODELS and model not in ROFORMER_MODELS:
        return f"--model must be one of {sorted([*MODELS, *ROFORMER_MODELS])}, got {model!r}"
    if model not in ROFORMER_MODELS:
        return None
    if shifts != 1:
        return f"--shifts is a Demucs option: RoFormer models run one pass (MSST has no shift trick), got {shifts}"
    if separation_workers > 1:
        return (
            f"--separation-workers {separation_workers}: the mesh does not split a RoFormer job across "
            "separation workers (one worker separates the whole song); leave it at 1"
        )
    if compile_backend:
        return "--compile-backend: RoFormer models run eager (the compiled path is Demucs only)"
    return None


# --------------------------------------------------------------------------- the run


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        left = max(0.0, self.end - time.monotonic())
        return left if cap is None else min(left, cap)


def run_bench(
    *,
    duration: float = 180.0,
    model: str = "htdemucs",
    shifts: int = 1,
    skip: set[str] | frozenset[str] = frozenset(),
    timeout: float | None = None,
    warmup_job: bool = True,
    mesh_env: Mapping[str, str] | None = None,
    keep: Path | None = None,
    log: Callable[[str], None] = lambda _text: None,
    compile_backend: str | None = None,
    separation_workers: int = 1,
    pin: bool = False,
) -> dict[str, Any]:
    """Run the benchmark; return the report (a dict with every key of :data:`KEYS`)."""
    if problem := check_split(separation_workers, pin) or check_model(
        model, shifts, separation_workers, compile_backend
    ):
        raise ValueError(problem)
    split = separation_workers > 1
    roformer = model in ROFORMER_MODELS
    job_shifts = None if roformer else shifts  # a RoFormer job leaves the Demucs option unset
    deadline = _Deadline(timeout if timeout is not None else 600.0 + 12.0 * duration)
    report: dict[str, Any] = dict.fromkeys(KEYS)
    report.update(duration_s=float(duration), errors=[], stage_s={}, service_peak_rss_mb={}, critical_path=[])
    report.update(separation_workers=separation_workers, split_pinned=pin if split else None)
    report["machine"] = machine_facts()
    report["machine"]["loadavg_start"] = _loadavg()
    work = Path(tempfile.mkdtemp(prefix="audiomesh-bench-")) if keep is None else Path(keep)
    work.mkdir(parents=True, exist_ok=True)
    try:
        log(f"bench: {duration:g} s song, model {model}, work folder {work}")
        from audiomesh.demo import synth_song

        song = synth_song(duration, SAMPLE_RATE)
        np.save(work / "song.npy", song)
        _write_wav(work / "song.wav", song)
        del song
        repo, name, params = _prepare_model(model, work / "models")
        report["model"] = {
            "kind": model,
            "name": name,
            "parameters_m": round(params / 1e6, 3),
            "shifts": shifts,
            "overlap": 0.25,
        }
        if roformer and repo is not None:
            report["model"].update(_roformer_facts(repo / f"{name}.yaml"))
        raw_song, raw_seed = work / "song.npy", 0  # the split run (or a RoFormer's job) replaces the song
        save = work / "raw_stems.npy" if compile_backend else None
        # Raw compares with a job's stems when it runs after that job: the split one's, or a RoFormer's.
        raw_after = split or roformer
        if "raw" not in skip and not raw_after:
            _step(
                report,
                "raw",
                log,
                lambda: _raw(report, work, repo, name, shifts, deadline, save, song=raw_song, seed=raw_seed),
            )
        if "hpss" not in skip:
            _step(report, "hpss", log, lambda: _hpss(report, work, deadline))
        if "e2e" not in skip:
            _step(
                report,
                "e2e",
                log,
                lambda: _e2e(
                    report,
                    work,
                    repo,
                    name,
                    job_shifts,
                    deadline,
                    warmup_job,
                    dict(mesh_env or {}),
                    log,
                    save_audio=roformer,
                ),
            )
            if roformer and (work / "job_mix.npy").is_file():
                raw_song = work / "job_mix.npy"
        if split and "e2e" not in skip:
            split_env = dict(mesh_env or {})
            _step(
                report,
                "e2e_split",
                log,
                lambda: _e2e_split(
                    report, work, repo, name, shifts, deadline, warmup_job, split_env, separation_workers, pin, log
                ),
            )
            if report["split_seed"] is not None:
                raw_song, raw_seed = work / "split_mix.npy", int(report["split_seed"])
        if "raw" not in skip and raw_after:
            compare = work / ("split_stems.npz" if split else "job_stems.npz")
            diff_key = "split_max_abs_diff" if split else "e2e_max_abs_diff"
            _step(
                report,
                "raw",
                log,
                lambda: _raw(
                    report,
                    work,
                    repo,
                    name,
                    shifts,
                    deadline,
                    save,
                    song=raw_song,
                    seed=raw_seed,
                    compare=compare,
                    diff_key=diff_key,
                    roformer=roformer,
                ),
            )
        if compile_backend:
            report["compile_backend"] = compile_backend
            _step(
                report,
                "compiled",
                log,
                lambda: _compiled(
                    report, work, repo, name, shifts, compile_backend, deadline, song=raw_song, seed=raw_seed
                ),
            )
        if compile_backend and "e2e" not in skip:
            env = {**dict(mesh_env or {}), **_compiled_env(work, compile_backend)}
            _step(
                report,
                "e2e_compiled",
                log,
                lambda: _e2e_compiled(report, work, repo, name, shifts, deadline, warmup_job, env, log),
            )
        report["machine"]["loadavg_end"] = _loadavg()
        raw, e2e = report["raw_separation_s"], report["e2e_s"]
        if raw and e2e:
            report["e2e_over_raw"] = round(e2e / raw, 4)
        if raw and report["e2e_compiled_s"]:
            report["e2e_over_raw_compiled"] = round(report["e2e_compiled_s"] / raw, 4)
        if e2e and report["split_e2e_s"]:
            report["split_over_single"] = round(report["split_e2e_s"] / e2e, 4)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return report


def _step(report: dict[str, Any], what: str, log: Callable[[str], None], fn: Callable[[], None]) -> None:
    started = time.perf_counter()
    log(f"bench: {what} ...")
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a failed step is reported, the others still run
        report["errors"].append(f"{what}: {type(exc).__name__}: {exc}")
        log(f"bench: {what} failed: {exc}")
    else:
        log(f"bench: {what} done in {time.perf_counter() - started:.1f} s")


def _write_wav(path: Path, y: np.ndarray) -> None:
    import soundfile as sf

    sf.write(path, y.T, SAMPLE_RATE, subtype="PCM_16")


def _prepare_model(kind: str, folder: Path) -> tuple[Path | None, str, int]:
    """(repo folder or None, model name, parameter count)."""
    if kind in ROFORMER_MODELS:
        return _prepare_roformer(kind, folder)
    overrides = MODELS[kind]
    if overrides is None:
        from demucs.pretrained import get_model

        model = get_model(kind)
        return None, kind, sum(p.numel() for p in model.parameters())
    from audiomesh.separation.repo import build_htdemucs, save_model_to_repo

    model = build_htdemucs(seed=0, **overrides)
    name = _REPO_NAME[kind]
    save_model_to_repo(model, name, folder)
    return folder, name, sum(p.numel() for p in model.parameters())


def _prepare_roformer(kind: str, folder: Path) -> tuple[Path, str, int]:
    """``folder/NAME.yaml`` + ``folder/NAME.ckpt`` of a RoFormer with random weights (seed 0):
    (folder, name, parameter count of the network as built)."""
    import torch
    import yaml

    from audiomesh.separation.roformer_model import build_network, config_from_mapping, msst_state_dict

    data = ROFORMER_MODELS[kind]()
    name = f"bench_{kind}"
    config = config_from_mapping(data, origin=f"bench {kind}")
    network = build_network(config, seed=0)
    params = sum(p.numel() for p in network.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    # PyYAML's default dumper, as MSST writes configs: tuples come out as !!python/tuple.
    (folder / f"{name}.yaml").write_text(yaml.dump(data, Dumper=yaml.Dumper, sort_keys=False))
    torch.save(msst_state_dict(network, config), folder / f"{name}.ckpt")
    return folder, name, params


def _roformer_facts(config_path: Path) -> dict[str, Any]:
    """What the report says of a RoFormer (its own chunking; the Demucs options do not apply)."""
    from audiomesh.separation.roformer_model import load_config

    config = load_config(config_path)
    return {
        "network": config.network,
        "description": config.describe(),
        "shifts": None,
        "overlap": None,
        "chunk_size": config.chunk_size,
        "chunk_s": round(config.chunk_size / config.sample_rate, 3),
        "num_overlap": config.num_overlap,
        "batch_size": config.batch_size,
        "sources": list(config.sources),
    }


# --------------------------------------------------------------------------- child processes


def _run_child(mode: str, spec: dict[str, Any], timeout: float, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m audiomesh.bench _child MODE SPEC``; return the JSON it prints last."""
    if timeout <= 1:
        raise TimeoutError(f"no time left for {mode}")
    cmd = [sys.executable, "-m", "audiomesh.bench", _CHILD, mode, json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{mode} did not finish within {timeout:.0f} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{mode} exited with {proc.returncode}: " + " | ".join(tail))
    return json.loads(lines[-1])


def _raw(
    report: dict[str, Any],
    work: Path,
    repo: Path | None,
    name: str,
    shifts: int,
    deadline: _Deadline,
    save: Path | None = None,
    *,
    song: Path,
    seed: int,
    compare: Path | None = None,
    diff_key: str = "split_max_abs_diff",
    roformer: bool = False,
) -> None:
    """Raw ``apply_model`` on ``song`` (a ``.npy``) with ``random.seed(seed)`` before it; for a
    RoFormer (``roformer``), its reference inference (:func:`_child_raw_roformer`).

    ``save``: its stems go there (for the compiled run). ``compare``: an ``.npz`` of stems by
    name (a job's): ``report[diff_key]`` is the largest difference from raw's.
    """
    spec = {
        "kind": "roformer" if roformer else "demucs",
        "song": str(song),
        "repo": str(repo) if repo else None,
        "name": name,
        "shifts": shifts,
        "seed": seed,
        "save": str(save) if save is not None else None,
        "compare": str(compare) if compare is not None and compare.is_file() else None,
    }
    result = _run_child("raw", spec, deadline.left())
    report["raw_reference"] = result["reference"]
    report["raw_separation_s"] = round(result["seconds"], 3)
    report["raw_separation_peak_rss_mb"] = result["peak_rss_mb"]
    report["machine"]["raw_torch_threads"] = result["torch_threads"]
    if result.get("chunks"):
        report["raw_chunks"] = result["chunks"]
        report["raw_chunk_s"] = round(result["seconds"] / result["chunks"], 4)
    if result.get("reference_problem"):
        report["machine"]["raw_reference_problem"] = result["reference_problem"]
    if spec["compare"] is not None:
        report[diff_key] = result["max_abs_diff"]


def _hpss(report: dict[str, Any], work: Path, deadline: _Deadline) -> None:
    song = np.load(work / "song.npy", mmap_mode="r")
    frames = song.shape[-1]
    # librosa needs ~35x the signal at its peak; compare on the longest prefix that fits in memory.
    available = _meminfo_mb("MemAvailable") * 1e6 * 0.8
    fits = int(available / (35 * 4 * song.shape[0])) if available > 0 else frames
    length = min(frames, max(fits, SAMPLE_RATE))
    report["hpss_signal_s"] = round(length / SAMPLE_RATE, 3)
    ref_out = work / "hpss_reference.npz"
    spec = {"song": str(work / "song.npy"), "frames": length, "out": str(ref_out)}
    ref = _run_child("hpss_reference", spec, deadline.left())
    ours = _run_child("hpss_ours", {**spec, "reference": str(ref_out)}, deadline.left())
    ref_out.unlink(missing_ok=True)
    report["hpss_reference_s"] = round(ref["seconds"], 3)
    report["hpss_s"] = round(ours["seconds"], 3)
    report["hpss_speedup"] = round(ref["seconds"] / ours["seconds"], 2)
    report["hpss_max_abs_diff"] = ours["max_abs_diff"]
    report["hpss_reference_peak_rss_mb"] = ref["peak_rss_mb"]
    report["hpss_peak_rss_mb"] = ours["peak_rss_mb"]


def _child(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    if mode == "raw":
        return _child_raw(spec)
    if mode == "hpss_reference":
        return _child_hpss_reference(spec)
    if mode == "hpss_ours":
        return _child_hpss_ours(spec)
    if mode == "compiled":
        return _child_compiled(spec)
    raise SystemExit(f"unknown child mode {mode!r}")


def _child_raw(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("kind") == "roformer":
        return _child_raw_roformer(spec)
    import torch
    from demucs.apply import apply_model
    from demucs.pretrained import get_model

    model = get_model(spec["name"], repo=Path(spec["repo"]) if spec["repo"] else None)
    model.eval()
    mix = torch.from_numpy(np.load(spec["song"]))
    with torch.inference_mode():
        # As demucs.api.Separator (and audiomesh's DemucsModel) feed it: normalized by the mix.
        ref = mix.mean(0)
        mean, std = ref.mean(), ref.std() + 1e-8
        normalized = ((mix - mean) / std)[None]
        random.seed(int(spec["seed"]))  # the shifts the compiled run (or the split job) drew
        started = time.perf_counter()
        out = apply_model(
            model, normalized, shifts=int(spec["shifts"]), split=True, overlap=0.25, device="cpu", num_workers=0
        )
        seconds = time.perf_counter() - started
        out = out[0] * std + mean
    assert out.shape[-1] == mix.shape[-1]
    result = {
        "reference": "demucs.apply_model",
        "seconds": seconds,
        "peak_rss_mb": read_peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }
    if spec.get("save"):
        np.save(spec["save"], out.numpy())
    if spec.get("compare"):
        with np.load(spec["compare"]) as stems:
            if sorted(stems.files) != sorted(model.sources):
                raise RuntimeError(f"the job delivered stems {sorted(stems.files)}, the model has {model.sources}")
            result["max_abs_diff"] = max(
                float(np.abs(stems[source] - out[i].numpy()).max()) for i, source in enumerate(model.sources)
            )
    return result


def _child_raw_roformer(spec: dict[str, Any]) -> dict[str, Any]:
    """A RoFormer's reference inference on ``spec["song"]``: MSST's ``demix`` on MSST's own network
    (as MSST's inference loads ``NAME.yaml`` + ``NAME.ckpt``), else ``RoformerModel.separate``.

    The residual stem is ``mix - target`` (MSST's ``--extract_instrumental``), outside the timing.
    """
    import torch

    from audiomesh.separation.roformer_model import RoformerModel, _Geometry, load_config

    repo, name = Path(spec["repo"]), spec["name"]
    config_path, checkpoint = repo / f"{name}.yaml", repo / f"{name}.ckpt"
    config = load_config(config_path)
    mix = np.ascontiguousarray(np.load(spec["song"]), dtype=np.float32)
    chunks = _Geometry(mix.shape[-1], config.chunk_size, config.num_overlap, config.batch_size).count
    problem = None
    try:
        from msst.utils.model_utils import demix as msst_demix  # test-only (scripts/setup.sh installs it)
    except ImportError as error:
        problem = f"msst cannot be imported ({error}): RoformerModel.separate is the reference"
    if problem is None:
        import yaml
        from ml_collections import ConfigDict  # type: ignore[import-untyped]
        from msst.models.bs_roformer import BSRoformer, MelBandRoformer

        # As msst.utils.settings loads a RoFormer (spelled out: that module needs omegaconf).
        with config_path.open() as fh:
            msst_config = ConfigDict(yaml.load(fh, Loader=yaml.FullLoader))  # noqa: S506 - our own file
        klass = BSRoformer if config.network == "bs_roformer" else MelBandRoformer
        network = klass(**dict(msst_config.model))
        network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        network.eval()
        feed = mix
        if config.normalize:  # msst.utils.audio_utils.normalize_audio (that module imports matplotlib)
            mono = mix.mean(0)
            mean, std = mono.mean(), mono.std()
            if not np.isfinite(std) or std <= np.finfo(np.float32).eps:
                std = np.float32(1.0)
            feed = (mix - mean) / std
        started = time.perf_counter()
        # As MSST's inference calls it: a numpy mix, a device name (its annotations say tensors).
        demix: Callable[..., Any] = msst_demix
        out = demix(msst_config, network, feed, "cpu", config.network)
        seconds = time.perf_counter() - started
        peak = read_peak_rss_mb()
        if config.normalize:
            out = {key: audio * std + mean for key, audio in out.items()}
        stems = {key: np.asarray(audio, dtype=np.float32) for key, audio in out.items()}
        if config.target is not None:
            stems = {config.target: stems[config.target]}
            stems[config.sources[1]] = mix - stems[config.target]
        reference = "msst.demix"
    else:
        model = RoformerModel.load(config_path, checkpoint, name=name, device="cpu")
        started = time.perf_counter()
        stems = model.separate(mix)
        seconds = time.perf_counter() - started
        peak = read_peak_rss_mb()
        reference = "RoformerModel.separate"
    result: dict[str, Any] = {
        "reference": reference,
        "reference_problem": problem,
        "seconds": seconds,
        "chunks": chunks,
        "peak_rss_mb": peak,
        "torch_threads": torch.get_num_threads(),
    }
    if spec.get("compare"):
        with np.load(spec["compare"]) as job:
            if sorted(job.files) != sorted(stems):
                raise RuntimeError(f"the job delivered stems {sorted(job.files)}, the reference {sorted(stems)}")
            result["max_abs_diff"] = max(float(np.abs(job[key] - stems[key]).max()) for key in stems)
    return result


def _compiled(
    report: dict[str, Any],
    work: Path,
    repo: Path | None,
    name: str,
    shifts: int,
    backend: str,
    deadline: _Deadline,
    *,
    song: Path,
    seed: int,
) -> None:
    spec = {
        "song": str(song),
        "seed": seed,
        "repo": str(repo) if repo else None,
        "name": name,
        "shifts": shifts,
        "backend": backend,
        "cache": str(work / "compile-cache"),
        "reference": str(work / "raw_stems.npy"),
    }
    result = _run_child("compiled", spec, deadline.left())
    report["compile_cold_s"] = round(result["compile_seconds"], 3)
    report["separation_compiled_s"] = round(result["seconds"], 3)
    report["compiled_max_abs_diff"] = result["max_abs_diff"]
    report["machine"]["compiled_calls"] = result["compiled_calls"]


def _child_compiled(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from demucs.apply import apply_model
    from demucs.pretrained import get_model

    from audiomesh.separation.compiled import compile_model, configure_cache, record_compile
    from audiomesh.separation.demucs_model import DemucsModel

    configure_cache(spec["cache"])
    eager = DemucsModel(
        get_model(spec["name"], repo=Path(spec["repo"]) if spec["repo"] else None), name=spec["name"], device="cpu"
    )
    started = time.perf_counter()
    compiled = compile_model(eager, backend=spec["backend"])
    compile_seconds = time.perf_counter() - started
    record_compile(spec["cache"], eager, spec["backend"], compile_seconds)  # the mesh's worker finds it
    calls = compiled.compiled_calls
    mix = torch.from_numpy(np.load(spec["song"]))
    with torch.inference_mode():
        ref = mix.mean(0)
        mean, std = ref.mean(), ref.std() + 1e-8
        normalized = ((mix - mean) / std)[None]
        random.seed(int(spec["seed"]))  # the shifts raw drew
        started = time.perf_counter()
        out = apply_model(
            compiled.model,
            normalized,
            shifts=int(spec["shifts"]),
            split=True,
            overlap=0.25,
            device="cpu",
            num_workers=0,
        )
        seconds = time.perf_counter() - started
        stems = (out[0] * std + mean).numpy()
    if compiled.failure is not None:
        raise RuntimeError(f"the compiled model failed: {compiled.failure}")
    diff = None
    if Path(spec["reference"]).is_file():
        diff = float(np.abs(stems - np.load(spec["reference"], mmap_mode="r")).max())
    return {
        "seconds": seconds,
        "compile_seconds": compile_seconds,
        "max_abs_diff": diff,
        "compiled_calls": compiled.compiled_calls - calls,
        "peak_rss_mb": read_peak_rss_mb(),
    }


def _child_hpss_reference(spec: dict[str, Any]) -> dict[str, Any]:
    import librosa

    from audiomesh.dsp.hpss import warmup

    y = np.ascontiguousarray(np.load(spec["song"], mmap_mode="r")[:, : spec["frames"]])
    warmup()
    librosa.effects.hpss(y[:, :SAMPLE_RATE])  # librosa's own path JIT-compiled too
    started = time.perf_counter()
    harmonic, percussive = librosa.effects.hpss(y)
    seconds = time.perf_counter() - started
    peak = read_peak_rss_mb()
    np.savez(spec["out"], harmonic=harmonic, percussive=percussive)
    return {"seconds": seconds, "peak_rss_mb": peak}


def _child_hpss_ours(spec: dict[str, Any]) -> dict[str, Any]:
    from audiomesh.dsp.hpss import hpss, warmup

    y = np.ascontiguousarray(np.load(spec["song"], mmap_mode="r")[:, : spec["frames"]])
    warmup()
    started = time.perf_counter()
    harmonic, percussive = hpss(y)
    seconds = time.perf_counter() - started
    peak = read_peak_rss_mb()
    with np.load(spec["reference"]) as ref:
        diff = max(
            float(np.abs(harmonic - ref["harmonic"]).max()),
            float(np.abs(percussive - ref["percussive"]).max()),
        )
    return {"seconds": seconds, "peak_rss_mb": peak, "max_abs_diff": diff}


# --------------------------------------------------------------------------- the mesh


@contextlib.contextmanager
def _bench_mesh(
    work: Path,
    repo: Path | None,
    name: str,
    deadline: _Deadline,
    folder: str,
    extra_env: Mapping[str, str],
    *,
    replicas: Mapping[str, int] | None = None,
    pin: tuple[str, ...] = (),
) -> Iterator[tuple[Any, dict[str, str]]]:
    """An ephemeral mesh on a file store in ``work/<folder>`` (logs beside it): ``(mesh, its env)``.
    ``replicas`` and ``pin`` as :class:`~audiomesh.launcher.Mesh` takes them."""
    from audiomesh.launcher import Mesh

    env = {
        "AUDIOMESH_STORE_URL": (work / folder).resolve().as_uri(),
        "AUDIOMESH_DEFAULT_MODEL": name,
        "AUDIOMESH_LOG_FORMAT": "json",
        "AUDIOMESH_RETENTION_HOURS": "0",
        "AUDIOMESH_OTLP_ENDPOINT": "",
        "AUDIOMESH_API_KEYS": "",
        "HF_HUB_OFFLINE": "1",
        **extra_env,
    }
    if repo is not None:
        env["AUDIOMESH_MODEL_REPO"] = str(repo)
    mesh = Mesh(env=env, log_dir=work / f"logs-{folder}", replicas=replicas, pin=pin)
    try:
        mesh.start(timeout=deadline.left(600.0))
        yield mesh, env
    finally:
        mesh.stop()


def _warmup_job(
    mesh: Any, env: Mapping[str, str], work: Path, shifts: int | None, deadline: _Deadline, seconds: float = 3.0
) -> None:
    """A short job first (3 s: one chunk): every worker's lazy first-request work is out of the
    measured job. With several separation workers, ``seconds`` long enough for a chunk each."""
    song = work / f"warmup-{seconds:g}s.wav"
    if not song.is_file():
        from audiomesh.demo import synth_song

        _write_wav(song, synth_song(seconds, SAMPLE_RATE, seed=1))
    asyncio.run(_one_job(mesh.orchestrator, env["AUDIOMESH_STORE_URL"], song, shifts, deadline.left(600.0)))


def _e2e(
    report: dict[str, Any],
    work: Path,
    repo: Path | None,
    name: str,
    shifts: int | None,
    deadline: _Deadline,
    warmup_job: bool,
    extra_env: dict[str, str],
    log: Callable[[str], None],
    *,
    save_audio: bool = False,
) -> None:
    """The job on a one-worker mesh; ``save_audio``: its decoded mix and stems are kept in ``work``
    (``job_mix.npy``, ``job_stems.npz``) for raw to run on and compare with."""
    started = time.perf_counter()
    with _bench_mesh(work, repo, name, deadline, "store", extra_env) as (mesh, env):
        report["mesh_start_s"] = round(time.perf_counter() - started, 2)
        report["thread_budget"] = _mesh_thread_env(mesh)
        report["service_idle_rss_mb"] = {service: _rss_mb(proc.pid) for service, proc in mesh.procs.items()}
        report["separation_allocator"] = _reported_allocator(mesh.log_dir / "separation.log")
        log(f"bench: mesh up in {report['mesh_start_s']:.1f} s")
        if warmup_job:
            _warmup_job(mesh, env, work, shifts, deadline)
            log("bench: warm-up job done")
        song = work / "song.wav"
        e2e_s, doc = asyncio.run(_one_job(mesh.orchestrator, env["AUDIOMESH_STORE_URL"], song, shifts, deadline.left()))
        report["service_peak_rss_mb"] = {
            service: read_peak_rss_mb(proc.pid) for service, proc in mesh.procs.items() if proc.poll() is None
        }
        report["separation_peak_rss_mb"] = report["service_peak_rss_mb"].get("separation")
        if save_audio:
            _save_job_audio(env["AUDIOMESH_STORE_URL"], doc, work / "job_mix.npy", work / "job_stems.npz")
    nodes = doc["job"]["nodes"]
    durations = report["stage_s"] = _stage_seconds(doc)
    path, total = critical_path({n["name"]: (durations[n["name"]], list(n.get("dependsOn", []))) for n in nodes})
    report["critical_path"] = path
    report["critical_path_s"] = round(total, 3)
    report["e2e_s"] = round(e2e_s, 3)
    report["overhead_s"] = round(e2e_s - total, 3)
    report["separation_wall_s"] = _separation_wall(doc)


#: Seconds of song that give each of N separation workers a chunk (7.8 s chunks every 5.85 s).
def _split_warmup_seconds(workers: int) -> float:
    return 3.0 + 6.0 * (workers - 1)


def _e2e_split(
    report: dict[str, Any],
    work: Path,
    repo: Path | None,
    name: str,
    shifts: int,
    deadline: _Deadline,
    warmup_job: bool,
    extra_env: dict[str, str],
    workers: int,
    pin: bool,
    log: Callable[[str], None],
) -> None:
    """The e2e job on a mesh with ``workers`` separation workers (pinned: each on its own cores),
    where the orchestrator splits the song; the job's stems and decoded mix are kept in ``work``
    for raw to compare with."""
    started = time.perf_counter()
    with _bench_mesh(
        work, repo, name, deadline, "store-split", extra_env, replicas={"separation": workers}, pin=_pinned(pin)
    ) as (mesh, env):
        log(f"bench: mesh with {workers} separation workers up in {time.perf_counter() - started:.1f} s")
        insts = mesh.instances("separation")
        pids = {inst: mesh.procs[inst].pid for inst in insts}
        budget = _mesh_thread_env(mesh)
        report["split_thread_budget"] = {inst: budget.get(inst) for inst in insts}
        report["split_worker_cpus"] = {inst: _cpus_allowed(pid) for inst, pid in pids.items()}
        report["split_worker_allocator"] = {inst: _reported_allocator(mesh.log_dir / f"{inst}.log") for inst in insts}
        if warmup_job:
            _warmup_job(mesh, env, work, shifts, deadline, _split_warmup_seconds(workers))
            log("bench: warm-up job done")
        song = work / "song.wav"
        e2e_s, doc = asyncio.run(_one_job(mesh.orchestrator, env["AUDIOMESH_STORE_URL"], song, shifts, deadline.left()))
        report["split_worker_peak_rss_mb"] = {inst: read_peak_rss_mb(pid) for inst, pid in pids.items()}
        _save_job_audio(env["AUDIOMESH_STORE_URL"], doc, work / "split_mix.npy", work / "split_stems.npz")
    nodes = doc["job"]["nodes"]
    report["split_e2e_s"] = round(e2e_s, 3)
    report["split_stage_s"] = _stage_seconds(doc)
    report["split_parts"] = sum(1 for n in nodes if n["name"].startswith("separation:part"))
    report["split_stitch_s"] = round(
        sum(float(n.get("durationSeconds", 0.0)) for n in nodes if n.get("stage") == "stitch"), 3
    )
    report["split_separation_wall_s"] = _separation_wall(doc)
    from audiomesh.separation.split import shift_seed  # what the orchestrator seeded the parts' shifts with

    report["split_seed"] = shift_seed(doc["job"]["jobId"])


def _pinned(pin: bool) -> tuple[str, ...]:
    return ("separation",) if pin else ()


def _separation_wall(doc: dict[str, Any]) -> float | None:
    """Seconds from the first separation node's start to the last separation (or stitch) node's
    end: the song's separation as the user waits for it, however many parts it was cut into."""
    from datetime import datetime

    spans = [
        (datetime.fromisoformat(n["startTime"]), datetime.fromisoformat(n["endTime"]))
        for n in doc["job"]["nodes"]
        if n.get("stage") in ("separation", "stitch") and n.get("startTime") and n.get("endTime")
    ]
    if not spans:
        return None
    return round((max(end for _, end in spans) - min(start for start, _ in spans)).total_seconds(), 3)


def _save_job_audio(store_url: str, doc: dict[str, Any], mix_out: Path, stems_out: Path) -> None:
    """The job's decoded mix (``.npy``, what separation read) and its stems (``.npz`` by stem:
    the stitch node's outputs, or the separation node's when the song was not split)."""
    import io

    import soundfile as sf

    from audiomesh.store import open_store

    nodes = doc["job"]["nodes"]
    stitched = [n for n in nodes if n.get("stage") == "stitch"]
    stem_nodes = stitched or [n for n in nodes if n.get("stage") == "separation"]
    decode = next(n for n in nodes if n["name"] == "decode")
    store = open_store(store_url)

    def read(key: str) -> np.ndarray:
        data, _rate = sf.read(io.BytesIO(store.get_bytes(key)), dtype="float32", always_2d=True)
        return np.ascontiguousarray(data.T)

    try:
        np.save(mix_out, read(decode["outputs"][0]["key"]))
        stems: dict[str, Any] = {t["name"]: read(t["key"]) for n in stem_nodes for t in n.get("outputs", [])}
        np.savez(stems_out, **stems)
    finally:
        store.close()


def _cpus_allowed(pid: int) -> list[int] | None:
    """The CPUs a process may run on (None if it is gone)."""
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return None


def _reported_allocator(log: Path) -> str | None:
    """The malloc a separation worker says it runs on (its ``torch`` line at start), from its log."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("{") and '"torch"' in line:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "torch" and "allocator" in event:
                    return str(event["allocator"])
    return None


def _stage_seconds(doc: dict[str, Any]) -> dict[str, float]:
    """Each node's wall time, from a job's manifest."""
    return {n["name"]: round(float(n.get("durationSeconds", 0.0)), 3) for n in doc["job"]["nodes"]}


def _compiled_env(work: Path, backend: str) -> dict[str, str]:
    return {
        "AUDIOMESH_COMPILE": "true",
        "AUDIOMESH_COMPILE_BACKEND": backend,
        "AUDIOMESH_COMPILE_CACHE_DIR": str(work / "compile-cache"),
        # The bench waits for the compile before it times a job: at niceness 19 any other busy
        # process on the machine (another test, a build) starves it for minutes.
        "AUDIOMESH_COMPILE_NICE": "0",
    }


def _e2e_compiled(
    report: dict[str, Any],
    work: Path,
    repo: Path | None,
    name: str,
    shifts: int,
    deadline: _Deadline,
    warmup_job: bool,
    extra_env: dict[str, str],
    log: Callable[[str], None],
) -> None:
    """The e2e job again, on a mesh whose separation worker runs the compiled model."""
    from audiomesh.separation.compiled import MARKER
    from audiomesh.v1 import separation_pb2

    with _bench_mesh(work, repo, name, deadline, "store-compiled", extra_env) as (mesh, env):
        compiled_at = time.perf_counter()
        info = asyncio.run(_wait_compiled(mesh.orchestrator, name, deadline.left()))
        log(f"bench: the mesh's worker compiled {name} in {time.perf_counter() - compiled_at:.1f} s")
        # The worker times a chunk both ways and serves compiled only when it is faster.
        report["worker_serves_compiled"] = info.execution == separation_pb2.MODEL_EXECUTION_COMPILED
        if info.HasField("eager_chunk_seconds"):
            report["worker_chunk_s"] = {
                "eager": round(info.eager_chunk_seconds, 3),
                "compiled": round(info.compiled_chunk_seconds, 3),
            }
        marker = json.loads((Path(env["AUDIOMESH_COMPILE_CACHE_DIR"]) / MARKER).read_text())
        compiles = [c for entry in marker.values() if entry.get("model") == name for c in entry.get("compiles", [])]
        report["compile_warm_s"] = max(compiles, key=lambda c: c["at"])["seconds"] if compiles else None
        if warmup_job:
            _warmup_job(mesh, env, work, shifts, deadline)
        song = work / "song.wav"
        e2e_s, doc = asyncio.run(_one_job(mesh.orchestrator, env["AUDIOMESH_STORE_URL"], song, shifts, deadline.left()))
    report["e2e_compiled_s"] = round(e2e_s, 3)
    report["stage_compiled_s"] = _stage_seconds(doc)
    warnings = [w for n in doc["job"]["nodes"] for w in n.get("warnings", [])]
    if warnings:
        raise RuntimeError(f"the compiled job reported: {'; '.join(warnings)}")


async def _wait_compiled(target: str, name: str, limit_s: float) -> Any:
    """Poll ListModels (through the orchestrator) until ``name`` is compiled (or found no faster
    than eager); return its ModelInfo."""
    from audiomesh.rpc import ClientFactory
    from audiomesh.v1 import orchestrator_pb2_grpc, separation_pb2

    clients = ClientFactory()
    stub = clients.stub(orchestrator_pb2_grpc.OrchestratorServiceStub, target)
    end = time.monotonic() + limit_s
    try:
        while True:
            models = (await stub.ListModels(separation_pb2.ListModelsRequest(), timeout=30)).models
            info = next((m for m in models if m.name == name), None)
            if info is not None and info.execution in (
                separation_pb2.MODEL_EXECUTION_COMPILED,
                separation_pb2.MODEL_EXECUTION_EAGER_FASTER,
            ):
                return info
            if info is not None and info.execution == separation_pb2.MODEL_EXECUTION_COMPILE_FAILED:
                raise RuntimeError(f"the worker could not compile {name}: {info.compile_error}")
            if time.monotonic() > end:
                raise TimeoutError(f"{name} was not compiled within {limit_s:.0f} s")
            await asyncio.sleep(0.25)
    finally:
        await clients.close()


def _mesh_thread_env(mesh: Any) -> dict[str, Any]:
    """What each service was started with (the launcher's per-worker thread budget), from /proc."""
    keys = (
        "AUDIOMESH_TORCH_THREADS",
        "AUDIOMESH_HPSS_THREADS",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMBA_NUM_THREADS",
        "LD_PRELOAD",
        "MALLOC_CONF",
        "MIMALLOC_PURGE_DELAY",
    )
    out: dict[str, Any] = {}
    for service, proc in mesh.procs.items():
        try:
            raw = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        environ = dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)
        out[service] = {k: environ[k] for k in keys if k in environ}
        try:
            out[service]["nice"] = int(Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        except (OSError, IndexError, ValueError):
            pass
    return out


async def _one_job(target: str, store_url: str, song: Path, shifts: int | None, limit_s: float) -> tuple[float, dict]:
    """Submit ``song``, follow the job, read every delivered track; (seconds, manifest).
    ``shifts`` None leaves the option unset (a RoFormer's job)."""
    from audiomesh.rpc import ClientFactory
    from audiomesh.store import open_store
    from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

    clients = ClientFactory()
    stub = clients.stub(orchestrator_pb2_grpc.OrchestratorServiceStub, target)
    store = open_store(store_url)
    options = orchestrator_pb2.JobOptions()
    if shifts is not None:
        options.separation.shifts = shifts
    size_bytes = await asyncio.to_thread(lambda: song.stat().st_size)

    async def messages() -> AsyncIterator[orchestrator_pb2.UploadAudioRequest]:
        yield orchestrator_pb2.UploadAudioRequest(
            metadata=orchestrator_pb2.UploadMetadata(
                filename=song.name, options=options, create_job=True, size_bytes=size_bytes
            )
        )
        with song.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                yield orchestrator_pb2.UploadAudioRequest(chunk=chunk)

    def read_tracks(keys: list[str]) -> int:
        return sum(len(chunk) for key in keys for chunk in store.iter_chunks(key, 1 << 20))

    async def run() -> tuple[float, dict]:
        started = time.perf_counter()
        response = await stub.UploadAudio(messages())
        job = response.job
        async for message in stub.WatchJob(orchestrator_pb2.WatchJobRequest(job_id=job.job_id)):
            job = message.job
        if job.state != common_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(
                f"job {job.job_id} ended {common_pb2.JobState.Name(job.state)}: {job.error.code} {job.error.message}"
            )
        size = await asyncio.to_thread(read_tracks, [t.key for t in job.tracks])
        elapsed = time.perf_counter() - started
        if size <= 0:
            raise RuntimeError("the delivered tracks are empty")
        doc = json.loads(await asyncio.to_thread(store.get_bytes, job.manifest_key))
        return elapsed, doc

    try:
        async with asyncio.timeout(limit_s):
            return await run()
    except TimeoutError:
        raise TimeoutError(f"the job did not finish within {limit_s:.0f} s") from None
    finally:
        await clients.close()
        store.close()


def critical_path(nodes: Mapping[str, tuple[float, list[str]]]) -> tuple[list[str], float]:
    """Longest chain of node durations through the dependencies: (node names in order, seconds).

    >>> critical_path({"a": (1.0, []), "b": (5.0, ["a"]), "c": (2.0, ["a"]), "d": (1.0, ["b", "c"])})
    (['a', 'b', 'd'], 7.0)
    """
    finish: dict[str, tuple[float, list[str]]] = {}

    def visit(name: str, seen: tuple[str, ...] = ()) -> tuple[float, list[str]]:
        if name in finish:
            return finish[name]
        if name in seen:
            raise ValueError(f"dependency cycle through {name!r}")
        duration, deps = nodes[name]
        best: tuple[float, list[str]] = (0.0, [])
        for dep in deps:
            candidate = visit(dep, (*seen, name))
            if candidate[0] > best[0]:
                best = candidate
        finish[name] = (best[0] + duration, [*best[1], name])
        return finish[name]

    total, path = max((visit(name) for name in nodes), key=lambda item: item[0], default=(0.0, []))
    return path, total


# --------------------------------------------------------------------------- facts


def read_peak_rss_mb(pid: int | str = "self") -> float | None:
    """Peak resident set size (``VmHWM``) of a process in MB (10^6 bytes), or None if unreadable."""
    return _status_mb(pid, "VmHWM")


def _rss_mb(pid: int | str = "self") -> float | None:
    return _status_mb(pid, "VmRSS")


def _status_mb(pid: int | str, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) * 1024 / 1e6, 1)
    except OSError:
        return None
    return None


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def _meminfo_mb(field: str) -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return 0.0


def machine_facts() -> dict[str, Any]:
    """Cores, CPU model, memory, thread settings and versions of what the figures depend on."""
    import torch

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    packages = ("audiomesh", "torch", "demucs", "bs-roformer", "msst", "numpy", "scipy", "librosa", "numba")
    for package in (*packages, "bottleneck", "grpcio"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_total_mb": round(_meminfo_mb("MemTotal")),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


# --------------------------------------------------------------------------- table


def _fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _split_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The split run's rows (none without ``--separation-workers`` >= 2)."""
    workers = report.get("separation_workers") or 1
    if workers < 2:
        return []
    diff = report.get("split_max_abs_diff")
    rows = [
        ("split: separation workers", f"{workers} ({'pinned' if report.get('split_pinned') else 'unpinned'})"),
        ("split: end to end", _fmt(report.get("split_e2e_s"), " s")),
        ("split / single e2e", _fmt(report.get("split_over_single"), "x", 3)),
        (
            "separation wall single / split",
            f"{_fmt(report.get('separation_wall_s'), ' s')} / {_fmt(report.get('split_separation_wall_s'), ' s')}",
        ),
        ("split: parts, stitch", f"{_fmt(report.get('split_parts'))}, {_fmt(report.get('split_stitch_s'), ' s')}"),
        ("split max abs diff vs raw", "—" if diff is None else f"{diff:.3g}"),
    ]
    cpus = report.get("split_worker_cpus") or {}
    allocators = report.get("split_worker_allocator") or {}
    for inst, mb in (report.get("split_worker_peak_rss_mb") or {}).items():
        rows.append(
            (f"  peak RSS {inst}", f"{_fmt(mb, ' MB', 0)}  (CPUs {cpus.get(inst)}, {allocators.get(inst)} malloc)")
        )
    return rows


def format_table(report: Mapping[str, Any]) -> str:
    """The report as aligned text lines."""
    model = report.get("model") or {}
    machine = report.get("machine") or {}
    rows: list[tuple[str, str]] = [
        ("song", f"{report['duration_s']:g} s stereo 44.1 kHz (synthesized)"),
        (
            "model",
            f"{model.get('name', '?')} ({model.get('parameters_m', '?')} M params, shifts={model.get('shifts')})"
            if "chunk_size" not in model
            else f"{model.get('name', '?')} ({model.get('parameters_m', '?')} M params, {model.get('chunk_s')} s "
            f"chunks, overlap {model.get('num_overlap')}, batch {model.get('batch_size')})",
        ),
        (
            "machine",
            f"{machine.get('usable_cpus')} CPUs ({machine.get('cpu_model') or '?'}), "
            f"torch {machine.get('versions', {}).get('torch')} with {machine.get('torch_threads')} threads",
        ),
        (f"raw {report.get('raw_reference') or 'separation'}", _fmt(report["raw_separation_s"], " s")),
        *(
            [("raw chunks, per chunk", f"{report['raw_chunks']}, {_fmt(report.get('raw_chunk_s'), ' s', 3)}")]
            if report.get("raw_chunks")
            else []
        ),
        ("raw peak RSS", _fmt(report["raw_separation_peak_rss_mb"], " MB", 0)),
        ("end to end (mesh)", _fmt(report["e2e_s"], " s")),
        ("e2e / raw", _fmt(report["e2e_over_raw"], "x", 3)),
        *(
            [("e2e max abs diff vs raw", f"{report['e2e_max_abs_diff']:.3g}")]
            if report.get("e2e_max_abs_diff") is not None
            else []
        ),
        *_split_rows(report),
        (
            "compiled apply_model",
            f"{_fmt(report['separation_compiled_s'], ' s')}  ({report['compile_backend'] or 'not run'})",
        ),
        ("compile cold / warm", f"{_fmt(report['compile_cold_s'], ' s')} / {_fmt(report['compile_warm_s'], ' s')}"),
        (
            "compiled max abs diff",
            "—" if report["compiled_max_abs_diff"] is None else f"{report['compiled_max_abs_diff']:.3g}",
        ),
        ("e2e compiled (mesh)", _fmt(report["e2e_compiled_s"], " s")),
        ("e2e compiled / raw", _fmt(report["e2e_over_raw_compiled"], "x", 3)),
        (
            "worker: chunk eager / compiled",
            "—"
            if not report["worker_chunk_s"]
            else f"{report['worker_chunk_s']['eager']:.2f} s / {report['worker_chunk_s']['compiled']:.2f} s, "
            f"serves {'compiled' if report['worker_serves_compiled'] else 'eager (faster)'}",
        ),
        ("critical path", f"{_fmt(report['critical_path_s'], ' s')}  ({' > '.join(report['critical_path'] or [])})"),
        ("overhead", _fmt(report["overhead_s"], " s", 3)),
        ("hpss signal", _fmt(report["hpss_signal_s"], " s stereo", 1)),
        ("hpss librosa", _fmt(report["hpss_reference_s"], " s")),
        ("hpss audiomesh", _fmt(report["hpss_s"], " s")),
        ("hpss speedup", _fmt(report["hpss_speedup"], "x")),
        ("hpss max abs diff", "—" if report["hpss_max_abs_diff"] is None else f"{report['hpss_max_abs_diff']:.3g}"),
        (
            "hpss peak RSS",
            f"librosa {_fmt(report['hpss_reference_peak_rss_mb'], ' MB', 0)}, "
            f"audiomesh {_fmt(report['hpss_peak_rss_mb'], ' MB', 0)}",
        ),
        ("mesh start", _fmt(report["mesh_start_s"], " s", 1)),
        ("separation malloc", _fmt(report.get("separation_allocator"))),
    ]
    for node, seconds in (report.get("stage_s") or {}).items():
        rows.append((f"  node {node}", _fmt(seconds, " s")))
    idle = report.get("service_idle_rss_mb") or {}
    for service, mb in (report.get("service_peak_rss_mb") or {}).items():
        rows.append((f"  peak RSS {service}", f"{_fmt(mb, ' MB', 0)}  (idle {_fmt(idle.get(service), ' MB', 0)})"))
    rows.append(("load average", f"{machine.get('loadavg_start')} -> {machine.get('loadavg_end')}"))
    for error in report.get("errors") or []:
        rows.append(("ERROR", error))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == _CHILD:
        print(json.dumps(_child(sys.argv[2], json.loads(sys.argv[3]))), flush=True)
    else:
        raise SystemExit(cmd_bench(add_arguments(argparse.ArgumentParser(prog="audiomesh bench")).parse_args()))
