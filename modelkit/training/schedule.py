"""The learning-rate schedule, a function of the step alone (so a resumed run continues it exactly).

Learning rate at step ``s`` (0-based): ``lr·(s+1)/warmup_steps`` during warm-up, then ``lr`` if
``min_lr`` is None, else cosine decay from ``lr`` to ``min_lr`` at the last step.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig

__all__ = ["clip_gradients", "lr_at", "set_lr"]


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate for (0-based) ``step``: linear warm-up, then constant or cosine to ``min_lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.min_lr is None:
        return config.lr
    decay_steps = max(total_steps - config.warmup_steps - 1, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Give every parameter group of ``optimizer`` the learning rate ``lr``; returns ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def clip_gradients(model: torch.nn.Module, max_norm: float | None) -> float | None:
    """Clip the gradients' global norm to ``max_norm`` and return the norm before clipping (None: no clipping)."""
    if max_norm is None:
        return None
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
