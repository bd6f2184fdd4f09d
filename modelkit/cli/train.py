"""``modelkit train``: train a spec on a text file (one process, or many under torchrun)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..training.dataset import DataError
from ..training import (
    TrainConfig,
    TrainError,
    TrainResult,
    find_checkpoint,
    read_metrics,
    recorded_data_path,
    resume_config,
    run_folder,
)

EPILOG = """\
examples:
  modelkit train --config configs/tiny.json --data book.txt --steps 500 --plot
  modelkit train --config configs/tiny.json --data book.txt --steps 500 --pause-at 200  # stop at 200
  modelkit train --resume runs/tiny                        # finish it exactly (the run records book.txt)
  modelkit train --resume runs/tiny --steps 1000           # run longer; each changed setting is printed
  modelkit train --resume runs/tiny --data moved/book.txt  # the same text at a new path
  torchrun --nproc-per-node 4 -m modelkit train --config configs/tiny.json --data book.txt
several machines (run on each; --node-rank 0..N-1, the endpoint is node 0's address):
  torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr 10.0.0.1 --master-port 29500 \\
      -m modelkit train --config configs/tiny.json --data book.txt
"""

# option -> (TrainConfig field, type, help)
OPTIONS: dict[str, tuple[str, Any, str]] = {
    "--steps": ("steps", int, "optimizer steps (default: one epoch)"),
    "--epochs": ("epochs", int, "passes over the training windows"),
    "--batch-size": ("batch_size", int, "windows per batch per process (default 4); global batch = this x processes"),
    "--max-length": ("max_length", int, "tokens per window (default: the spec's context_length)"),
    "--stride": ("stride", int, "tokens between window starts (default: max-length)"),
    "--val-fraction": ("val_fraction", float, "last fraction of the text's characters held out (default 0.1)"),
    "--lr": ("lr", float, "peak learning rate (default 4e-4)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (default 0.1)"),
    "--warmup-steps": ("warmup_steps", int, "linear warm-up steps (default 0)"),
    "--min-lr": ("min_lr", float, "cosine-decay the learning rate to this by the last step (default: constant)"),
    "--grad-clip": ("grad_clip", float, "clip the gradient norm to this (default: no clipping)"),
    "--eval-every": ("eval_every", int, "evaluate every N steps (default 50)"),
    "--eval-batches": ("eval_batches", int, "global batches of each split to evaluate (default 5)"),
    "--save-every": ("save_every", int, "write a resumable checkpoint every N steps (always at the end)"),
    "--seed": ("seed", int, "seed for the weights, data order and dropout (default 123)"),
    "--device": ("device", str, "auto (default), cpu, cuda, cuda:N, mps"),
    "--linear-kernel": ("linear_kernel", str, "Linear layers on the CPU: auto (default: the faster on this CPU, "
                                              "see modelkit info --device), onednn, aten (PyTorch's F.linear)"),
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="train a spec on a text file (AdamW, book-style windows, resumable checkpoints)",
        description="Tokenise a text with the GPT-2 tokenizer, cut it into the book's windows, hold out the "
                    "end for validation, and train with AdamW and cross-entropy. Writes metrics.jsonl, "
                    "resumable checkpoints and the final model.safetensors to --out. Runs unchanged under "
                    "torchrun (DistributedDataParallel; only rank 0 writes).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the model spec (JSON); optional with --resume")
    p.add_argument("--data", help="a UTF-8 text file to train on (with --resume: default the run's file)")
    p.add_argument("--out", help="run folder (default: runs/<spec name>, or the resumed run's folder)")
    p.add_argument("--resume", metavar="DIR", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--pause-at", type=int, metavar="STEP",
                   help="stop after this step (checkpoint written) without changing the schedule")
    for flag, (_, kind, text) in OPTIONS.items():
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--no-shuffle", dest="shuffle", action="store_const", const=False, default=None,
                   help="take the windows in order instead of a seeded shuffle per epoch")
    p.add_argument("--plot", action="store_const", const=True, default=None,
                   help="write loss.png (needs matplotlib: pip install 'modelkit[plot]')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    from ..spec import load_spec
    from ..training import train

    explicit = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in OPTIONS.items()}
    explicit.update(shuffle=args.shuffle, plot=args.plot)
    explicit = {k: v for k, v in explicit.items() if v is not None}
    if args.config is None and args.resume is None:
        raise TrainError("give --config (or --resume a checkpoint)")
    spec = load_spec(args.config) if args.config else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.resume:
        if "steps" in explicit or "epochs" in explicit:  # a new length replaces the saved one
            explicit.setdefault("steps", None)
            explicit.setdefault("epochs", None)
        config = resume_config(args.resume, world, **explicit)
        default_out = run_folder(find_checkpoint(args.resume))
    else:
        config = TrainConfig(**explicit)
        assert spec is not None
        default_out = Path("runs") / spec.name
    out = Path(args.out) if args.out else default_out
    data_file = _data_file(args)
    text = _read_text(data_file)
    result = train(spec, text, config, out_dir=out, resume=args.resume, pause_at=args.pause_at,
                   progress=not args.quiet, data_path=data_file)
    if int(os.environ.get("RANK", "0")) == 0:
        for line in _summary(result, read_metrics(out), world):
            print(line)
        print(f"model:       {out / 'model.safetensors'}")
        print(f"metrics:     {out / 'metrics.jsonl'}")
        if result.checkpoint is not None:
            print(f"checkpoint:  {result.checkpoint}  (continue with --resume {out})")
        if config.plot:
            print(f"loss curve:  {out / 'loss.png'}")
    return 0


def _data_file(args: argparse.Namespace) -> str:
    """``--data``, else (on resume) the data file the checkpoint records; a clear error if neither works."""
    if args.data is not None:
        return str(args.data)
    if args.resume is None:
        raise TrainError("give --data FILE, the text to train on")
    recorded = recorded_data_path(args.resume)
    if recorded is None:
        raise TrainError(f"the checkpoint in {args.resume} does not record its data file (an older modelkit "
                         "wrote it); pass --data FILE with the text it was trained on")
    if not Path(recorded).is_file():
        raise TrainError(f"the run's data file {recorded} is missing; pass --data FILE with the same text")
    return recorded


def _val_span(evals: list[dict[str, Any]]) -> str:
    """``A (step s) -> B (step t)``: the first and last of ``evals`` (metric lines with a val_loss)."""
    return (f"{evals[0]['val_loss']:.3f} (step {evals[0]['step']}) -> "
            f"{evals[-1]['val_loss']:.3f} (step {evals[-1]['step']})")


def _summary(result: TrainResult, history: list[dict[str, Any]], world: int) -> list[str]:
    """The run's closing lines. After a resume: this session and the whole run (``history`` is the
    run's metrics.jsonl), each with its steps, tokens, step-time throughput and validation loss."""
    procs = f" ({world} processes)" if world > 1 else ""
    evals = [m for m in history if "val_loss" in m and m["step"] <= result.step]
    if result.start_step == 0:
        return [f"trained {result.step} steps, {result.tokens:,} tokens, {result.tokens_per_s:,.0f} tokens/s{procs}",
                *([f"validation loss: {_val_span(evals)}"] if evals else [])]
    whole_rate = result.tokens / result.train_seconds if result.train_seconds else 0.0
    whole = f"whole run:    steps 1-{result.step}, {result.tokens:,} tokens, {whole_rate:,.0f} tokens/s"
    whole += f"; validation loss {_val_span(evals)}" if evals else ""
    if result.step == result.start_step:
        return [f"this session: no steps (the checkpoint is at step {result.step})", whole]
    before = [m for m in evals if m["step"] <= result.start_step][-1:]  # where this session started from
    mine = before + [m for m in evals if m["step"] > result.start_step]
    session = (f"this session: steps {result.start_step + 1}-{result.step}, {result.tokens - result.start_tokens:,} "
               f"tokens, {result.tokens_per_s:,.0f} tokens/s{procs}")
    session += f"; validation loss {_val_span(mine)}" if mine else ""
    return [session, whole]
