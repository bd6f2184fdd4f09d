"""Gemma's RMSNorm (kind ``norm``): the weight is an offset from one, and the scaling runs in float32."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from modelkit.components.base import ModelDims, Norm


class GemmaRMSNorm(Norm):
    """RMSNorm as in Gemma: ``x / √(mean(x²) + eps) · (1 + weight)``.

    Unlike Llama's RMSNorm the learned weight is stored as an offset from one (initialised to
    zeros, so a fresh norm is the identity scaling) and the product is taken in float32 before the
    result is cast back to the input's dtype (Llama casts first, then scales). Parameter: ``weight``.
    """

    def __init__(self, dims: ModelDims, *,
                 eps: Annotated[float, Field(gt=0, description="added to the mean square")] = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dims.emb_dim))

    def forward(self, x: Tensor) -> Tensor:
        """``x: (..., emb_dim)`` -> the same shape and dtype."""
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
