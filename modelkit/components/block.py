"""Transformer blocks (kind ``block``): how norms, shortcuts and dropout are arranged.

Every style has the same slots (``att``, ``ff``, ``norm1``, ``norm2``, ``drop_shortcut``, built in
the book's order so a seeded build draws the same random numbers); a style is only its wiring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from pydantic import Field

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
    """Parallel residual: x + drop(att(norm1(x))) + drop(ff(norm(x))).

    ``shared_norm: true`` (the default, GPT-J): the feed-forward reads the same ``norm1(x)``, one
    norm per block. ``false`` (GPT-NeoX / Pythia): it reads a second norm ``norm2(x)``, built after
    ``norm1`` (the default builds exactly the modules, in the order, it always did).
    """

    def __init__(self, dims: ModelDims, parts: BlockParts, *,
                 shared_norm: Annotated[bool, Field(
                     description="one norm for attention and feed-forward (GPT-J); false: a second norm "
                                 "norm2 for the feed-forward (GPT-NeoX)")] = True) -> None:
        super().__init__()
        self.att = parts.attention()
        self.ff = parts.feedforward()
        self.norm1 = parts.norm()
        self.shared_norm = shared_norm
        if not shared_norm:  # no norm2 attribute at all with the default, as before
            self.norm2 = parts.norm()
        self.drop_shortcut = Dropout(dims.drop_rate)

    @staticmethod
    def wire(x: Tensor, ctx: LayerContext | None, att: AttentionPart, ff: Part, norm1: Part, drop: Part,
             norm2: Part | None = None) -> Tensor:
        """The arrangement, with the parts as in :meth:`TwoNormBlock.wire`; without ``norm2`` the
        feed-forward reads ``norm1(x)`` (computed once), with it ``norm2(x)``."""
        h = norm1(x)
        return x + drop(att(h, ctx)) + drop(ff(h if norm2 is None else norm2(x)))

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        return self.wire(x, ctx, self.att, self.ff, self.norm1, self.drop_shortcut, self.second_norm())

    def second_norm(self) -> Part | None:
        """The feed-forward's own norm (``norm2``), or None when it shares ``norm1``."""
        return None if self.shared_norm else self.norm2
