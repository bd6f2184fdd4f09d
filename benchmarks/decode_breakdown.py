"""Where a decoded token's time goes, against the weight-read bound.

    python benchmarks/decode_breakdown.py [--rounds 8] [--tokens 200] [--spec configs/gpt2-small.json]

``benchmarks/peers.py`` reports decoding as a share of the weight-read bound (the time to read every
Linear weight once in batch-1 matmuls). This script says what the rest of the time is, so that work
on decoding speed starts from figures. It times, per token, the optimised model's greedy ``generate``
(``optimize_for_inference``, KV cache, 16-token prompt) and the bound pass (oneDNN, columns, q/k/v
stacked: the arrangement that usually wins in peers.py), in interleaved rounds, and splits each
into the time spent inside the oneDNN Linear op, inside ``F.scaled_dot_product_attention`` and
everything else (the other ops and the Python between them). The split comes from a clock read
around each of those calls (``time.perf_counter``, ~0.1 µs), not from ``torch.profiler``, whose own
per-op cost is larger than the small ops it would measure.

It does the same for the model at a tiny width (emb_dim 4 x n_heads, vocab 256; same depth, heads,
prompt and tokens), where every cache stays warm: the difference between the two is what a decode
step pays because each layer's weights have just streamed through the caches (its KV cache, the
small tensors and the code between the matmuls are read cold). Last, the budget: 90% of the bound
leaves ``bound / 0.9 - Linear time`` for everything but the matmuls. Where the native decode step
(:mod:`modelkit.runtime.native`) can be built, the same decode through it is a third run (its kernels are
called from C++, so only its wall time is shown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from peers import weight_read_pass

from modelkit import GPTModel, generate
from modelkit.runtime.native import NativeBuildError
from modelkit.runtime.optimize import optimize_for_inference

PARTS = ("Linear", "attention", "other")
NATIVE = "native decode"


@contextmanager
def clocked_kernels(spent: dict[str, float]) -> Iterator[None]:
    """Within the block, ``spent["Linear"]`` and ``spent["attention"]`` accumulate the seconds spent in
    ``torch.ops.mkldnn._linear_pointwise`` and ``F.scaled_dot_product_attention`` (looked up at call
    or step-build time by modelkit and by :func:`peers.weight_read_pass`)."""
    linear, attention = torch.ops.mkldnn._linear_pointwise, F.scaled_dot_product_attention
    clock = time.perf_counter

    def timed_linear(*args: object) -> torch.Tensor:
        start = clock()
        out = linear(*args)
        spent["Linear"] += clock() - start
        return out

    def timed_attention(*args: object, **kwargs: object) -> torch.Tensor:
        start = clock()
        out = attention(*args, **kwargs)
        spent["attention"] += clock() - start
        return out

    torch.ops.mkldnn._linear_pointwise = timed_linear
    F.scaled_dot_product_attention = timed_attention
    try:
        yield
    finally:
        torch.ops.mkldnn._linear_pointwise = linear
        F.scaled_dot_product_attention = attention


def split_rounds(runs: dict[str, Callable[[], object]], rounds: int, tokens: int) -> dict[str, list[dict[str, float]]]:
    """Per run, per round: ms per token in total ("wall") and in each of :data:`PARTS`. The runs are
    built inside :func:`clocked_kernels` by the caller; rounds alternate the order."""
    spent = {"Linear": 0.0, "attention": 0.0}
    out: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    with clocked_kernels(spent):
        built = {name: make() for name, make in runs.items()}  # steps and passes take the clocked ops
        for run in built.values():
            run()  # warm-up
        for r in range(rounds):
            for name in (list(built) if r % 2 == 0 else list(reversed(built))):
                spent.update(Linear=0.0, attention=0.0)
                start = time.perf_counter()
                built[name]()
                wall = time.perf_counter() - start
                ms = {"wall": wall, "Linear": spent["Linear"], "attention": spent["attention"]}
                ms["other"] = wall - ms["Linear"] - ms["attention"]
                out[name].append({k: v / tokens * 1e3 for k, v in ms.items()})
    return out


def tiny_copy_of(spec_path: str) -> str:
    """A spec file with ``spec_path``'s depth, heads and layout at emb_dim 4 x n_heads and vocab 256."""
    spec = json.loads(Path(spec_path).read_text())
    spec.update(emb_dim=4 * spec["n_heads"], vocab_size=256)
    spec.pop("name", None)
    path = Path(tempfile.mkdtemp()) / "tiny.json"
    path.write_text(json.dumps(spec))
    return str(path)


def measure(spec_path: str, rounds: int, tokens: int) -> tuple[dict[str, list[dict[str, float]]], int]:
    torch.manual_seed(123)
    model = optimize_for_inference(GPTModel(spec_path))
    prompt = torch.randint(0, model.spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7))
    nbytes = 0

    def bound() -> Callable[[], object]:
        nonlocal nbytes
        one_pass, nbytes = weight_read_pass(model, "columns", "oneDNN", True)
        return lambda: [one_pass() for _ in range(tokens)]

    runs = {"decode": lambda: lambda: generate(model, prompt, tokens), "bound pass": bound}
    try:  # the same decode as one C++ call per token (modelkit.runtime.native), where it can be built
        torch.manual_seed(123)
        native = optimize_for_inference(GPTModel(spec_path), native=True)
        runs[NATIVE] = lambda: lambda: generate(native, prompt, tokens)
    except (NativeBuildError, ValueError) as exc:
        print(f"(no native decode: {exc})")
    with torch.inference_mode():  # as peers.py measures; generate enters it anyway
        result = split_rounds(runs, rounds, tokens)
    return result, nbytes


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="configs/gpt2-small.json")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()
    full, nbytes = measure(args.spec, args.rounds, args.tokens)
    tiny, _ = measure(tiny_copy_of(args.spec), args.rounds, args.tokens)

    print(f"{args.spec}: {nbytes / 1e6:.0f} MB of Linear weights, {args.tokens} greedy tokens, "
          f"{torch.get_num_threads()} threads; ms per token, medians of {args.rounds} interleaved rounds")
    print(f"  {'':26s} {'wall':>7s} {'Linear':>7s} {'attention':>9s} {'other':>7s}")
    for label, result in (("", full), ("tiny width, ", tiny)):
        for name, rows in result.items():
            if name == NATIVE:  # its kernels are called from C++, out of the clocks' sight
                print(f"  {label + name:26s} {median(rows, 'wall'):7.2f} {'(inside one C++ call per token)':>25s}")
                continue
            print(f"  {label + name:26s} " + " ".join(f"{median(rows, k):{w}.2f}" for k, w in
                                                      (("wall", 7), ("Linear", 7), ("attention", 9), ("other", 7))))
    pairs = list(zip(full["decode"], full["bound pass"]))  # each round's decode and bound pass ran back to back
    shares = sorted(b["wall"] / d["wall"] for d, b in pairs)
    ratio = statistics.median(d["Linear"] / b["Linear"] for d, b in pairs)
    allowed = statistics.median(b["wall"] / 0.9 - d["Linear"] for d, b in pairs)
    attention, other = median(full["decode"], "attention"), median(full["decode"], "other")
    warm_attention, warm_other = median(tiny["decode"], "attention"), median(tiny["decode"], "other")
    print(f"\nshare of the bound (bound pass / decode, per round): median {statistics.median(shares) * 100:.1f}% "
          f"({' '.join(f'{s * 100:.1f}' for s in shares)})")
    print(f"the decode's Linear calls take {ratio:.2f}x the bound pass's (median of the rounds' ratios)")
    print(f"besides its matmuls, a token takes {attention + other:.2f} ms: attention {attention:.2f} "
          f"({warm_attention:.2f} at the tiny width, warm), everything else {other:.2f} ({warm_other:.2f} warm); "
          f"{attention - warm_attention + other - warm_other:.2f} ms of it is paid because the weights streamed "
          f"through the caches")
    if NATIVE in full:
        native = sorted(b["wall"] / d["wall"] for d, b in zip(full[NATIVE], full["bound pass"]))
        print(f"the native decode step (optimize_for_inference(native=True)): median "
              f"{statistics.median(native) * 100:.1f}% of the bound ({' '.join(f'{s * 100:.1f}' for s in native)}), "
              f"{median(full['decode'], 'wall') - median(full[NATIVE], 'wall'):.2f} ms per token less than the "
              f"Python steps")
    print(f"90% of the bound leaves {allowed:.2f} ms per token for everything but the matmuls (median over the "
          f"rounds of bound pass / 0.9 - the decode's Linear time), against {attention + other:.2f}")


if __name__ == "__main__":
    main()
