"""Training: the book's loop (chapter 5) with a schedule, clipping, evaluation, checkpoints and DDP.

``train(spec, text_or_token_ids, TrainConfig(...)) -> TrainResult`` is the whole API; ``modelkit
train`` is a thin CLI over it. What it promises:

* **The book's maths.** Loss is :func:`calc_loss_batch` (cross-entropy of ``logits.flatten(0, 1)``
  against ``targets.flatten()``), the optimiser is ``torch.optim.AdamW`` on all parameters, the data
  are :class:`~modelkit.training.dataset.GPTDatasetV1` windows, the validation text is the last
  ``val_fraction`` of the characters. With ``shuffle=False``, no warm-up and no ``min_lr`` it takes
  the same steps as the book's ``train_model_simple``.
* **Same seed, same data: same losses.** The model is built after ``torch.manual_seed(seed)``; the
  batch order depends only on ``(seed, epoch)`` (:class:`~modelkit.training.dataset.ShardedBatchSampler`).
* **Exact resume.** A checkpoint folder holds the model, the optimiser's moments and every rank's
  RNG state, and the step, tokens, config and data fingerprints (:mod:`.checkpoints`), so N steps
  straight and N/2 + resume + N/2 give identical losses. A setting changed on resume is printed
  (stderr, rank 0) and kept in :attr:`TrainResult.resume_changes`; one that would change which
  tokens a step sees is refused with a :class:`TrainError` (:mod:`.resume`).
* **Many processes.** Under ``torchrun`` (``WORLD_SIZE > 1``) it joins the process group and trains
  with DistributedDataParallel (:mod:`.distributed`). Logged losses are averaged over ranks; only
  rank 0 writes files and shows the progress bar.

The modules, one job each: ``config`` (:class:`TrainConfig`), ``loss`` (the book's loss functions),
``schedule`` (learning rate, clipping), ``data`` (splits and windows), ``run_plan`` (what a run will
do, decided before its first step), ``model_setup`` (model, Linear kernel, optimiser),
``distributed``, ``evaluation``, ``metrics`` (``metrics.jsonl``, throughput, progress bar),
``checkpoints``, ``resume`` and ``loop`` (:func:`train`, the book's ``train_model_simple``).
"""

from .checkpoints import (
    MODEL_FILE,
    STATE_FORMAT,
    STATE_JSON,
    STATE_TENSORS,
    STATE_VERSION,
    find_checkpoint,
    read_train_state,
    recorded_data_path,
    run_folder,
    save_training_checkpoint,
)
from .config import TrainConfig, TrainError
from .distributed import DistContext, init_distributed
from .evaluation import evaluate
from .loop import TrainResult, train, train_model_simple
from .loss import calc_loss_batch, calc_loss_loader
from .metrics import METRICS_FILE, read_metrics
from .resume import DATA_FIELDS, resume_changes, resume_config
from .schedule import lr_at

__all__ = [
    "DATA_FIELDS", "METRICS_FILE", "MODEL_FILE", "STATE_FORMAT", "STATE_JSON", "STATE_TENSORS", "STATE_VERSION",
    "DistContext", "TrainConfig", "TrainError", "TrainResult", "calc_loss_batch", "calc_loss_loader", "evaluate",
    "find_checkpoint", "init_distributed", "lr_at", "read_metrics", "read_train_state", "recorded_data_path",
    "resume_changes", "resume_config", "run_folder", "save_training_checkpoint", "train", "train_model_simple",
]
