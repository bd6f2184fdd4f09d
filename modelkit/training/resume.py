"""Resuming a run: the config a checkpoint implies, what a resume may not change, and what it changes.

A setting changed on resume is reported (:func:`resume_changes`); one that would change which tokens
a step sees (:data:`DATA_FIELDS`, the global batch, the spec, the data) is refused with a
:class:`~modelkit.training.config.TrainError` (:func:`check_resume`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..spec import ModelSpec
from .checkpoints import read_train_state
from .config import TrainConfig, TrainError
from .schedule import lr_at

__all__ = ["DATA_FIELDS", "check_resume", "resume_changes", "resume_config"]

# Config fields that decide which tokens a step sees; a resumed run must keep them.
DATA_FIELDS = ("max_length", "stride", "val_fraction", "seed", "shuffle")


def resume_config(path: str | os.PathLike[str], world_size: int = 1, **overrides: Any) -> TrainConfig:
    """The config saved in a training checkpoint, with ``overrides`` applied.

    Without a ``batch_size`` override, the per-process batch is the saved global batch divided by
    ``world_size`` (so a 2-process run resumes in one process with twice the batch).
    """
    saved = read_train_state(path)
    data = dict(saved["config"])
    if "batch_size" not in overrides:
        global_batch = saved["global_batch_size"]
        if global_batch % world_size:
            raise TrainError(f"the checkpoint's global batch {global_batch} cannot be split over "
                             f"{world_size} processes")
        data["batch_size"] = global_batch // world_size
    data.update(overrides)
    return TrainConfig.from_dict(data)


def check_resume(saved: Mapping[str, Any], config: TrainConfig, spec: ModelSpec | None, ckpt_spec: ModelSpec,
                 train_fp: str, world_size: int) -> None:
    """Raise :class:`TrainError` if resuming ``saved`` with these settings would not continue it exactly:
    other data settings, another global batch, other training data (by fingerprint) or another spec."""
    saved_cfg = saved["config"]
    changed = [f for f in DATA_FIELDS if saved_cfg.get(f) != getattr(config, f)]
    if changed:
        raise TrainError("cannot resume exactly with different data settings: " + ", ".join(
            f"{f} {saved_cfg.get(f)!r} -> {getattr(config, f)!r}" for f in changed))
    if config.batch_size * world_size != saved["global_batch_size"]:
        raise TrainError(f"the checkpoint was trained with a global batch of {saved['global_batch_size']}; "
                         f"batch_size {config.batch_size} x {world_size} process(es) = "
                         f"{config.batch_size * world_size} would change the batches")
    if saved["data"]["train_sha256"] != train_fp:
        recorded = saved["data"].get("path")
        raise TrainError("the training data differ from the data this checkpoint was trained on"
                         + (f" ({recorded})" if recorded else "") + " (token fingerprints do not match)")
    if spec is not None and spec.to_dict() != ckpt_spec.to_dict():
        raise TrainError("the spec differs from the checkpoint's spec; resume without a spec or with the same one")


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def resume_changes(saved: Mapping[str, Any], config: TrainConfig, total_steps: int, world_size: int) -> list[str]:
    """One line per setting that differs from the checkpoint's, e.g. ``lr 0.003 -> 0.001 from step 65``.

    ``steps``/``epochs`` are reported as the run's total steps; a changed number of processes with
    the same global batch as ``processes``. If the learning rate of some step still to come differs
    from what the saved schedule would give it (past its end: its last rate), a last line says from
    which step and the two rates there.
    Steps are numbered as in ``metrics.jsonl`` (the first step after the checkpoint is ``step + 1``).
    """
    old = TrainConfig.from_dict(saved["config"])
    start, old_total = int(saved["step"]), int(saved["total_steps"])
    when = f"from step {start + 1}"
    lines = [f"steps {old_total} -> {total_steps} {when}"] if old_total != total_steps else []
    if saved["world_size"] != world_size:
        lines.append(f"processes {saved['world_size']} -> {world_size} {when} (batch_size per process "
                     f"{old.batch_size} -> {config.batch_size}, the same global batch)")
    for name in TrainConfig.model_fields:
        before, after = getattr(old, name), getattr(config, name)
        if name not in ("steps", "epochs", "batch_size") and before != after:
            lines.append(f"{name} {_fmt(before)} -> {_fmt(after)}" + ("" if name == "plot" else f" {when}"))
    schedule = old_total != total_steps or any(getattr(old, k) != getattr(config, k)
                                               for k in ("lr", "min_lr", "warmup_steps"))
    first = next((s for s in range(start, total_steps)
                  if lr_at(s, old, old_total) != lr_at(s, config, total_steps)), None) if schedule else None
    if first is not None:
        lines.append(f"the learning-rate schedule changes from step {first + 1}: lr there "
                     f"{lr_at(first, old, old_total):.3g} -> {lr_at(first, config, total_steps):.3g}")
    return lines
