"""SwiGLU feed-forward network (kind ``feedforward``), Shazeer 2020, "GLU Variants Improve Transformer"."""

from __future__ import annotations

import math
from typing import Annotated

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from modelkit.components.base import FeedForward, ModelDims
from modelkit.limits import MAX_HIDDEN_DIM, MAX_MULTIPLE_OF


def llama_hidden_dim(emb_dim: int, multiple_of: int) -> int:
    """Llama's hidden size: ⌊8·emb_dim/3⌋ rounded up to a multiple of ``multiple_of`` (4096 -> 11008)."""
    return multiple_of * math.ceil(int(8 * emb_dim / 3) / multiple_of)


class SwiGLU(FeedForward):
    """SiLU-gated linear unit (Shazeer 2020), as in Llama: down(silu(gate(x)) ⊙ up(x)).

    Three linear layers ``gate_proj``, ``up_proj`` (emb_dim -> hidden) and ``down_proj``
    (hidden -> emb_dim). ``hidden_dim`` defaults to Llama's ⌊8·emb_dim/3⌋ rounded up to a multiple
    of ``multiple_of``, which keeps the parameter count of a 4·emb_dim two-layer MLP.
    """

    def __init__(
        self,
        dims: ModelDims,
        *,
        hidden_dim: Annotated[int | None, Field(gt=0, le=MAX_HIDDEN_DIM,
                                                description="hidden size (default: Llama's 8/3·emb_dim rule)")] = None,
        multiple_of: Annotated[int, Field(gt=0, le=MAX_MULTIPLE_OF,
                                          description="round the default hidden size up to this")] = 256,
        bias: Annotated[bool, Field(description="biases in the three linear layers")] = False,
    ) -> None:
        super().__init__()
        hidden = hidden_dim or llama_hidden_dim(dims.emb_dim, multiple_of)
        self.hidden_dim = hidden
        self.gate_proj = nn.Linear(dims.emb_dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dims.emb_dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dims.emb_dim, bias=bias)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.down_proj]

    def forward(self, x: Tensor) -> Tensor:
        """``x: (b, s, emb_dim)`` -> ``(b, s, emb_dim)``."""
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)
