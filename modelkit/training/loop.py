"""The training loop: the book's ``train_model_simple`` (chapter 5), with each addition a named step.

:func:`train` plans the run (:mod:`.run_plan`), sets up the processes (:mod:`.distributed`), the
model and the optimiser (:mod:`.model_setup`), then runs :func:`train_model_simple`: per batch the
book's zero-grad, :func:`~.loss.calc_loss_batch`, backward and optimizer step, plus the learning
rate of :mod:`.schedule`, gradient clipping, evaluation (:mod:`.evaluation`), a metrics line
(:mod:`.metrics`) and checkpoints (:mod:`.checkpoints`).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .dataset import TokenSource, make_train_loader
from ..spec import ModelSpec
from .checkpoints import MODEL_FILE, Checkpointer, read_train_state, restore_tensors, run_folder
from .config import TrainConfig
from .distributed import DistContext, close_distributed, init_distributed, wrap_for_ddp
from .evaluation import eval_window_count, evaluate_splits
from .loss import calc_loss_batch
from .metrics import METRICS_FILE, MetricsWriter, ProgressBar, Throughput, step_line
from .model_setup import build_training_model, make_optimizer
from .resume import resume_config
from .run_plan import RunPlan, plan_run
from .schedule import clip_gradients, lr_at, set_lr

if TYPE_CHECKING:
    from ..model import GPTModel

__all__ = ["TrainResult", "train", "train_model_simple"]


@dataclass
class TrainResult:
    """What a run produced. ``metrics`` are this call's JSON lines (``out_dir/metrics.jsonl`` holds the
    whole run's). ``step``/``tokens`` count the whole run; this call took steps ``start_step + 1 ..
    step`` and ``tokens - start_tokens`` tokens at ``tokens_per_s``; ``train_seconds`` is the whole
    run's time in optimizer steps (evaluation excluded). ``resume_changes`` are the printed lines
    naming each setting a resume changed."""

    model: GPTModel
    metrics: list[dict[str, Any]]
    step: int
    tokens: int
    tokens_per_s: float
    final_train_loss: float | None
    final_val_loss: float | None
    out_dir: Path | None = None
    checkpoint: Path | None = None
    config: TrainConfig = field(default_factory=TrainConfig)
    start_step: int = 0
    start_tokens: int = 0
    train_seconds: float = 0.0
    resume_changes: list[str] = field(default_factory=list)

    def losses(self) -> list[float]:
        """The training loss of every step taken in this run, in order."""
        return [m["train_loss"] for m in self.metrics if "train_loss" in m]


def train(spec: ModelSpec | Mapping[str, Any] | str | os.PathLike[str] | None, data: TokenSource,
          config: TrainConfig | None = None, *, val_data: TokenSource | None = None,
          out_dir: str | os.PathLike[str] | None = None, resume: str | os.PathLike[str] | None = None,
          pause_at: int | None = None, progress: bool = True,
          data_path: str | os.PathLike[str] | None = None) -> TrainResult:
    """Train a model of ``spec`` on ``data`` (text, tokenised with GPT-2's tokenizer, or token ids).

    ``val_data`` replaces the held-out split of ``data``. With ``out_dir`` (rank 0 only) it writes
    ``metrics.jsonl``, ``checkpoints/step_<N>/`` every ``save_every`` steps and at the end,
    ``model.safetensors`` (final weights) and, with ``config.plot``, ``loss.png``. ``resume`` is a
    checkpoint folder or run folder; ``spec`` may then be None and ``config`` defaults to the saved one.
    ``pause_at`` stops after that global step (saving a checkpoint) without changing the schedule.
    ``data_path`` names the file ``data`` was read from; checkpoints record it (made absolute; on
    resume without it, the checkpoint's record is kept) and nothing here reads it.
    Raises :class:`TrainError` / :class:`~modelkit.training.dataset.DataError` for unusable options or data.
    """
    saved = read_train_state(resume) if resume is not None else None
    if config is None:
        config = resume_config(resume, int(os.environ.get("WORLD_SIZE", "1"))) if resume is not None else TrainConfig()
    if config.plot:
        from .plots import require_matplotlib

        require_matplotlib()
    ctx, device = init_distributed(config.device)
    try:
        plan = plan_run(spec, data, val_data, config, saved, pause_at, data_path, ctx.world_size)
        _report_changes(plan.changes, ctx)
        model, optimizer = _set_up_model(plan, ctx, device)
        out = Path(out_dir) if out_dir is not None else None
        return train_model_simple(model, optimizer, plan, ctx, device, out, progress)
    finally:
        close_distributed(ctx)


def train_model_simple(model: GPTModel, optimizer: torch.optim.Optimizer, plan: RunPlan, ctx: DistContext,
                       device: torch.device, out: Path | None, progress: bool = True) -> TrainResult:
    """The book's loop over the planned steps, with the run's schedule, clipping, evaluation,
    metrics and checkpoints; ends with the final weights saved and the result."""
    config = plan.config
    train_model = wrap_for_ddp(model, ctx, device)
    writer = _metrics_writer(plan, out, ctx)
    run_eval = functools.partial(evaluate_splits, model, plan.train_set, plan.val_set,
                                 eval_window_count(config, plan.global_batch, plan.train_set, plan.val_set),
                                 config.batch_size, device, ctx)
    checkpoints = Checkpointer(out, model, optimizer, ctx, device)
    last_eval = _opening_evaluation(plan, writer, run_eval)
    train_model.train()
    loader = make_train_loader(plan.train_set, config.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                               seed=config.seed, shuffle=config.shuffle, start=plan.start_step, stop=plan.stop_step)
    bar = ProgressBar(plan.total_steps, plan.start_step, progress and ctx.is_main)
    clock = Throughput(plan.previous_seconds)
    step, tokens = plan.start_step, plan.start_tokens
    for inputs, targets in loader:
        t0 = time.perf_counter()
        lr = set_lr(optimizer, lr_at(step, config, plan.total_steps))
        optimizer.zero_grad()
        loss = calc_loss_batch(inputs, targets, train_model, device)
        loss.backward()
        grad_norm = clip_gradients(model, config.grad_clip)
        optimizer.step()
        loss_value = ctx.all_reduce(loss.detach().clone(), op="mean").item()
        dt = clock.lap(t0, plan.tokens_per_step, device)
        step, tokens = step + 1, tokens + plan.tokens_per_step
        line = step_line(step, plan.batches_per_epoch, tokens, loss_value, lr, plan.tokens_per_step, dt, grad_norm)
        if step % config.eval_every == 0 or step == plan.stop_step:
            last_eval = run_eval()
            line.update(last_eval)
        writer.write(line)
        bar.step(loss_value, last_eval, clock.recent_tokens_per_s())
        if (config.save_every and step % config.save_every == 0) or step == plan.stop_step:
            checkpoints.save(plan.train_state(step, tokens, clock.run_seconds))
    bar.close()
    if step == plan.start_step and plan.saved is None:  # no step taken (stop_step == 0): still leave a checkpoint
        checkpoints.save(plan.train_state(step, tokens, 0.0))
    _save_final(model, writer, plan, out, step, tokens, ctx)
    return TrainResult(
        model=model, metrics=writer.lines, step=step, tokens=tokens, tokens_per_s=clock.tokens_per_s(),
        final_train_loss=last_eval.get("train_eval_loss"), final_val_loss=last_eval.get("val_loss"),
        out_dir=out, checkpoint=checkpoints.last, config=config, start_step=plan.start_step,
        start_tokens=plan.start_tokens, train_seconds=clock.run_seconds, resume_changes=plan.changes,
    )


# -- the named steps ---------------------------------------------------------------------------------

def _report_changes(changes: list[str], ctx: DistContext) -> None:
    """Print each setting a resume changes (stderr, rank 0)."""
    if ctx.is_main:
        for line in changes:
            print(f"resume: {line}", file=sys.stderr)


def _set_up_model(plan: RunPlan, ctx: DistContext, device: torch.device
                  ) -> tuple[GPTModel, torch.optim.Optimizer]:
    """The model and its optimiser, with the checkpoint's optimiser and RNG state on resume."""
    model = build_training_model(plan, ctx, device)
    optimizer = make_optimizer(model, plan.config)
    if plan.saved is not None:
        restore_tensors(Path(plan.saved["folder"]), model, optimizer, plan.saved, ctx, device)
    return model, optimizer


def _metrics_writer(plan: RunPlan, out: Path | None, ctx: DistContext) -> MetricsWriter:
    """The run's metrics writer; on resume it keeps the history up to the checkpoint's step."""
    if plan.saved is None:
        return MetricsWriter(out, None, ctx.is_main)
    history = run_folder(plan.saved["folder"]) / METRICS_FILE
    return MetricsWriter(out, plan.start_step, ctx.is_main, history=history)


def _opening_evaluation(plan: RunPlan, writer: MetricsWriter, run_eval: Callable[[], dict[str, float]]
                        ) -> dict[str, float]:
    """A new run evaluates the untrained model (the step-0 line); a resumed one takes its last evaluation."""
    if plan.saved is not None:
        return dict(writer.last_eval())
    last_eval = run_eval()
    writer.write({"step": 0, "epoch": 0.0, "tokens": 0, "lr": lr_at(0, plan.config, plan.total_steps), **last_eval})
    return last_eval


def _save_final(model: GPTModel, writer: MetricsWriter, plan: RunPlan, out: Path | None, step: int, tokens: int,
                ctx: DistContext) -> None:
    """Rank 0 writes ``out/model.safetensors`` (and ``loss.png`` with ``plot``); every rank then waits."""
    if ctx.is_main and out is not None:
        from ..weights.checkpoint import save_checkpoint

        save_checkpoint(model, out / MODEL_FILE, metadata={"step": str(step), "tokens": str(tokens)})
        if plan.config.plot:
            from .plots import plot_training

            plot_training(writer.lines_all(), out / "loss.png", title=plan.model_spec.name)
    ctx.barrier()
