"""Evaluation: the mean loss per token over the first windows of each split, in eval mode, on every rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dataset import GPTDatasetV1, shard_indices
from .config import TrainConfig
from .distributed import DistContext

__all__ = ["eval_window_count", "evaluate", "evaluate_splits"]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: GPTDatasetV1, num_windows: int, batch_size: int, device: torch.device,
             ctx: DistContext = DistContext()) -> float | None:
    """Mean cross-entropy per token over windows ``0..num_windows-1`` of ``dataset``, in eval mode.

    Each rank evaluates its share (windows ``rank, rank + world, ...``) and the sums are added over
    ranks, so the value does not depend on the number of processes. None if there are no windows.
    The model is left in the mode it was in.
    """
    num_windows = min(num_windows, len(dataset))
    if num_windows == 0:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    mine = shard_indices(num_windows, ctx.rank, ctx.world_size)
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        inputs = torch.stack([dataset[i][0] for i in idx]).to(device)
        targets = torch.stack([dataset[i][1] for i in idx]).to(device)
        logits = model(inputs)
        total[0] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").double()
        total[1] += targets.numel()
    ctx.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def eval_window_count(config: TrainConfig, global_batch: int, train_set: GPTDatasetV1,
                      val_set: GPTDatasetV1 | None) -> int:
    """How many windows of each split an evaluation reads: ``eval_batches`` global batches, or all."""
    if config.eval_batches:
        return config.eval_batches * global_batch
    return max(len(train_set), len(val_set) if val_set else 0)


def evaluate_splits(model: nn.Module, train_set: GPTDatasetV1, val_set: GPTDatasetV1 | None, num_windows: int,
                    batch_size: int, device: torch.device, ctx: DistContext) -> dict[str, float]:
    """``{"train_eval_loss": ..., "val_loss": ...}`` (a key only where its split has windows)."""
    result = {}
    train_loss = evaluate(model, train_set, num_windows, batch_size, device, ctx)
    if train_loss is not None:
        result["train_eval_loss"] = train_loss
    if val_set is not None:
        val_loss = evaluate(model, val_set, num_windows, batch_size, device, ctx)
        if val_loss is not None:
            result["val_loss"] = val_loss
    return result
