"""Where a decoded token's time goes, against the weight-read bound.

    python benchmarks/decode_breakdown.py [--rounds 4] [--tokens 200] [--spec configs/gpt2-small.json]

``benchmarks/peers.py`` reports decoding as a share of the weight-read bound (the time to read every
Linear weight once in batch-1 matmuls). This script says what the rest of the time is, so that work
on decoding speed starts from figures, not guesses. For the optimised model (``optimize_for_inference``,
greedy ``generate`` with the KV cache after a 16-token prompt) and the bound pass (oneDNN, columns,
q/k/v stacked: the arrangement that usually wins in peers.py), it prints:

1. wall time per token of both, in interleaved rounds, and the share (bound / decode) per round;
2. one profiled run of each (``torch.profiler``, which adds its own per-op cost), split into the
   Linear kernels, the attention kernel, every other op, and the time no op accounts for (Python,
   the profiler, argument handling); comparing the two Linear figures tells whether the model's
   matmuls read the weights as fast as the bound pass does;
3. the same depth and heads at a tiny width (emb_dim 48, vocab 256, same prompt and tokens), decode
   and bound pass: the per-token cost that does not depend on the weight bytes (each call's set-up,
   small ops, Python), and how much of it the bound pass pays too (its matmuls' set-up);
4. the budget: decoding reaches 90% of the bound when everything but the matmuls takes at most
   ``bound / 0.9 - matmul time``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).parent))
from peers import weight_read_pass

from modelkit import GPTModel, generate
from modelkit.speed import optimize_for_inference

LINEAR_OPS = ("mkldnn::_linear_pointwise", "modelkit::onednn_linear", "aten::addmm", "aten::mm")


def per_token_ms(fn: Callable[[], object], tokens: int) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / tokens * 1e3


def profiled_split(fn: Callable[[], object], tokens: int) -> dict[str, float]:
    """ms per token of op self time under ``torch.profiler``: Linear kernels, attention, other ops; and
    the profiled wall time (the profiler adds its own cost to every op and to the Python between)."""
    with profile():  # the profiler's own start-up, not counted
        torch.zeros(1).add_(1)
    start = time.perf_counter()
    with profile() as prof:
        fn()
    wall = (time.perf_counter() - start) / tokens * 1e3
    split = {"Linear kernels": 0.0, "attention kernel": 0.0, "other ops": 0.0}
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / tokens / 1e3
        if event.key in LINEAR_OPS:
            split["Linear kernels"] += ms
        elif "attention" in event.key or "flash" in event.key:
            split["attention kernel"] += ms
        else:
            split["other ops"] += ms
    split["profiled wall"] = wall
    return split


def tiny_copy_of(spec_path: str) -> str:
    """A spec file with ``spec_path``'s depth, heads and layout at emb_dim 48 and vocab 256."""
    spec = json.loads(Path(spec_path).read_text())
    spec.update(emb_dim=4 * spec["n_heads"], vocab_size=256)
    spec.pop("name", None)
    path = Path(tempfile.mkdtemp()) / "tiny.json"
    path.write_text(json.dumps(spec))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="configs/gpt2-small.json")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()
    n = args.tokens
    torch.manual_seed(123)
    model = optimize_for_inference(GPTModel(args.spec))
    bound_pass, nbytes = weight_read_pass(model, "columns", "oneDNN", True)
    prompt = torch.randint(0, model.spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7))
    runs = {"decode": lambda: generate(model, prompt, n), "bound": lambda: [bound_pass() for _ in range(n)]}
    tiny = optimize_for_inference(GPTModel(tiny_copy_of(args.spec)))
    tiny_prompt = prompt % tiny.spec.vocab_size
    tiny_pass, _ = weight_read_pass(tiny, "columns", "oneDNN", True)

    with torch.inference_mode():  # as peers.py measures; generate enters it anyway
        for run in runs.values():
            run()  # warm-up
        walls: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                walls[name].append(per_token_ms(runs[name], n))
        splits = {name: profiled_split(run, n) for name, run in runs.items()}
        generate(tiny, tiny_prompt, n)
        tiny_ms = statistics.median(per_token_ms(lambda: generate(tiny, tiny_prompt, n), n) for _ in range(5))
        tiny_bound = statistics.median(per_token_ms(lambda: [tiny_pass() for _ in range(n)], n) for _ in range(5))
        tiny_split = profiled_split(lambda: generate(tiny, tiny_prompt, n), n)

    decode, bound = statistics.median(walls["decode"]), statistics.median(walls["bound"])
    shares = sorted(b / d for b, d in zip(walls["bound"], walls["decode"]))
    print(f"{model.spec.name or args.spec}: {nbytes / 1e6:.0f} MB of Linear weights, {n} greedy tokens, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print(f"wall, ms per token (medians): decode {decode:.2f}, bound pass {bound:.2f}; share of the bound "
          f"per round (bound / decode): median {statistics.median(shares) * 100:.1f}% "
          f"({' '.join(f'{x * 100:.1f}' for x in shares)})")
    print("\nop self time under torch.profiler, ms per token (one run each; the profiler adds its own cost):")
    print(f"  {'':18s} {'decode':>8s} {'bound':>8s} {'tiny width':>11s}")
    for key in splits["decode"]:
        print(f"  {key:18s} {splits['decode'][key]:8.2f} {splits['bound'][key]:8.2f} {tiny_split[key]:11.3f}")
    ops = splits["decode"]["attention kernel"] + splits["decode"]["other ops"]
    print(f"\nthe same depth at a tiny width (unprofiled): decode {tiny_ms:.2f} ms per token, bound pass "
          f"{tiny_bound:.2f}: the part of a token that does not depend on the weight bytes (each call's "
          f"set-up, small ops, Python), {tiny_ms - tiny_bound:.2f} ms more than the bound pass's own")
    print(f"90% of the bound means decoding in at most {bound / 0.9:.2f} ms per token, {bound / 0.9 - bound:.2f} "
          f"ms more than the bound pass; the decode's ops besides its matmuls take {ops:.2f} ms by "
          f"themselves (attention {splits['decode']['attention kernel']:.2f}, against "
          f"{tiny_split['attention kernel']:.2f} at the tiny width: the difference is reading the KV cache "
          f"after the weights have evicted it), and the Linear kernels take "
          f"{splits['decode']['Linear kernels'] / splits['bound']['Linear kernels']:.2f}x their time in the "
          f"bound pass")


if __name__ == "__main__":
    main()
