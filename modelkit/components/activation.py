"""Activation functions (kind ``activation``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..registry import register
from .base import Activation, ModelDims


@register("activation", "gelu")
class GELU(Activation):
    """GELU, tanh approximation (the book's): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""

    def __init__(self, dims: ModelDims | None = None) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")



@register("activation", "gelu_exact")
class GELUExact(Activation):
    """GELU with the exact Gaussian CDF: x·Φ(x) = 0.5·x·(1 + erf(x/√2))."""

    def __init__(self, dims: ModelDims | None = None) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x)



@register("activation", "relu")
class ReLU(Activation):
    """ReLU: max(x, 0)."""

    def __init__(self, dims: ModelDims | None = None) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)



@register("activation", "silu")
class SiLU(Activation):
    """SiLU / swish: x·sigmoid(x)."""

    def __init__(self, dims: ModelDims | None = None) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x)
