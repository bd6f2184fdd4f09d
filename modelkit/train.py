"""Training's public names, as before :mod:`modelkit.training` became a package.

``from modelkit.train import train, TrainConfig`` keeps working; the code lives in
:mod:`modelkit.training` (one module per job: config, loss, schedule, data, run plan, model set-up,
distributed, evaluation, metrics, checkpoints, resume, loop).
"""

from __future__ import annotations

from .devices import resolve_device  # also modelkit.train.resolve_device, as before
from .training import (
    DATA_FIELDS,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FORMAT,
    STATE_JSON,
    STATE_TENSORS,
    STATE_VERSION,
    DistContext,
    TrainConfig,
    TrainError,
    TrainResult,
    calc_loss_batch,
    calc_loss_loader,
    evaluate,
    find_checkpoint,
    init_distributed,
    lr_at,
    read_metrics,
    read_train_state,
    recorded_data_path,
    resume_changes,
    resume_config,
    run_folder,
    save_training_checkpoint,
    train,
    train_model_simple,
)

__all__ = [
    "DATA_FIELDS", "METRICS_FILE", "MODEL_FILE", "STATE_FORMAT", "STATE_JSON", "STATE_TENSORS", "STATE_VERSION",
    "DistContext", "TrainConfig", "TrainError", "TrainResult", "calc_loss_batch", "calc_loss_loader", "evaluate",
    "find_checkpoint", "init_distributed", "lr_at", "read_metrics", "read_train_state", "recorded_data_path",
    "resolve_device", "resume_changes", "resume_config", "run_folder", "save_training_checkpoint", "train",
    "train_model_simple",
]
