"""Planning a run: everything decided before the first step (spec, completed config, data, step counts, resume checks)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .dataset import DataError, GPTDatasetV1, TokenSource, fingerprint
from ..spec import ModelSpec, load_spec
from .checkpoints import MODEL_FILE, STATE_FORMAT, STATE_VERSION
from .config import TrainConfig, TrainError
from .data import prepare_data
from .resume import check_resume, resume_changes

if TYPE_CHECKING:
    from ..model import GPTModel

__all__ = ["RunPlan", "plan_run"]

SpecSource = ModelSpec | Mapping[str, Any] | str | os.PathLike[str]


@dataclass
class RunPlan:
    """A run, decided: ``config`` has ``max_length`` and ``stride`` filled in; steps ``start_step + 1 ..
    stop_step`` of ``total_steps`` are to be taken. ``saved`` is the checkpoint's JSON state on resume
    and ``checkpoint_model`` its model until the training model has taken its weights."""

    config: TrainConfig
    model_spec: ModelSpec
    train_set: GPTDatasetV1
    val_set: GPTDatasetV1 | None
    train_ids: Tensor
    val_ids: Tensor
    train_fingerprint: str
    data_path: str | None
    world_size: int
    global_batch: int
    batches_per_epoch: int
    total_steps: int
    start_step: int
    stop_step: int
    saved: dict[str, Any] | None
    changes: list[str]
    checkpoint_model: GPTModel | None = None

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step reads, over all processes."""
        assert self.config.max_length is not None
        return self.global_batch * self.config.max_length

    @property
    def start_tokens(self) -> int:
        """Tokens the run had read before this call (0 unless resuming)."""
        return self.saved["tokens"] if self.saved is not None else 0

    @property
    def previous_seconds(self) -> float:
        """Seconds the run had spent in optimizer steps before this call."""
        return float(self.saved.get("train_seconds", 0.0)) if self.saved is not None else 0.0

    def train_state(self, step: int, tokens: int, seconds: float) -> dict[str, Any]:
        """The JSON part of a checkpoint taken after ``step`` (``train_state.json``)."""
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "tokens": tokens,
            "total_steps": self.total_steps, "world_size": self.world_size, "global_batch_size": self.global_batch,
            "batches_per_epoch": self.batches_per_epoch, "config": self.config.to_dict(),
            "data": {"train_sha256": self.train_fingerprint, "val_sha256": fingerprint(self.val_ids),
                     "train_tokens": len(self.train_ids), "val_tokens": len(self.val_ids),
                     **({"path": self.data_path} if self.data_path is not None else {})},
            "train_seconds": seconds,
        }


def plan_run(spec: SpecSource | None, data: TokenSource, val_data: TokenSource | None, config: TrainConfig,
             saved: dict[str, Any] | None, pause_at: int | None, data_path: str | os.PathLike[str] | None,
             world_size: int) -> RunPlan:
    """Decide the run; raises :class:`TrainError` / :class:`~modelkit.training.dataset.DataError` for what cannot run."""
    model_spec, checkpoint_model = _model_spec(spec, saved)
    config = _complete_config(config, model_spec)
    assert config.max_length is not None and config.stride is not None
    train_set, val_set, train_ids, val_ids = prepare_data(data, val_data, config, config.max_length, config.stride,
                                                          model_spec.vocab_size)
    train_fp = fingerprint(train_ids)
    if saved is not None:
        check_resume(saved, config, load_spec(spec) if spec is not None else None, model_spec, train_fp, world_size)
    global_batch = config.batch_size * world_size
    batches_per_epoch = _batches_per_epoch(len(train_set), global_batch)
    total_steps = config.steps or (config.epochs or 1) * batches_per_epoch
    start_step = saved["step"] if saved is not None else 0
    stop_step = min(pause_at, total_steps) if pause_at is not None else total_steps
    if stop_step < start_step:
        raise TrainError(f"the checkpoint is at step {start_step}, past the requested stop at step {stop_step}")
    changes = resume_changes(saved, config, total_steps, world_size) if saved is not None else []
    return RunPlan(config, model_spec, train_set, val_set, train_ids, val_ids, train_fp,
                   _data_path(data_path, saved), world_size, global_batch, batches_per_epoch, total_steps,
                   start_step, stop_step, saved, changes, checkpoint_model)


def _model_spec(spec: SpecSource | None, saved: Mapping[str, Any] | None) -> tuple[ModelSpec, GPTModel | None]:
    """The spec to train (the checkpoint's on resume) and, on resume, the checkpoint's model."""
    if saved is not None:
        from ..weights.checkpoint import load_checkpoint

        checkpoint_model = load_checkpoint(Path(saved["folder"]) / MODEL_FILE)
        return checkpoint_model.spec, checkpoint_model
    if spec is None:
        raise TrainError("give a spec (or resume from a checkpoint)")
    return load_spec(spec), None


def _complete_config(config: TrainConfig, model_spec: ModelSpec) -> TrainConfig:
    """``config`` with ``max_length`` (default: the context length) and ``stride`` (default: ``max_length``) set."""
    max_length = config.max_length or model_spec.context_length
    if max_length > model_spec.context_length:
        raise TrainError(f"max_length {max_length} exceeds the model's context_length {model_spec.context_length}")
    return config.replace(max_length=max_length, stride=config.stride or max_length)


def _data_path(data_path: str | os.PathLike[str] | None, saved: Mapping[str, Any] | None) -> str | None:
    """The data file to record: the one named (made absolute), else the checkpoint's record."""
    if data_path is not None:
        return os.path.abspath(os.fspath(data_path))
    return saved["data"].get("path") if saved is not None else None


def _batches_per_epoch(windows: int, global_batch: int) -> int:
    """Full global batches in ``windows`` training windows; raises :class:`DataError` if not one."""
    if windows < global_batch:
        raise DataError(f"the training split has {windows} windows, fewer than one global batch of "
                        f"{global_batch}; use more text or a smaller batch size, max_length or stride")
    return windows // global_batch
