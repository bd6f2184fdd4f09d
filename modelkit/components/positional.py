"""Positional components (kind ``positional``): how token positions enter the model."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor, nn

from ..registry import register
from .base import ModelDims, Positional

MAX_OFFSET = 1024  # reserved rows of a learned table at most (OPT uses 2)


@register("positional", "learned")
class LearnedPositional(Positional):
    """Absolute learned position embeddings (the book's ``pos_emb``), added to the token embeddings.

    A ``(context_length + offset, emb_dim)`` table initialised N(0, 1) like ``nn.Embedding``; its
    parameter is ``pos_emb.weight`` in the model, as in the book. Position ``p`` reads row
    ``p + offset``: ``offset`` 0 (the default) is the book's table; OPT's reserves 2 leading rows
    (``offset: 2``), which no position reads.
    """

    def __init__(self, dims: ModelDims, *,
                 offset: Annotated[int, Field(ge=0, le=MAX_OFFSET, description=(
                     "rows before position 0's (OPT: 2); the table has context_length + offset rows"))] = 0) -> None:
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(dims.context_length + offset, dims.emb_dim))
        nn.init.normal_(self.weight)

    def embedding(self, positions: Tensor) -> Tensor:
        """Rows ``positions + offset`` of the table, ``(len(positions), emb_dim)``."""
        return self.weight[positions + self.offset] if self.offset else self.weight[positions]


@register("positional", "sinusoidal")
class SinusoidalPositional(Positional):
    """Fixed sinusoidal embeddings (Vaswani et al. 2017), added to the token embeddings.

    PE[p, 2i] = sin(p / base^(2i/emb_dim)), PE[p, 2i+1] = cos(p / base^(2i/emb_dim)). No parameters.
    """

    def __init__(self, dims: ModelDims, *,
                 base: Annotated[float, Field(gt=1, description="wavelength base")] = 10000.0) -> None:
        super().__init__()
        self.emb_dim = dims.emb_dim
        self.base = base

    def embedding(self, positions: Tensor) -> Tensor:
        half = (self.emb_dim + 1) // 2
        exponent = torch.arange(half, device=positions.device, dtype=torch.float32) * 2 / self.emb_dim
        inv_freq = torch.exp(-math.log(self.base) * exponent)
        angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
        return pe[:, : self.emb_dim]


@register("positional", "none")
class NoPosition(Positional):
    """No positional information (a causal model can still infer some order)."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
