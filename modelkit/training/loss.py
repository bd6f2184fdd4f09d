"""The book's loss functions (chapter 5): cross-entropy of a batch, and its mean over a loader."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["calc_loss_batch", "calc_loss_loader"]


def calc_loss_batch(input_batch: Tensor, target_batch: Tensor, model: nn.Module,
                    device: torch.device | str | None = None) -> Tensor:
    """The book's loss: mean cross-entropy of ``model(inputs)`` ``(b, s, vocab)`` against ``(b, s)`` targets."""
    if device is not None:
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader: Iterable[tuple[Tensor, Tensor]], model: nn.Module,
                     device: torch.device | str | None = None, num_batches: int | None = None) -> float:
    """The book's ``calc_loss_loader``: the mean of the first ``num_batches`` batch losses (NaN if none)."""
    total, count = 0.0, 0
    for i, (inputs, targets) in enumerate(data_loader):
        if num_batches is not None and i >= num_batches:
            break
        total += calc_loss_batch(inputs, targets, model, device).item()
        count += 1
    return total / count if count else float("nan")
