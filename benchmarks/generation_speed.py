"""Tokens per second of greedy generation with and without the KV cache (gpt2-small, random weights, CPU).

    python benchmarks/generation_speed.py [--config configs/gpt2-small.json] [--max-new-tokens 200]

Times three runs of ``--max-new-tokens`` tokens after "Hello, I am", in eval mode:

- ``book loop``: the book's ``generate_text_simple`` (chapter 4), verbatim: every step re-runs the
  whole window and computes logits for every position;
- ``no cache``: ``modelkit.generate(use_cache=False)``: every step re-runs the whole window (logits
  for the last position only);
- ``KV cache``: ``modelkit.generate(use_cache=True)``: the prompt once, then one token per step.

All three must give the same tokens (checked). Prints tokens/s and the cache's speed-up over both
uncached runs. Figures depend on the machine and on its load; the script prints the thread count.
On a machine whose cores are busy with other work, a cached step (many tiny ops) spends most of its
time waiting at OpenMP barriers for descheduled threads: compare with ``--threads 1``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from modelkit import GPTModel, generate
from modelkit.tokenizer import text_to_token_ids

REPO = Path(__file__).resolve().parents[1]


def book_generate_text_simple(model: torch.nn.Module, idx: Tensor, max_new_tokens: int, context_size: int) -> Tensor:
    """The book's chapter-4 loop, as printed (the baseline the book's KV-cache chapter compares with)."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        probas = torch.softmax(logits, dim=-1)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def timed(run: Callable[[], Tensor]) -> tuple[Tensor, float]:
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "gpt2-small.json"))
    parser.add_argument("--prompt", default="Hello, I am")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-book-loop", action="store_true", help="do not time the book's loop")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(123)
    model = GPTModel(args.config).eval()
    idx = text_to_token_ids(args.prompt)
    n = args.max_new_tokens
    context = model.context_length
    print(f"{model.spec.name}: {sum(p.numel() for p in model.parameters()):,} parameters, random weights, "
          f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"greedy, {n} new tokens after {args.prompt!r} ({idx.shape[1]} prompt tokens), eval mode")

    generate(model, idx, 5)  # warm-up (allocator, kernels)
    cached, t_cache = timed(lambda: generate(model, idx, n, use_cache=True))
    uncached, t_plain = timed(lambda: generate(model, idx, n, use_cache=False))
    if not torch.equal(cached, uncached):
        raise SystemExit("error: the cached and uncached runs gave different tokens")
    rows = [("KV cache", t_cache), ("no cache", t_plain)]
    if not args.skip_book_loop:
        book, t_book = timed(lambda: book_generate_text_simple(model, idx, n, context))
        if not torch.equal(book, cached):
            raise SystemExit("error: the book's loop gave different tokens")
        rows.append(("book loop", t_book))

    print()
    print(f"{'run':<10} {'seconds':>9} {'tokens/s':>10}")
    for name, seconds in rows:
        print(f"{name:<10} {seconds:>9.2f} {n / seconds:>10.1f}")
    print()
    print(f"speed-up of the KV cache over no cache:  {t_plain / t_cache:.1f}x")
    if not args.skip_book_loop:
        print(f"speed-up of the KV cache over the book's loop: {t_book / t_cache:.1f}x")


if __name__ == "__main__":
    main()
