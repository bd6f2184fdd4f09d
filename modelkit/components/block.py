"""Transformer blocks (kind ``block``): how norms, shortcuts and dropout are arranged.

Every style has the same slots (``att``, ``ff``, ``norm1``, ``norm2``, ``drop_shortcut``, built in
the book's order so a seeded build draws the same random numbers); a style is only its wiring.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..registry import register
from .base import Block, BlockParts, Dropout, LayerContext, ModelDims

#: What stands for a part in ``wire``: the module itself, or any function computing the same.
Part = Callable[[Tensor], Tensor]
AttentionPart = Callable[[Tensor, LayerContext | None], Tensor]


class TwoNormBlock(Block):
    """A block with attention, feed-forward, two norms and shortcut dropout; a style is its ``wire``."""

    def __init__(self, dims: ModelDims, parts: BlockParts) -> None:
        super().__init__()
        self.att = parts.attention()
        self.ff = parts.feedforward()
        self.norm1 = parts.norm()
        self.norm2 = parts.norm()
        self.drop_shortcut = Dropout(dims.drop_rate)

    @staticmethod
    def wire(x: Tensor, ctx: LayerContext | None, att: AttentionPart, ff: Part, norm1: Part,
             norm2: Part, drop: Part) -> Tensor:
        """How the parts are arranged around the shortcuts; ``forward`` passes the modules, and a
        caller may pass any functions that compute the same."""
        raise NotImplementedError

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        return self.wire(x, ctx, self.att, self.ff, self.norm1, self.norm2, self.drop_shortcut)


@register("block", "pre_norm")
class PreNormBlock(TwoNormBlock):
    """The book's TransformerBlock: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    @staticmethod
    def wire(x: Tensor, ctx: LayerContext | None, att: AttentionPart, ff: Part, norm1: Part,
             norm2: Part, drop: Part) -> Tensor:
        x = x + drop(att(norm1(x), ctx))
        return x + drop(ff(norm2(x)))


@register("block", "post_norm")
class PostNormBlock(TwoNormBlock):
    """The original Transformer's wiring: norm1(x + drop(att(x))), then norm2(x + drop(ff(x)))."""

    @staticmethod
    def wire(x: Tensor, ctx: LayerContext | None, att: AttentionPart, ff: Part, norm1: Part,
             norm2: Part, drop: Part) -> Tensor:
        x = norm1(x + drop(att(x, ctx)))
        return norm2(x + drop(ff(x)))


@register("block", "parallel")
class ParallelBlock(Block):
    """GPT-J style: x + drop(att(norm1(x))) + drop(ff(norm1(x))), one shared norm."""

    def __init__(self, dims: ModelDims, parts: BlockParts) -> None:
        super().__init__()
        self.att = parts.attention()
        self.ff = parts.feedforward()
        self.norm1 = parts.norm()
        self.drop_shortcut = Dropout(dims.drop_rate)

    @staticmethod
    def wire(x: Tensor, ctx: LayerContext | None, att: AttentionPart, ff: Part, norm1: Part, drop: Part) -> Tensor:
        """The arrangement, with the parts as in :meth:`TwoNormBlock.wire`."""
        h = norm1(x)
        return x + drop(att(h, ctx)) + drop(ff(h))

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        return self.wire(x, ctx, self.att, self.ff, self.norm1, self.drop_shortcut)
