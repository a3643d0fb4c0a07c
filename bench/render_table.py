"""Render `audiomesh bench --json` reports as the Markdown table of BENCHMARKS.md.

Usage: ``python bench/render_table.py out_30.json out_180.json out_1200.json`` (one column each).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROWS: list[tuple[str, str, str]] = [
    # (label, key or dotted path, format)
    ("raw `apply_model` (s)", "raw_separation_s", "{:.1f}"),
    ("raw peak RSS (MB)", "raw_separation_peak_rss_mb", "{:.0f}"),
    ("**end to end through the mesh (s)**", "e2e_s", "**{:.1f}**"),
    ("**e2e / raw**", "e2e_over_raw", "**{:.2f}**"),
    ("compiled `apply_model` (s, Inductor)", "separation_compiled_s", "{:.1f}"),
    ("compiled max abs diff from raw", "compiled_max_abs_diff", "{:.2g}"),
    ("compile cold / warm cache (s)", "compile", "{}"),
    ("**end to end, compiled worker (s)**", "e2e_compiled_s", "**{:.1f}**"),
    ("**e2e compiled / raw**", "e2e_over_raw_compiled", "**{:.2f}**"),
    ("critical path compute (s)", "critical_path_s", "{:.1f}"),
    ("overhead = e2e − critical path (s)", "overhead_s", "{:.2f}"),
    ("node decode (s)", "stage_s.decode", "{:.1f}"),
    ("node separation (s)", "stage_s.separation", "{:.1f}"),
    ("node hpss:mix (s)", "stage_s.hpss:mix", "{:.1f}"),
    ("node hpss:drums / bass / other (s)", "stems", "{}"),
    ("node composite (s)", "stage_s.composite", "{:.1f}"),
    ("node normalize (s)", "stage_s.normalize", "{:.1f}"),
    ("HPSS signal (s of stereo)", "hpss_signal_s", "{:.0f}"),
    ("HPSS librosa (s)", "hpss_reference_s", "{:.2f}"),
    ("HPSS audiomesh (s)", "hpss_s", "{:.2f}"),
    ("**HPSS speedup**", "hpss_speedup", "**{:.1f}x**"),
    ("HPSS max abs diff", "hpss_max_abs_diff", "{:.3g}"),
    ("HPSS peak RSS librosa / audiomesh (MB)", "hpss_rss", "{}"),
    ("**separation worker peak RSS (MB)**", "separation_peak_rss_mb", "**{:.0f}**"),
    ("hpss worker peak RSS (MB)", "service_peak_rss_mb.hpss", "{:.0f}"),
    ("composite worker peak RSS (MB)", "service_peak_rss_mb.composite", "{:.0f}"),
    ("normalize worker peak RSS (MB)", "service_peak_rss_mb.normalize", "{:.0f}"),
    ("orchestrator peak RSS (MB)", "service_peak_rss_mb.orchestrator", "{:.0f}"),
    ("load average at start → end", "load", "{}"),
]


def value(report: dict[str, Any], key: str) -> Any:
    if key == "stems":
        stages = report.get("stage_s") or {}
        found = [stages.get(f"hpss:{s}") for s in ("drums", "bass", "other")]
        return " / ".join("—" if v is None else f"{v:.1f}" for v in found)
    if key == "hpss_rss":
        ref, ours = report.get("hpss_reference_peak_rss_mb"), report.get("hpss_peak_rss_mb")
        return " / ".join("—" if v is None else f"{v:.0f}" for v in (ref, ours))
    if key == "compile":
        cold, warm = report.get("compile_cold_s"), report.get("compile_warm_s")
        if cold is None and warm is None:
            return None
        return " / ".join("—" if v is None else f"{v:.0f}" for v in (cold, warm))
    if key == "load":
        machine = report.get("machine") or {}
        start, end = machine.get("loadavg_start"), machine.get("loadavg_end")
        return f"{start[0] if start else '—'} → {end[0] if end else '—'}"
    node: Any = report
    for part in key.split(".", 1) if key.startswith(("stage_s.", "service_peak_rss_mb.")) else [key]:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def render(reports: list[dict[str, Any]]) -> str:
    header = "| figure | " + " | ".join(f"{r['duration_s']:g} s song" for r in reports) + " |"
    lines = [header, "|---|" + "---:|" * len(reports)]
    for label, key, fmt in ROWS:
        cells = []
        for report in reports:
            v = value(report, key)
            cells.append("—" if v is None else fmt.format(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    args = parser.parse_args()
    print(render([json.loads(p.read_text()) for p in args.reports]))


if __name__ == "__main__":
    main()
