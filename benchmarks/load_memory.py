"""Load-memory benchmark: time and peak RSS of ``load_checkpoint`` on a gpt2-xl-sized checkpoint.

    python benchmarks/load_memory.py [--config configs/pretrained/gpt2-xl.json] [--dir /tmp] [--keep]

1. Writes a random-weight modelkit checkpoint for the config (gpt2-xl in float32: about 6.2 GB)
   tensor by tensor, so at most one tensor is in memory while writing: the safetensors header
   (with the metadata ``save_checkpoint`` would write for that model) is computed from a
   meta-device model, then each tensor is drawn N(0, 0.02) and appended.
2. In a fresh Python process, measures the resident set after ``import modelkit, torch`` (baseline),
   then times ``load_checkpoint`` and reads the peak RSS (VmHWM) after loading, after touching every
   weight (a sum over all parameters, which pages in everything that is memory-mapped) and after one
   forward pass.
3. Prints file size, load time, peak RSS and the ratio peak RSS / file size (target <= 1.3), then
   deletes the checkpoint (unless --keep).

Figures depend on the machine and on what else runs on it; they are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3

CHILD = r"""
import json, sys, time

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

import torch, modelkit
from modelkit.weights.checkpoint import load_checkpoint
torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
out = {"baseline_rss": status("VmRSS")}
t = time.perf_counter()
model = load_checkpoint(sys.argv[1])
out["load_s"] = time.perf_counter() - t
out["rss_after_load"], out["peak_after_load"] = status("VmRSS"), status("VmHWM")
t = time.perf_counter()
with torch.no_grad():
    total = sum(float(p.sum()) for p in model.parameters())
out["touch_s"] = time.perf_counter() - t
out["rss_after_touch"], out["peak_after_touch"] = status("VmRSS"), status("VmHWM")
with torch.no_grad():
    logits = model(torch.arange(8)[None, :])
out["forward_ok"] = bool(torch.isfinite(logits).all())
out["peak_after_forward"] = status("VmHWM")
out["parameters"] = sum(p.numel() for p in model.parameters())
out["dtype"] = str(model.tok_emb.weight.dtype)
out["tied"] = model.out_head.weight is model.tok_emb.weight
print(json.dumps(out))
"""


def write_random_checkpoint(config: str, path: Path, seed: int = 0) -> tuple[int, float]:
    """Write a random-weight checkpoint of ``config`` holding one tensor in memory at a time.

    Returns (bytes written, seconds). The header and metadata are those of ``save_checkpoint``
    for the same model; the file is read back by the safetensors library when loaded.
    """
    import torch

    from modelkit import build_model
    from modelkit.weights.checkpoint import checkpoint_metadata, tied_names

    t0 = time.perf_counter()
    model = build_model(config, device="meta")
    aliases = tied_names(model)
    entries = [(n, t) for n, t in model.state_dict(keep_vars=True).items() if n not in aliases]
    header: dict[str, object] = {"__metadata__": checkpoint_metadata(model)}
    offset = 0
    for name, t in entries:
        nbytes = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for _, t in entries:
            data = torch.empty(t.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
            fh.write(memoryview(data.numpy()).cast("B"))
            del data
    os.replace(tmp, path)
    return path.stat().st_size, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    repo = Path(__file__).resolve().parent.parent
    ap.add_argument("--config", default=str(repo / "configs" / "pretrained" / "gpt2-xl.json"))
    ap.add_argument("--dir", default="/tmp", help="where to write the checkpoint")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint file")
    args = ap.parse_args()

    import torch

    from modelkit import build_model
    from modelkit.introspect import count_parameters

    need = count_parameters(build_model(args.config, device="meta")).total * 4
    free = shutil.disk_usage(args.dir).free
    print(f"config {args.config}: {need / GIB:.2f} GiB of float32 weights; {free / GIB:.1f} GiB free in {args.dir}")
    if free < need * 1.1:
        print("not enough disk space", file=sys.stderr)
        return 1
    path = Path(args.dir) / "modelkit-load-memory-bench.safetensors"
    try:
        size, secs = write_random_checkpoint(args.config, path)
        print(f"wrote {path}: {size:,} bytes ({size / GIB:.2f} GiB) in {secs:.1f} s")
        os.sync()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".partial").unlink(missing_ok=True)
    base = r["baseline_rss"]
    peak = max(r["peak_after_load"], r["peak_after_touch"], r["peak_after_forward"])

    def g(n: float) -> str:
        return f"{n / GIB:6.2f} GiB"

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"parameters loaded:            {r['parameters']:,} ({r['dtype']}, head tied: {r['tied']})")
    print(f"file size:                    {g(size)}")
    print(f"load_checkpoint time:         {r['load_s']:6.2f} s")
    print(f"baseline RSS (import only):   {g(base)}")
    print(f"peak RSS after load:          {g(r['peak_after_load'])}")
    print(f"peak RSS after touching all:  {g(r['peak_after_touch'])}  (summing every weight took {r['touch_s']:.1f} s)")
    print(f"peak RSS after a forward:     {g(r['peak_after_forward'])}  (logits finite: {r['forward_ok']})")
    print(f"ratio peak RSS / file size:   {peak / size:.3f}   (target <= 1.3)")
    print(f"ratio (peak - baseline)/size: {(peak - base) / size:.3f}")
    if not args.keep:
        print(f"deleted {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
