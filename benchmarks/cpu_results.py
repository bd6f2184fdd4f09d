"""Benchmark results kept per kind of CPU: ``results/<kind>.md`` (one full run of peers.py) and
``results/<kind>.json`` (its summary), and ``RESULTS.md``, the index rendered from every summary.

Speed choices that are right on one CPU can be wrong on another (oneDNN against MKL, the weight
layout, bf16 kernels), so a run on a new kind of machine adds a section instead of replacing the
one measured elsewhere. The kind is the instruction-set level that decides the kernels plus the
processor's name, e.g. ``avx2-amd-epyc``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from modelkit.runtime.cpu import CPUInfo

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
FOLDER = HERE / "results"


def isa_level(info: CPUInfo) -> str:
    """The level that decides modelkit's CPU kernels: ``amx``, ``avx512-bf16``, ``avx512``, ``avx2`` or
    ``sse`` (from the instruction sets oneDNN may use here)."""
    isa = info.onednn_isa or ""
    if "amx" in isa:
        return "amx"
    if isa.startswith("avx512_core") and isa != "avx512_core" and isa != "avx512_core_vnni":
        return "avx512-bf16"
    if isa.startswith("avx512"):
        return "avx512"
    return "avx2" if isa.startswith("avx2") else "sse"


def cpu_kind(info: CPUInfo) -> str:
    """``<level>-<processor>``, a file-name-safe key for one kind of CPU."""
    name = re.sub(r"[^a-z0-9]+", "-", info.model.lower()).strip("-")
    return f"{isa_level(info)}-{name or 'cpu'}"


def write_run(info: CPUInfo, report_lines: list[str], summary: dict[str, Any]) -> Path:
    """Store one full run for this CPU kind and re-render ``RESULTS.md``; returns the report's path."""
    FOLDER.mkdir(exist_ok=True)
    kind = cpu_kind(info)
    report = FOLDER / f"{kind}.md"
    report.write_text("\n".join(report_lines) + "\n")
    data = {"kind": kind, "cpu": info.to_dict(), **summary}
    (FOLDER / f"{kind}.json").write_text(json.dumps(data, indent=2) + "\n")
    render_index()
    return report


def _ratio(value: float | None) -> str:
    return "not run" if value is None else f"{value:.2f}x"


def render_index() -> None:
    """``RESULTS.md``: one section per CPU kind measured, from ``results/*.json``, newest first."""
    runs = sorted((json.loads(p.read_text()) for p in FOLDER.glob("*.json")), key=lambda d: d["date"], reverse=True)
    lines = ["# Benchmark results, per kind of CPU", "",
             "Each section is one full run of `python benchmarks/peers.py` on that kind of machine (all figures "
             "of a run from that run, in interleaved rounds). Ratios are transformers' time / modelkit's "
             "(> 1: modelkit faster), same weights, modelkit as `modelkit generate` and `modelkit train` run it "
             "there. The defaults a CPU gets are decided by what it can do (`modelkit info --device` prints "
             "them); the full tables of each run are in the linked report.", ""]
    for run in runs:
        cpu, ratios = run["cpu"], run["ratios"]
        lines += [f"## {run['title']}", "",
                  f"- CPU: {cpu['model']}, {run['cores']} cores; instruction sets: {' '.join(cpu['flags'])}",
                  f"- PyTorch kernels {cpu['aten_capability']}, oneDNN up to {cpu['onednn_isa']}; "
                  f"torch {run['torch']}, transformers {run['transformers']}; {run['date']}",
                  f"- default path chosen: {run['default_path']}",
                  f"- modelkit vs transformers: prefill 1x1024 {_ratio(ratios.get('prefill 1x1024'))}, "
                  f"prefill 8x128 {_ratio(ratios.get('prefill 8x128'))}, decode {_ratio(ratios.get('decode'))}, "
                  f"training step {_ratio(ratios.get('training step'))}",
                  f"- full report: [results/{run['kind']}.md](results/{run['kind']}.md)"
                  + (f" ({run['note']})" if run.get("note") else ""), ""]
    RESULTS.write_text("\n".join(lines))
