"""The sandwich-norm block (kind ``block``): a norm before and after each sub-layer, as in Gemma 2."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from modelkit.components.base import Block, BlockParts, Dropout, LayerContext, ModelDims

Part = Callable[[Tensor], Tensor]
AttentionPart = Callable[[Tensor, LayerContext | None], Tensor]


class SandwichNormBlock(Block):
    """``x + drop(post_norm1(att(norm1(x))))``, then ``x + drop(post_norm2(ff(norm2(x))))``.

    The pre-norm block with each sub-layer's output normalised again before it joins the residual
    stream (Gemma 2). Four norms of the spec's ``norm``: ``norm1`` and ``norm2`` before attention and
    feed-forward (as in ``pre_norm``), ``post_norm1`` and ``post_norm2`` after them; built in the
    order att, ff, norm1, post_norm1, norm2, post_norm2.
    """

    def __init__(self, dims: ModelDims, parts: BlockParts) -> None:
        super().__init__()
        self.att = parts.attention()
        self.ff = parts.feedforward()
        self.norm1 = parts.norm()
        self.post_norm1 = parts.norm()
        self.norm2 = parts.norm()
        self.post_norm2 = parts.norm()
        self.drop_shortcut = Dropout(dims.drop_rate)

    @staticmethod
    def wire(x: Tensor, ctx: LayerContext | None, att: AttentionPart, ff: Part, norms: tuple[Part, Part, Part, Part],
             drop: Part) -> Tensor:
        """The arrangement, with ``norms`` = (norm1, post_norm1, norm2, post_norm2); ``forward`` passes
        the modules, and a caller may pass any functions that compute the same."""
        norm1, post_norm1, norm2, post_norm2 = norms
        x = x + drop(post_norm1(att(norm1(x), ctx)))
        return x + drop(post_norm2(ff(norm2(x))))

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        """``x: (b, s, emb_dim)`` -> ``(b, s, emb_dim)``."""
        norms = (self.norm1, self.post_norm1, self.norm2, self.post_norm2)
        return self.wire(x, ctx, self.att, self.ff, norms, self.drop_shortcut)
