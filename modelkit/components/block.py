"""Transformer blocks (kind ``block``): how norms, shortcuts and dropout are arranged.

Every style has the same slots (``att``, ``ff``, ``norm1``, ``norm2``, ``drop_shortcut``, built in
the book's order so a seeded build draws the same random numbers); a style is only its wiring.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..plan import Step, identity_step, step_of
from ..registry import register
from .base import Block, BlockParts, Dropout, LayerContext, ModelDims

BlockStep = Callable[[Tensor, LayerContext | None], Tensor]


class _TwoNormBlock(Block):
    """A block with attention, feed-forward, two norms and shortcut dropout; a style is its ``wire``."""

    def __init__(self, dims: ModelDims, parts: BlockParts) -> None:
        super().__init__()
        self.att = parts.attention()
        self.ff = parts.feedforward()
        self.norm1 = parts.norm()
        self.norm2 = parts.norm()
        self.drop_shortcut = Dropout(dims.drop_rate)

    @staticmethod
    def wire(x: Tensor, ctx: LayerContext | None, att: BlockStep, ff: Step, norm1: Step, norm2: Step,
             drop: Step) -> Tensor:
        """How the parts (modules, or their inference steps) are arranged around the shortcuts."""
        raise NotImplementedError

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        return self.wire(x, ctx, self.att, self.ff, self.norm1, self.norm2, self.drop_shortcut)

    def inference_step(self) -> BlockStep | None:
        """``wire`` over the parts' inference steps (:mod:`modelkit.plan`); None while the shortcut
        dropout is on."""
        if step_of(self.drop_shortcut) is not identity_step:
            return None
        wire, parts = self.wire, (step_of(self.att), step_of(self.ff), step_of(self.norm1), step_of(self.norm2))
        return lambda x, ctx=None: wire(x, ctx, *parts, identity_step)


@register("block", "pre_norm")
class PreNormBlock(_TwoNormBlock):
    """The book's TransformerBlock: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    @staticmethod
    def wire(x: Tensor, ctx: LayerContext | None, att: BlockStep, ff: Step, norm1: Step, norm2: Step,
             drop: Step) -> Tensor:
        x = x + drop(att(norm1(x), ctx))
        return x + drop(ff(norm2(x)))


@register("block", "post_norm")
class PostNormBlock(_TwoNormBlock):
    """The original Transformer's wiring: norm1(x + drop(att(x))), then norm2(x + drop(ff(x)))."""

    @staticmethod
    def wire(x: Tensor, ctx: LayerContext | None, att: BlockStep, ff: Step, norm1: Step, norm2: Step,
             drop: Step) -> Tensor:
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

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        h = self.norm1(x)
        return x + self.drop_shortcut(self.att(h, ctx)) + self.drop_shortcut(self.ff(h))

    def inference_step(self) -> BlockStep | None:
        if step_of(self.drop_shortcut) is not identity_step:
            return None
        att, ff, norm1 = step_of(self.att), step_of(self.ff), step_of(self.norm1)

        def step(x: Tensor, ctx: LayerContext | None = None) -> Tensor:
            h = norm1(x)
            return x + att(h, ctx) + ff(h)

        return step
