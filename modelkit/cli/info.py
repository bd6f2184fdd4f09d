"""``modelkit info CONFIG|CHECKPOINT``: parameters, memory and a per-module summary, built on the meta device.

Given a modelkit checkpoint (a safetensors file) it reads only the file's header (spec and metadata),
never the tensor data, and adds what the checkpoint records.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path
from typing import Any

import torch

from ..builder import build_model
from ..weights.checkpoint import CheckpointInfo, is_checkpoint_file, read_checkpoint
from ..introspect import count_parameters, summarize
from ..spec import ComponentSpec, ModelSpec, load_spec
from ._table import format_table


def add_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="parameter counts, memory and module summary of a spec; --device: this CPU's kernels",
                       description="Validate a spec, build it on the meta device (no weights are "
                                   "allocated) and print its parameter counts, memory and modules. With "
                                   "--device, print what modelkit detected about this CPU (instruction sets, "
                                   "PyTorch's and oneDNN's kernel level) and which kernel each speed option "
                                   "(--dtype, --quantize, --native) will use here. MODELKIT_CPU_CAPABILITY="
                                   "default|avx2|avx512 makes modelkit run as on a CPU with at most that "
                                   "instruction set (see modelkit.runtime.cpu).")
    p.add_argument("config", nargs="?",
                   help="a JSON spec file, or a modelkit checkpoint (.safetensors; only its header is read)")
    p.add_argument("--device", action="store_true", help="this CPU's instruction sets and the kernels each speed option uses")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=run, parser=p)


def describe_component(ref: ComponentSpec) -> str:
    """``name(param=value, ...)`` for a component reference, nested ones included."""
    if not ref.params:
        return ref.type
    inner = ", ".join(f"{k}={describe_component(v) if isinstance(v, ComponentSpec) else v}"
                      for k, v in ref.params.items())
    return f"{ref.type}({inner})"


def info_report(spec: ModelSpec) -> dict[str, Any]:
    """Figures for a spec, computed on the meta device."""
    model = build_model(spec, device="meta")
    count = count_parameters(model)
    return {
        "name": spec.name,
        "parameters": count.total,
        "parameters_without_head": count.without_head,
        "tied_embeddings": count.tied,
        "memory_mb": {"float32": round(count.megabytes(torch.float32), 2),
                      "bfloat16": round(count.megabytes(torch.bfloat16), 2)},
        "modules": [{"name": r.name.strip(), "type": r.type, "params": r.params} for r in summarize(model)],
        "_rows": summarize(model),
    }


def checkpoint_report(info: CheckpointInfo) -> dict[str, Any]:
    """What a checkpoint's header records, as JSON-ready data."""
    return {
        "file_bytes": info.file_size,
        "format_version": info.format_version,
        "modelkit_version": info.modelkit_version,
        "tensors": len(info.tensors),
        "stored_elements": info.n_parameters,
        "dtypes": info.dtypes,
        "tied": info.tied,
        "plugins": info.plugins,
        "tokenizer": info.tokenizer.model_dump(exclude_none=True),
        "metadata": info.user_metadata,
    }


def describe_tokenizer(record: dict[str, Any]) -> str:
    """One line for a checkpoint's tokenizer record."""
    if record["type"] == "gpt2":
        return "gpt2 (built-in)"
    if record["type"] == "none":
        return "none recorded (give generate --tokenizer)"
    eos = record.get("eos_token_id")
    return (f"tokenizer.json stored ({record['size']:,} bytes, sha256 {record['sha256'][:16]}..., "
            f"end-of-text id {eos if eos is not None else 'none'})")


def device_report() -> dict[str, Any]:
    """What ``modelkit info --device`` prints: the CPU as detected and the kernel of each speed option."""
    from ..runtime.cpu import cpu_info
    from ..runtime.optimize import kernel_report

    return {"cpu": cpu_info().to_dict(), "kernels": dict(kernel_report())}


def print_device_report(report: dict[str, Any]) -> None:
    cpu = report["cpu"]
    print(f"CPU:                {cpu['model']} ({cpu['machine']}), {cpu['threads']} torch threads")
    print(f"instruction sets:   {' '.join(cpu['flags']) or 'unknown (no /proc/cpuinfo)'}")
    print(f"PyTorch kernels:    {cpu['aten_capability']} (torch.backends.cpu.get_cpu_capability())")
    print(f"oneDNN kernels:     up to {cpu['onednn_isa'] or 'unknown'}")
    forced = ", ".join(f"{k}={v}" for k, v in cpu["env"].items())
    print(f"forced by:          {forced or 'nothing (MODELKIT_CPU_CAPABILITY, ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA unset)'}")
    print()
    print(format_table(["speed option", "kernel on this CPU"], list(report["kernels"].items()), numeric=[False, False]))


def run(args: argparse.Namespace) -> int:
    if args.config is None and not args.device:
        args.parser.error("give a spec or checkpoint to describe (CONFIG), or --device")
    if args.device:
        report = device_report()
        if args.json and args.config is None:
            print(json.dumps(report, indent=2))
            return 0
        if not args.json:
            print_device_report(report)
        if args.config is None:
            return 0
        if not args.json:
            print()
    return _run_config(args)


def _is_regular_file(path: str) -> bool:
    """Whether ``path`` is a regular file; sniffing anything else for a checkpoint header could block
    (a FIFO) or read without end (``/dev/zero``), so the spec loader gets it and refuses it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _run_config(args: argparse.Namespace) -> int:
    is_ckpt = Path(args.config).suffix == ".safetensors" or (_is_regular_file(args.config)
                                                             and is_checkpoint_file(args.config))
    ckpt = read_checkpoint(args.config) if is_ckpt else None
    spec = ckpt.spec if ckpt is not None else load_spec(args.config)
    report = info_report(spec)
    rows = report.pop("_rows")
    if ckpt is not None:
        report["checkpoint"] = checkpoint_report(ckpt)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{spec.name}  ({args.config})")
    if ckpt is not None:
        c = report["checkpoint"]
        plugins = ", ".join(f"{p['type']} ({p['distribution']}=={p['version']})" if p["distribution"]
                            else f"{p['type']} ({p['module']})" for p in c["plugins"]) or "none"
        print(f"  checkpoint:  {c['file_bytes']:,} bytes, format {c['format_version']}, written by modelkit "
              f"{c['modelkit_version']}, {c['tensors']} tensors ({', '.join(c['dtypes'])})")
        print(f"  plugins:     {plugins}")
        print(f"  tokenizer:   {describe_tokenizer(c['tokenizer'])}")
        if c["metadata"]:
            print(f"  metadata:    {', '.join(f'{k}={v}' for k, v in c['metadata'].items())}")
    print(f"  sizes:       vocab {spec.vocab_size}, context {spec.context_length}, emb {spec.emb_dim}, "
          f"heads {spec.n_heads}, layers {spec.n_layers}, dropout {spec.drop_rate}, qkv_bias {spec.qkv_bias}")
    for slot in ("positional", "norm", "attention", "feedforward", "block"):
        print(f"  {slot + ':':<12} {describe_component(getattr(spec, slot))}")
    print()
    print(f"parameters:                    {report['parameters']:>15,}")
    label = "(head tied to tok_emb)" if report["tied_embeddings"] else "excluding the output head"
    print(f"  {label:<28}{report['parameters_without_head']:>15,}")
    print(f"memory (float32):              {report['memory_mb']['float32']:>12.2f} MB")
    print(f"memory (bfloat16):             {report['memory_mb']['bfloat16']:>12.2f} MB")
    print("  (parameters only; 1 MB = 2**20 bytes, as in the book)")
    print()
    print(format_table(["module", "type", "parameters"], [(r.name, r.type, f"{r.params:,}") for r in rows],
                       numeric=[False, False, True]))
    return 0
