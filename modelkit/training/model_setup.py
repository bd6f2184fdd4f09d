"""Setting up what trains: the model (built right after seeding, the book's order), its Linear kernel, the optimiser."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import TrainConfig, TrainError
from .distributed import DistContext

if TYPE_CHECKING:
    from ..model import GPTModel
    from .run_plan import RunPlan

__all__ = ["build_training_model", "choose_linear_kernel", "make_optimizer"]


def build_training_model(plan: RunPlan, ctx: DistContext, device: torch.device) -> GPTModel:
    """The model of ``plan.model_spec``, built on the CPU after ``torch.manual_seed(seed)``, given the
    checkpoint's weights on resume, moved to ``device`` with its Linear kernel chosen. With several
    processes each rank then seeds its own dropout stream (``seed + rank``, modulo 2**64)."""
    from ..builder import build_model

    config = plan.config
    torch.manual_seed(config.seed)
    model = build_model(plan.model_spec)
    if plan.checkpoint_model is not None:
        model.load_state_dict(plan.checkpoint_model.state_dict())
        plan.checkpoint_model = None
    model.to(device)
    choose_linear_kernel(model, config.linear_kernel, device)
    if ctx.world_size > 1:
        torch.manual_seed((config.seed + ctx.rank) % 2**64)  # each rank its own dropout stream
    return model


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The book's optimiser: AdamW on all parameters with the config's lr, weight decay and betas."""
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)


def choose_linear_kernel(model: nn.Module, kernel: str, device: torch.device) -> None:
    """``auto``: oneDNN Linear layers on a CPU where they train faster than PyTorch's
    (:func:`modelkit.runtime.optimize.onednn_trains_faster`: with AVX-512), else ``F.linear``; ``onednn``,
    ``aten``: that kernel. Raises :class:`TrainError` for ``onednn`` where it cannot run."""
    from ..runtime.onednn import onednn_linear_available, use_onednn_linear_
    from ..runtime.optimize import onednn_trains_faster

    if kernel == "onednn" and (device.type != "cpu" or not onednn_linear_available()):
        raise TrainError("linear_kernel 'onednn' needs the CPU and a PyTorch build with oneDNN")
    if kernel == "onednn" or (kernel == "auto" and device.type == "cpu" and onednn_trains_faster()):
        use_onednn_linear_(model)
