"""Transformer blocks (kind ``block``): how norms, shortcuts and dropout are arranged.

Every style has the same slots (``att``, ``ff``, ``norm1``, ``norm2``, ``drop_shortcut``, built in
the book's order so a seeded build draws the same random numbers); a style is only its wiring.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import register
from .base import Block, BlockParts, Dropout, LayerContext, ModelDims


class _TwoNormBlock(Block):
    def __init__(self, dims: ModelDims, parts: BlockParts) -> None:
        super().__init__()
        self.att = parts.attention()
        self.ff = parts.feedforward()
        self.norm1 = parts.norm()
        self.norm2 = parts.norm()
        self.drop_shortcut = Dropout(dims.drop_rate)


@register("block", "pre_norm")
class PreNormBlock(_TwoNormBlock):
    """The book's TransformerBlock: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), ctx))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


@register("block", "post_norm")
class PostNormBlock(_TwoNormBlock):
    """The original Transformer's wiring: norm1(x + drop(att(x))), then norm2(x + drop(ff(x)))."""

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        x = self.norm1(x + self.drop_shortcut(self.att(x, ctx)))
        return self.norm2(x + self.drop_shortcut(self.ff(x)))


@register("block", "parallel")
class ParallelBlock(Block):
    """GPT-J style: x + drop(att(norm1(x))) + drop(ff(norm1(x))), one shared norm."""

    def __init__(self, dims: ModelDims, parts: BlockParts) -> None:
        super().__init__()
        self.att = parts.attention()
        self.ff = parts.feedforward()
        self.norm1 = parts.norm()
        self.drop_shortcut = Dropout(dims.drop_rate)

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        h = self.norm1(x)
        return x + self.drop_shortcut(self.att(h, ctx)) + self.drop_shortcut(self.ff(h))
