"""The runtime's registrations for modelkit's built-in components: their inference steps, the
activations oneDNN computes as post-ops, and the Linear layers read with one input.

Each step computes exactly what the component's ``forward`` computes in eval mode (same kernels, in
the same order) from its parts' steps; :func:`~modelkit.runtime.steps.load_runtime_extensions`
imports this module the first time a step is asked for. A plugin's runtime module looks the same
(``plugins/modelkit-llama/modelkit_llama/runtime.py``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..components.activation import GELU, ReLU, SiLU, GELUExact
from ..components.attention import MultiHeadAttention, multi_head
from ..components.base import Dropout, LayerContext
from ..components.block import ParallelBlock, TwoNormBlock
from ..components.feedforward import MLP
from ..components.norm import LayerNorm
from ..model import GPTModel
from .onednn import register_post_op
from .stacking import linears_step, register_linear_groups
from .steps import Step, identity_step, register_step, step_of

register_post_op(GELU, "gelu", "tanh")
register_post_op(GELUExact, "gelu", "none")
register_post_op(ReLU, "relu")
register_post_op(SiLU, "swish")

register_linear_groups(MultiHeadAttention, lambda att: [(att.W_query, att.W_key, att.W_value)])


@register_step(GELU)
def gelu_step(_: GELU) -> Step:
    return lambda x: F.gelu(x, approximate="tanh")


@register_step(GELUExact)
def gelu_exact_step(_: GELUExact) -> Step:
    return F.gelu


@register_step(ReLU)
def relu_step(_: ReLU) -> Step:
    return F.relu


@register_step(SiLU)
def silu_step(_: SiLU) -> Step:
    return F.silu


@register_step(Dropout)
def dropout_step(drop: Dropout) -> Step | None:
    """The identity when dropout does nothing; else None: call the module."""
    return None if drop.training and drop.p > 0.0 else identity_step


@register_step(LayerNorm)
def layer_norm_step(norm: LayerNorm) -> Step:
    scale, shift, eps = norm.scale, norm.shift, norm.eps
    shape = scale.shape
    return lambda x: F.layer_norm(x, shape, scale, shift, eps)


@register_step(MLP)
def mlp_step(mlp: MLP) -> Step:
    return step_of(mlp.layers)


@register_step(MultiHeadAttention)
def mha_step(att: MultiHeadAttention) -> Step | None:
    """q/k/v from one matmul where they are stacked, then :func:`multi_head`; None in training mode."""
    if att.training:
        return None
    qkv = linears_step((att.W_query, att.W_key, att.W_value))
    heads, kernel, out_proj = att.num_heads, att.kernel, step_of(att.out_proj)

    def step(x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        return multi_head(x, qkv(x), ctx, heads, kernel, 0.0, out_proj)

    return step


@register_step(TwoNormBlock)
def two_norm_block_step(block: TwoNormBlock) -> Step | None:
    """The block's ``wire`` over its parts' steps; None while the shortcut dropout is on."""
    if step_of(block.drop_shortcut) is not identity_step:
        return None
    wire = block.wire
    parts = (step_of(block.att), step_of(block.ff), step_of(block.norm1), step_of(block.norm2))
    return lambda x, ctx=None: wire(x, ctx, *parts, identity_step)


@register_step(ParallelBlock)
def parallel_block_step(block: ParallelBlock) -> Step | None:
    if step_of(block.drop_shortcut) is not identity_step:
        return None
    wire, parts = block.wire, (step_of(block.att), step_of(block.ff), step_of(block.norm1))
    norm2 = None if block.shared_norm else step_of(block.norm2)
    return lambda x, ctx=None: wire(x, ctx, *parts, identity_step, norm2)


@register_step(GPTModel)
def gpt_model_step(model: GPTModel) -> Step | None:
    """``forward`` over the parts' steps (:meth:`GPTModel.forward_with`): same arguments, same logits."""
    if model.training:
        return None
    parts = (step_of(model.tok_emb), step_of(model.drop_emb), [step_of(b) for b in model.trf_blocks],
             step_of(model.final_norm), step_of(model.out_head))

    def step(in_idx: Tensor, *, cache=None, last_only: bool = False) -> Tensor:  # noqa: ANN001
        return model.forward_with(in_idx, cache, last_only, *parts)

    return step
