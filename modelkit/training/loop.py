"""The training loop: the book's ``train_model_simple`` (chapter 5), with each addition a named step.

:func:`train` plans the run (:mod:`.run_plan`), sets up the processes (:mod:`.distributed`), the
model and the optimiser (:mod:`.model_setup`), then runs :func:`train_model_simple`: per batch the
book's zero-grad, :func:`~.loss.calc_loss_batch`, backward and optimizer step, plus the learning
rate of :mod:`.schedule`, gradient clipping, evaluation (:mod:`.evaluation`), a metrics line
(:mod:`.metrics`) and checkpoints (:mod:`.checkpoints`).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
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
from .config import MAX_COUNT, TrainConfig, TrainError
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
    Raises :class:`TrainError` / :class:`~modelkit.training.dataset.DataError` for unusable options or
    data (``out_dir`` naming a file, or a path under one, included), and :class:`TrainError` when the
    run diverges (see :func:`train_model_simple`).
    """
    out = _check_out_dir(out_dir)
    _check_pause_at(pause_at)
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
        return train_model_simple(model, optimizer, plan, ctx, device, out, progress)
    finally:
        close_distributed(ctx)


def train_model_simple(model: GPTModel, optimizer: torch.optim.Optimizer, plan: RunPlan, ctx: DistContext,
                       device: torch.device, out: Path | None, progress: bool = True) -> TrainResult:
    """The book's loop over the planned steps, with the run's schedule, clipping, evaluation,
    metrics and checkpoints; ends with the final weights saved and the result.

    Divergence: a step whose loss or gradient norm is not finite (NaN or inf) stops the run before
    its update is applied, and weights that are not finite are never saved (checked before each
    checkpoint and the final save). Either way :class:`TrainError` names the step, and ``out/
    model.safetensors`` becomes the last checkpoint's weights, the last state known to be finite
    (see :func:`_diverged`)."""
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
        loss_value = ctx.all_reduce(loss.detach().clone(), op="mean").item()
        norm = grad_norm if grad_norm is not None else _grad_norm(model)
        if not (math.isfinite(loss_value) and math.isfinite(norm)):  # before the update spreads it
            bar.close()
            raise _diverged(f"the loss is {loss_value:g} and the gradient norm {norm:g}; its update was not "
                            "applied", step + 1, plan, checkpoints.last, out, ctx)
        optimizer.step()
        dt = clock.lap(t0, plan.tokens_per_step, device)
        step, tokens = step + 1, tokens + plan.tokens_per_step
        line = step_line(step, plan.batches_per_epoch, tokens, loss_value, lr, plan.tokens_per_step, dt, grad_norm)
        if step % config.eval_every == 0 or step == plan.stop_step:
            last_eval = run_eval()
            line.update(last_eval)
        writer.write(line)
        bar.step(loss_value, last_eval, clock.recent_tokens_per_s())
        if (config.save_every and step % config.save_every == 0) or step == plan.stop_step:
            _check_weights(model, step, plan, checkpoints.last, out, ctx, bar)
            checkpoints.save(plan.train_state(step, tokens, clock.run_seconds))
    bar.close()
    if step == plan.start_step and plan.saved is None:  # no step taken (stop_step == 0): still leave a checkpoint
        checkpoints.save(plan.train_state(step, tokens, 0.0))
    _check_weights(model, step, plan, checkpoints.last, out, ctx, bar)
    _save_final(model, writer, plan, out, step, tokens, ctx)
    return TrainResult(
        model=model, metrics=writer.lines, step=step, tokens=tokens, tokens_per_s=clock.tokens_per_s(),
        final_train_loss=last_eval.get("train_eval_loss"), final_val_loss=last_eval.get("val_loss"),
        out_dir=out, checkpoint=checkpoints.last, config=config, start_step=plan.start_step,
        start_tokens=plan.start_tokens, train_seconds=clock.run_seconds, resume_changes=plan.changes,
    )


# -- the named steps ---------------------------------------------------------------------------------

def _check_pause_at(pause_at: object) -> None:
    """Raise :class:`TrainError` unless ``pause_at`` is None or an integer in ``[0, 2**63 - 1]``."""
    if pause_at is None:
        return
    if isinstance(pause_at, bool) or not isinstance(pause_at, int):
        raise TrainError(f"pause_at must be an integer step, got {type(pause_at).__name__} {pause_at!r}")
    if not 0 <= pause_at <= MAX_COUNT:
        raise TrainError(f"pause_at must be a step in [0, 2**63 - 1], got {pause_at}")


def _check_out_dir(out_dir: str | os.PathLike[str] | None) -> Path | None:
    """``out_dir`` as a Path, or a :class:`TrainError` if it cannot be a folder: it is a file, or the
    nearest existing folder above it is a file. Creates nothing (rank 0 creates it when writing)."""
    if out_dir is None:
        return None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TrainError(f"the output folder {out} is a file; give a folder (new or a run's) for the run")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TrainError(f"the output folder {out} cannot be created: {parent} is a file, not a folder")
            break
    return out


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


# -- divergence ----------------------------------------------------------------------------------------

def _grad_norm(model: torch.nn.Module) -> float:
    """The global L2 norm of the parameters' gradients (0.0 if there are none); NaN/inf if any is."""
    norms = [torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _check_weights(model: GPTModel, step: int, plan: RunPlan, last: Path | None, out: Path | None,
                   ctx: DistContext, bar: ProgressBar) -> None:
    """Raise :func:`_diverged`'s error if any weight is not finite after ``step`` (before saving them)."""
    named = list(model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()  # one device sync
    bad = [name for (name, _), ok in zip(named, finite) if not ok]
    if bad:
        bar.close()
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise _diverged(f"its update left non-finite weights ({bad[0]}{more}), which were not saved", step, plan,
                        last, out, ctx)


def _diverged(what: str, step: int, plan: RunPlan, last: Path | None, out: Path | None,
              ctx: DistContext) -> TrainError:
    """The error that stops a diverged run at ``step``, after keeping the last finite state.

    The last finite state is the latest checkpoint (this call's, else the one resumed from): rank 0
    copies its weights to ``out/model.safetensors`` (through a temporary file, so an existing file is
    replaced whole or not at all). With no checkpoint yet, nothing is written and an existing
    ``model.safetensors`` is left as it was. Every rank raises the same error (its values are all-reduced).
    """
    source = last if last is not None else (Path(plan.saved["folder"]) if plan.saved is not None else None)
    if out is None:
        kept = "nothing was written (no output folder)"
    elif source is None:
        kept = (f"no checkpoint had been written, so {out / MODEL_FILE} was not written "
                "(keep one every N steps with save_every / --save-every)")
    else:
        if ctx.is_main:
            tmp = out / (MODEL_FILE + ".tmp")
            shutil.copyfile(source / MODEL_FILE, tmp)
            os.replace(tmp, out / MODEL_FILE)
        kept = (f"{out / MODEL_FILE} holds the last finite checkpoint's weights ({source}; resume from it "
                "with a lower lr)")
    ctx.barrier()
    return TrainError(f"training diverged at step {step}: {what}; {kept}; "
                      f"try a lower lr (it is {plan.config.lr:g}) or grad_clip")
