"""Which Linear kernel and weight layout are fastest on this CPU, end to end: the measurement behind
``optimize_for_inference``'s ``linear_kernel="auto"`` and ``weight_layout="auto"`` per CPU level.

    python benchmarks/cpu_defaults.py                 # gpt2-small, float32, ~3-5 min on 2 cores
    python benchmarks/cpu_defaults.py --rounds 3      # quicker, noisier

Builds gpt2-small once and times, in interleaved rounds (so a noisy neighbour hits every candidate
alike), each candidate (kernel x layout) for a decode (ms per token: 64 greedy tokens after a
16-token prompt, KV cache) and a prefill (1x512 tokens). Prints the medians, each candidate's ratio
to what ``auto`` picks here, and the auto choice. The numbers of every kind of CPU measured are in
``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from modelkit import build_model, generate
from modelkit.runtime.cpu import cpu_info
from modelkit.runtime.optimize import optimize_for_inference

SMALL = Path(__file__).resolve().parents[1] / "configs" / "gpt2-small.json"
CANDIDATES = [("onednn", "rows"), ("onednn", "columns"), ("aten", "rows"), ("aten", "columns")]


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, called in alternating order for ``rounds`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=512)
    args = parser.parse_args()
    info = cpu_info()
    print(f"{info.model}: PyTorch kernels {info.aten_capability}, oneDNN up to {info.onednn_isa}, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}")
    torch.manual_seed(123)
    base = build_model(SMALL).eval()
    models = {f"{k}, {layout}": optimize_for_inference(copy.deepcopy(base), linear_kernel=k, weight_layout=layout)
              for k, layout in CANDIDATES}
    auto = optimize_for_inference(base)
    w = auto.trf_blocks[0].ff.layers[2].weight
    auto_name = (f"{'onednn' if type(auto.out_head).__name__.startswith('OneDNN') else 'aten'}, "
                 f"{'rows' if w.is_contiguous() else 'columns'}")
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
    long = torch.randint(0, 50257, (1, args.prefill), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        decode = interleaved({n: (lambda m=m: generate(m, prompt, args.new_tokens)) for n, m in models.items()},
                             args.rounds)
        prefill = interleaved({n: (lambda m=m: m(long)) for n, m in models.items()}, args.rounds)
    print(f"\n{'kernel, layout':<18} {'decode ms/token':>16} {'prefill 1x' + str(args.prefill):>16}   (ratio to auto)")
    for name in models:
        d, p = decode[name] / args.new_tokens * 1e3, prefill[name] * 1e3
        print(f"{name:<18} {d:9.2f} ({decode[name] / decode[auto_name]:.2f}) "
              f"{p:9.1f} ({prefill[name] / prefill[auto_name]:.2f})")
    print(f"\nauto picks here: {auto_name}")


if __name__ == "__main__":
    main()
