"""Linear-layer kernels on this CPU: PyTorch's F.linear (MKL for fp32) against oneDNN, by row count.

    python benchmarks/linear_kernels.py            # twelve 3072x768 weights (gpt2-small's fc1), fp32 and bf16

Prints, for 1 row (a decode step) up to 1024 rows (a prefill), the median time of one pass over the
twelve weights with each kernel and weight layout (rows: (out, in) contiguous, nn.Linear's default;
columns: (in, out) contiguous), and for one row the weight bytes read per second. This is the
measurement behind ``optimize_for_inference``'s ``linear_kernel="auto"`` (see modelkit/onednn.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from modelkit.runtime.cpu import cpu_info
from modelkit.runtime.onednn import onednn_linear_available


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def one_pass(kernel: str, x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> None:
    """Every weight once, ``x @ wᵀ + b``, through ``kernel`` ("F.linear" or "oneDNN")."""
    for w, b in zip(weights, biases):
        if kernel == "oneDNN":
            torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        else:
            F.linear(x, w, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--out-features", type=int, default=3072)
    parser.add_argument("--in-features", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not onednn_linear_available():
        raise SystemExit("this PyTorch build has no oneDNN linear op")
    info = cpu_info()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {info.model}: PyTorch kernels "
          f"{info.aten_capability}, oneDNN up to {info.onednn_isa}; {args.layers} weights of "
          f"{args.out_features}x{args.in_features}")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        rows_w = [torch.randn(args.out_features, args.in_features, generator=gen).to(dtype) for _ in range(args.layers)]
        layouts = {"rows": rows_w, "columns": [w.t().contiguous().t() for w in rows_w]}
        biases = [torch.randn(args.out_features, generator=gen).to(dtype) for _ in range(args.layers)]
        nbytes = sum(w.numel() * w.element_size() for w in rows_w)
        print(f"\n{dtype}: ms per pass (GB/s of weights at 1 row)")
        print(f"{'rows':>6} | " + " | ".join(f"{k:>17}" for k in ("F.linear rows", "F.linear columns",
                                                                     "oneDNN rows", "oneDNN columns")))
        with torch.inference_mode():
            for n in (1, 4, 16, 64, 256, 1024):
                x = torch.randn(n, args.in_features, generator=gen).to(dtype)
                cells = []
                for kernel in ("F.linear", "oneDNN"):
                    for layout, weights in layouts.items():
                        if kernel == "oneDNN" and not onednn_linear_available(dtype):
                            cells.append("n/a (no kernel)")  # e.g. bf16 on an AVX2 CPU: modelkit info --device
                            continue
                        if dtype != torch.float32 and layout == "columns" and not onednn_linear_available(dtype):
                            cells.append("skipped (>10x slower)")  # PyTorch's generic bf16 kernel, strided
                            continue
                        ms = median_ms(lambda ws=weights, x=x, k=kernel, bs=biases: one_pass(k, x, ws, bs), args.repeats)
                        cells.append(f"{ms:8.2f}" + (f" ({nbytes / ms / 1e6:4.1f})" if n == 1 else " " * 7))
                print(f"{n:>6} | " + " | ".join(f"{c:>17}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
