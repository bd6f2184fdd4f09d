"""A gated feed-forward network with any activation (kind ``feedforward``), Shazeer 2020, "GLU Variants
Improve Transformer"; with the tanh GELU (the default) it is Gemma's GeGLU."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import Tensor, nn

from modelkit.components.base import FeedForward, ModelDims
from modelkit.limits import MAX_HIDDEN_DIM, MAX_HIDDEN_MULT
from modelkit.registry import SubComponent


class GatedFeedForward(FeedForward):
    """Gated linear unit (Shazeer 2020): ``down(activation(gate(x)) ⊙ up(x))``.

    Three linear layers ``gate_proj``, ``up_proj`` (emb_dim -> hidden) and ``down_proj``
    (hidden -> emb_dim), named as in Hugging Face's Gemma. ``activation`` is any registered
    activation: ``gelu`` (the tanh approximation; the default) makes GeGLU as in Gemma, ``gelu_exact``
    the erf form, ``silu`` SwiGLU. ``hidden`` is ``hidden_mult · emb_dim`` unless ``hidden_dim`` is given.
    """

    def __init__(
        self,
        dims: ModelDims,
        *,
        hidden_mult: Annotated[int, Field(gt=0, le=MAX_HIDDEN_MULT,
                                          description="hidden size as a multiple of emb_dim")] = 4,
        hidden_dim: Annotated[int | None, Field(gt=0, le=MAX_HIDDEN_DIM,
                                                description="hidden size; overrides hidden_mult")] = None,
        activation: Annotated[nn.Module, SubComponent("activation")] = "gelu",  # type: ignore[assignment]
        bias: Annotated[bool, Field(description="biases in the three linear layers")] = False,
    ) -> None:
        super().__init__()
        hidden = hidden_dim or hidden_mult * dims.emb_dim
        self.hidden_dim = hidden
        self.gate_proj = nn.Linear(dims.emb_dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dims.emb_dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dims.emb_dim, bias=bias)
        self.activation = activation

    def residual_projections(self) -> list[nn.Linear]:
        return [self.down_proj]

    def forward(self, x: Tensor) -> Tensor:
        """``x: (b, s, emb_dim)`` -> ``(b, s, emb_dim)``."""
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))
