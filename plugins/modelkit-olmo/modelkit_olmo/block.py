"""The OLMo 2 block (kind ``block``), Team OLMo 2024, "2 OLMo 2 Furious":
each sub-layer's output is normalised before it joins the residual stream."""

from __future__ import annotations

from torch import Tensor

from modelkit.components.base import LayerContext
from modelkit.components.block import AttentionPart, Part, TwoNormBlock


class SublayerPostNormBlock(TwoNormBlock):
    """OLMo 2's wiring: x + drop(norm1(att(x))), then x + drop(norm2(ff(x))) (norms after each sub-layer).

    The norms sit inside the residual branch: the stream itself is never normalised, unlike ``post_norm``.

    The slots are the two-norm block's (``att``, ``ff``, ``norm1``, ``norm2``, ``drop_shortcut``,
    built in that order); in OLMo 2's checkpoints ``norm1`` is ``post_attention_layernorm`` and
    ``norm2`` is ``post_feedforward_layernorm``. No parameters.
    """

    @staticmethod
    def wire(x: Tensor, ctx: LayerContext | None, att: AttentionPart, ff: Part, norm1: Part,
             norm2: Part, drop: Part) -> Tensor:
        x = x + drop(norm1(att(x, ctx)))
        return x + drop(norm2(ff(x)))
