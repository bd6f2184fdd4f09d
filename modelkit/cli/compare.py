"""``modelkit compare A.json B.json ...``: one table of sizes, FLOPs, speed (and losses, grad norms)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..compare import CompareError, CompareOptions, VariantReport, compare, parse_override, write_plots
from ..training.dataset import DataError
from ..devices import DEVICE_HELP
from ._table import format_markdown, format_table

EPILOG = """\
examples:
  modelkit compare configs/gpt2-small.json configs/gpt2-small-postnorm.json --grad-norms \\
      --override n_layers=6 emb_dim=256 context_length=256
  modelkit compare a.json b.json --train-steps 200 --data book.txt --markdown

FLOPs/token (forward) = 2*N_matmul + 4*n_layers*n_ctx*emb_dim; N_matmul = weights of every linear
layer, output head included (Kaplan et al. 2020, counting both attention matmuls as Chinchilla does).
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare", help="compare specs: parameters, memory, FLOPs, measured speed, losses, grad norms",
        description="Build each spec and report parameters, memory, analytic FLOPs per token and "
                    "forward / KV-cache decode speed measured on this machine; optionally train each "
                    "variant on the same data, and measure per-layer gradient norms at initialisation.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="JSON spec files")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="change every spec before comparing, e.g. n_layers=6 emb_dim=256 attention.backend=eager; "
                        "a part's parameter (attention.num_kv_heads=2) changes the specs whose part declares it")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the speed measurements")
    p.add_argument("--seq-len", type=int, help="tokens per forward pass (default: min(context, 256))")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (default 1)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before decoding (default 16)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded one at a time (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions; the median is reported (default 5)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=123, help="seed for weights, inputs and training (default 123)")
    p.add_argument("--grad-norms", action="store_true",
                   help="per-layer gradient norm of the feed-forward output weight at initialisation (Xiong et al. 2020)")
    p.add_argument("--grad-batch", type=int, default=8, help="sequences for --grad-norms (default 8)")
    p.add_argument("--train-steps", type=int, help="train every variant this many steps (needs --data)")
    p.add_argument("--data", help="UTF-8 text to train on (and for --grad-norms inputs)")
    p.add_argument("--train-batch-size", type=int, default=4, help="batch size for --train-steps (default 4)")
    p.add_argument("--lr", type=float, default=4e-4, help="learning rate for --train-steps (default 4e-4)")
    p.add_argument("--out", default="runs/compare", help="folder for runs and PNGs (default runs/compare)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write PNGs")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the figures as JSON")
    fmt.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.set_defaults(func=run)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def main_table(reports: list[VariantReport]) -> tuple[list[str], list[list[str]]]:
    headers = ["variant", "params", "params w/o head", "w/o embeddings", "fp32 MB", "bf16 MB", "GFLOPs/token",
               "fwd tok/s", "decode tok/s"]
    trained = any(r.final_val_loss is not None or r.final_train_loss is not None for r in reports)
    if trained:
        headers += ["train loss", "val loss"]
    rows = []
    for r in reports:
        row = [r.name, f"{r.parameters:,}", f"{r.parameters_without_head:,}", f"{r.parameters_without_embeddings:,}",
               f"{r.memory_fp32_mb:.2f}",
               f"{r.memory_bf16_mb:.2f}", f"{r.flops_per_token / 1e9:.4f}",
               _num(r.forward_tokens_per_s, ",.0f"), _num(r.decode_tokens_per_s, ",.1f")]
        if trained:
            row += [_num(r.final_train_loss, ".4f"), _num(r.final_val_loss, ".4f")]
        rows.append(row)
    return headers, rows


def grad_table(reports: list[VariantReport]) -> tuple[list[str], list[list[str]]]:
    measured = [r for r in reports if r.grad_norms]
    layers = max(len(r.grad_norms or []) for r in measured)
    headers = ["layer", *(r.name for r in measured)]
    rows = [[str(i + 1), *(f"{r.grad_norms[i]:.4g}" if r.grad_norms and i < len(r.grad_norms) else "-"
                           for r in measured)] for i in range(layers)]
    rows.append(["last/first", *(f"{r.grad_norm_ratio:.3f}" for r in measured)])
    return headers, rows


def run(args: argparse.Namespace) -> int:
    import torch

    overrides = dict(parse_override(o) for o in args.override)
    text = None
    if args.data:
        try:
            text = Path(args.data).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read data file {args.data}: {exc}") from None
    if args.train_steps and text is None:
        raise CompareError("--train-steps needs --data FILE")
    if args.plot and (args.train_steps or args.grad_norms):
        from ..training.plots import require_matplotlib

        require_matplotlib()
    options = CompareOptions(
        speed=args.speed, seq_len=args.seq_len, batch_size=args.batch_size, prompt_len=args.prompt_len,
        decode_tokens=args.decode_tokens, repeats=args.repeats, device=args.device, seed=args.seed,
        grad_norms=args.grad_norms, grad_batch=args.grad_batch, train_steps=args.train_steps, train_text=text,
        train_batch_size=args.train_batch_size, train_lr=args.lr,
        out_dir=args.out if args.train_steps else None)
    reports = compare(args.configs, options, overrides=overrides, sources=args.configs,
                      progress=not (args.json or args.markdown))
    pngs = write_plots(reports, args.out) if args.plot else []
    if args.json:
        print(json.dumps({"overrides": overrides, "variants": [r.to_dict() for r in reports],
                          "plots": [str(p) for p in pngs]}, indent=2))
        return 0
    render = format_markdown if args.markdown else (
        lambda h, r: format_table(h, r, numeric=[False] + [True] * (len(h) - 1)))
    print(render(*main_table(reports)))
    if any(r.grad_norms for r in reports):
        print()
        print("gradient norm of each layer's feed-forward output weight at initialisation:")
        print(render(*grad_table(reports)))
    print()
    if overrides:
        print("overrides: " + " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()))
    for r in reports:
        if r.overrides_not_applied:
            print(f"  not applied to {r.name} (its part has no such parameter): {' '.join(r.overrides_not_applied)}")
    vocabularies = {r.name: r.spec["vocab_size"] for r in reports}
    if len(set(vocabularies.values())) > 1:
        print("vocabularies differ (" + ", ".join(f"{n} {v:,}" for n, v in vocabularies.items()) + "): "
              "'w/o embeddings' compares the architectures; losses are per GPT-2 token of the same text")
    print("GFLOPs/token: forward, 2*N_matmul + 4*n_layers*n_ctx*emb_dim (see modelkit.compare)")
    if args.speed:
        from ..devices import resolve_device

        print(f"speed: {resolve_device(options.device)} ({torch.get_num_threads()} threads), forward batch {args.batch_size} x "
              f"min(context, {args.seq_len or 256}) tokens; decode {args.decode_tokens} tokens after a "
              f"{args.prompt_len}-token prompt, KV cache, batch 1; median of {args.repeats}")
    for png in pngs:
        print(f"plot: {png}")
    return 0
