"""Position-wise feed-forward networks (kind ``feedforward``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import Tensor, nn

from ..limits import MAX_HIDDEN_DIM, MAX_HIDDEN_MULT
from ..registry import SubComponent, register
from .base import FeedForward, ModelDims


@register("feedforward", "mlp")
class MLP(FeedForward):
    """The book's FeedForward: Linear(emb, hidden) -> activation -> Linear(hidden, emb).

    ``hidden`` is ``hidden_mult · emb_dim`` (the book: 4) unless ``hidden_dim`` is given.
    Parameters are ``layers.0`` and ``layers.2`` as in the book.
    """

    def __init__(
        self,
        dims: ModelDims,
        *,
        hidden_mult: Annotated[int, Field(gt=0, le=MAX_HIDDEN_MULT, description="hidden size as a multiple of emb_dim")] = 4,
        hidden_dim: Annotated[int | None, Field(gt=0, le=MAX_HIDDEN_DIM, description="hidden size; overrides hidden_mult")] = None,
        activation: Annotated[nn.Module, SubComponent("activation")] = "gelu",  # type: ignore[assignment]
        bias: Annotated[bool, Field(description="biases in both linear layers")] = True,
    ) -> None:
        super().__init__()
        hidden = hidden_dim or hidden_mult * dims.emb_dim
        self.layers = nn.Sequential(
            nn.Linear(dims.emb_dim, hidden, bias=bias),
            activation,
            nn.Linear(hidden, dims.emb_dim, bias=bias),
        )

    def residual_projections(self) -> list[nn.Linear]:
        return [self.layers[2]]

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
