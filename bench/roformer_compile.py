"""Does ``torch.compile`` make a RoFormer's forward faster on CPU? (issue #20; BENCHMARKS.md,
*torch.compile for RoFormer*).

For one configuration (``--model``, as ``audiomesh bench``: the released sizes with seeded random
weights, or ``tiny_roformer``), one chunk of the config's ``chunk_size`` of random stereo audio,
all in one child process, in this order:

1. eager forward, best of ``--runs`` (``torch.inference_mode``, as ``RoformerModel`` runs it);
2. ``torch.compile(network, backend=--backend)`` and its first call on the chunk (``compile_cold_s``:
   Dynamo + the backend, with an empty Inductor cache in a temp folder);
3. compiled forward, best of ``--runs``; max abs diff of its output against eager's;
4. eager again, best of ``--runs`` (the machine's load may have changed): ``speedup`` is the
   better eager time over the compiled one.

Graph breaks and graphs come from ``torch._dynamo.utils.counters`` (no second trace).

Peak RSS (``VmHWM``) is read after eager and at the end. The child writes its figures after each
step, so a run stopped by ``--timeout`` (whole run, default 900 s) still reports what it measured,
and names the step it was in.

Usage: ``python bench/roformer_compile.py --model mel_roformer --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def child(model: str, backend: str, runs: int, out: Path) -> None:
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    from audiomesh.bench import ROFORMER_MODELS, read_peak_rss_mb
    from audiomesh.separation.roformer_model import build_network, config_from_mapping

    report: dict[str, Any] = {"step": "build"}

    def save(step: str) -> None:
        report["step"] = step
        out.write_text(json.dumps(report))

    config = config_from_mapping(ROFORMER_MODELS[model](), origin=f"bench {model}")
    network = build_network(config, seed=0)
    report.update(
        network=config.network,
        description=config.describe(),
        parameters=sum(p.numel() for p in network.parameters()),
        chunk_size=config.chunk_size,
        chunk_s=round(config.chunk_size / config.sample_rate, 3),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
    )
    rng = np.random.default_rng(0)
    chunk = torch.from_numpy((rng.standard_normal((1, config.channels, config.chunk_size)) * 0.1).astype(np.float32))
    save("eager")

    def best(fn: Any) -> tuple[float, list[float], torch.Tensor]:
        times, result = [], None
        for _ in range(runs):
            started = time.perf_counter()
            with torch.inference_mode():
                result = fn(chunk)
            times.append(time.perf_counter() - started)
        assert result is not None
        return min(times), [round(t, 3) for t in times], result

    eager_s, report["eager_runs_s"], reference = best(network)
    report["eager_s"] = round(eager_s, 3)
    report["eager_peak_rss_mb"] = read_peak_rss_mb()
    save("compile")

    compiled = torch.compile(network, backend=backend)
    started = time.perf_counter()
    with torch.inference_mode():
        first = compiled(chunk)
    report["compile_cold_s"] = round(time.perf_counter() - started, 1)
    report["graph_breaks"] = sum(counters["graph_break"].values())
    report["graph_break_reasons"] = len(counters["graph_break"])
    report["graphs"] = counters["stats"].get("unique_graphs")
    report["graph_break_top"] = [reason[:200] for reason, _ in counters["graph_break"].most_common(5)]
    report["dynamo_stats_after_compile"] = dict(counters["stats"])
    report["first_call_max_abs_diff"] = float((first - reference).abs().max())
    save("compiled")

    compiled_s, report["compiled_runs_s"], result = best(compiled)
    report["compiled_s"] = round(compiled_s, 3)
    report["max_abs_diff"] = float((result - reference).abs().max())
    # Unchanged from after the compile: the timed calls did not recompile.
    report["dynamo_stats_end"] = dict(counters["stats"])
    report["speedup"] = round(eager_s / compiled_s, 3)
    save("eager_again")

    # Eager once more after the compiled runs: on a shared machine the load can change in between.
    eager_again_s, report["eager_again_runs_s"], _ = best(network)
    report["eager_again_s"] = round(eager_again_s, 3)
    report["speedup"] = round(min(eager_s, eager_again_s) / compiled_s, 3)
    report["peak_rss_mb"] = read_peak_rss_mb()
    save("done")


def main() -> int:
    parser = argparse.ArgumentParser(description="torch.compile vs eager on one RoFormer chunk")
    parser.add_argument("--model", default="mel_roformer", choices=["mel_roformer", "bs_roformer", "tiny_roformer"])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick check)")
    parser.add_argument("--runs", type=int, default=2, help="timed forwards each way (best is reported)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole measurement")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.backend, args.runs, args.child)
        return 0

    with tempfile.TemporaryDirectory(prefix="roformer_compile_") as tmp:
        partial = Path(tmp) / "report.json"
        # An empty Inductor/Triton cache: the compile is cold.
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        command = [sys.executable, __file__, "--model", args.model, "--backend", args.backend]
        command += ["--runs", str(args.runs), "--child", str(partial)]
        started = time.perf_counter()
        error = None
        try:
            subprocess.run(command, env=env, timeout=args.timeout, check=True)
        except subprocess.TimeoutExpired:
            error = f"timed out after {args.timeout:.0f} s"
        except subprocess.CalledProcessError as failed:
            error = f"child exited {failed.returncode}"
        report: dict[str, Any] = json.loads(partial.read_text()) if partial.exists() else {"step": "build"}
    step = report.pop("step")
    if error is not None:
        report["error"] = f"{error} during {step}"
    report.update(
        model=args.model,
        backend=args.backend,
        runs=args.runs,
        timeout_s=args.timeout,
        wall_s=round(time.perf_counter() - started, 1),
        machine={"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
    )
    rows = [
        ("parameters", "parameters", "{:,}"),
        ("chunk (s)", "chunk_s", "{}"),
        ("eager forward, best (s)", "eager_s", "{:.2f}"),
        ("eager forward again, best (s)", "eager_again_s", "{:.2f}"),
        (f"{args.backend} cold compile + first call (s)", "compile_cold_s", "{:.1f}"),
        ("compiled forward, best (s)", "compiled_s", "{:.2f}"),
        ("best eager / compiled", "speedup", "{:.2f}"),
        ("graph breaks (distinct reasons)", "graph_breaks", "{}"),
        ("graphs compiled", "graphs", "{}"),
        ("compiled vs eager: max abs diff", "max_abs_diff", "{:.2g}"),
        ("peak RSS eager / end (MB)", "peak_rss_mb", "{}"),
    ]
    print(f"| figure | {args.model} |\n|---|---:|")
    for label, key, fmt in rows:
        value = report.get(key)
        if key == "graph_breaks" and value is not None:
            text = f"{value} ({report.get('graph_break_reasons')})"
        elif key == "peak_rss_mb":
            text = f"{report.get('eager_peak_rss_mb')} / {value}"
        else:
            text = "—" if value is None else fmt.format(value)
        print(f"| {label} | {text} |")
    if "error" in report:
        print(f"error: {report['error']}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if "error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
