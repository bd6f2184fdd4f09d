"""RMSNorm (kind ``norm``), Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from modelkit.components.base import ModelDims, Norm


class RMSNorm(Norm):
    """RMSNorm (Zhang & Sennrich 2019): weight · x / √(mean(x²) + eps); no centring, no shift.

    The mean is over the last dimension (``emb_dim``); the maths runs in float32 and the result is
    cast back to the input's dtype before scaling, as in Llama. Parameter: ``weight`` (ones).
    """

    def __init__(self, dims: ModelDims, *,
                 eps: Annotated[float, Field(gt=0, description="added to the mean square")] = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dims.emb_dim))

    def forward(self, x: Tensor) -> Tensor:
        """``x: (..., emb_dim)`` -> the same shape and dtype."""
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
