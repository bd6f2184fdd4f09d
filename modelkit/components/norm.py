"""Normalisation layers (kind ``norm``)."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..registry import register
from .base import ModelDims, Norm


@register("norm", "layernorm")
class LayerNorm(Norm):
    """Layer normalisation (the book's): scale·(x − mean)/√(var + eps) + shift, biased variance.

    Parameters are named ``scale`` (ones) and ``shift`` (zeros) as in the book.
    """

    def __init__(
        self,
        dims: ModelDims,
        *,
        eps: Annotated[float, Field(gt=0, description="added to the variance")] = 1e-5,
        bias: Annotated[bool, Field(description="learn a shift (False: no shift parameter)")] = True,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dims.emb_dim))
        if bias:
            self.shift = nn.Parameter(torch.zeros(dims.emb_dim))
        else:
            self.register_parameter("shift", None)

    def forward(self, x: Tensor) -> Tensor:
        # Same maths as the book's mean/var(unbiased=False) formula, in one fused kernel.
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)
