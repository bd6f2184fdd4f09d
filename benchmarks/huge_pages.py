"""Huge pages for weights (modelkit.runtime.hugepages): what moving them costs, and what decoding gains.

    python benchmarks/huge_pages.py [--rounds 6] [--tokens 200] [--spec configs/gpt2-small.json]

Builds the model twice with the same seed, optimises both (``optimize_for_inference``), one with
``huge_pages=True``; prints the time that option took, then greedy decoding and the weight-read
pass (every Linear weight once in a batch-1 oneDNN matmul, q/k/v stacked) for 4 KiB and 2 MiB
pages, in interleaved rounds (medians). Both models must produce the same tokens.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from peers import weight_read_pass

from modelkit import GPTModel, generate
from modelkit.runtime.hugepages import advise_huge_pages_, huge_pages_available, model_tensors
from modelkit.runtime.optimize import optimize_for_inference


def huge_mb() -> int:
    """AnonHugePages of this process, in MB (from the kernel)."""
    text = Path("/proc/self/smaps_rollup").read_text()
    return int(text.split("AnonHugePages:")[1].split()[0]) >> 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="configs/gpt2-small.json")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()
    if not huge_pages_available():
        sys.exit("transparent huge pages are not available here (Linux, THP not 'never')")
    torch.manual_seed(0)
    small = optimize_for_inference(GPTModel(args.spec))
    torch.manual_seed(0)
    huge = optimize_for_inference(GPTModel(args.spec))
    before = huge_mb()
    t = time.perf_counter()
    moved = advise_huge_pages_(model_tensors(huge))  # what huge_pages=True does, timed on its own
    spent = time.perf_counter() - t
    print(f"moved {moved / 1e6:.0f} MB of parameters to huge pages in {spent:.2f} s "
          f"(kernel: AnonHugePages {before} -> {huge_mb()} MB)")
    pass_small, nbytes = weight_read_pass(small, "columns", "oneDNN", True)
    pass_huge, _ = weight_read_pass(small, "columns", "oneDNN", True, huge_pages=True)
    prompt = torch.randint(0, small.spec.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    runs = {
        "decode, 4 KiB pages": lambda: generate(small, prompt, args.tokens),
        "decode, huge pages": lambda: generate(huge, prompt, args.tokens),
        "weight-read pass, 4 KiB pages": lambda: [pass_small() for _ in range(args.tokens)],
        "weight-read pass, huge pages": lambda: [pass_huge() for _ in range(args.tokens)],
    }
    assert torch.equal(runs["decode, 4 KiB pages"](), runs["decode, huge pages"]()), "tokens differ"
    times: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t) / args.tokens * 1e3)
    print(f"ms per token, medians of {args.rounds} interleaved rounds ({nbytes / 1e6:.0f} MB of Linear weights):")
    for name, ts in times.items():
        print(f"  {name:32s} {statistics.median(ts):6.2f}   rounds: {' '.join(f'{x:.2f}' for x in ts)}")
    gain = statistics.median(times["decode, 4 KiB pages"]) - statistics.median(times["decode, huge pages"])
    if gain > 0:
        print(f"decoding gains {gain:.2f} ms per token: moving the weights pays off after "
              f"{spent / gain * 1e3:.0f} tokens")


if __name__ == "__main__":
    main()
