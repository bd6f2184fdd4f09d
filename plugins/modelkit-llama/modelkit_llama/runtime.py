"""Optional fast paths for modelkit's runtime: inference steps for the llama components, and their
Linear layers that read one input (q/k/v; gate/up), which ``optimize_for_inference`` stacks into one
matrix each.

The components are complete without this module: it only registers, for their classes, what
modelkit's runtime may use instead of calling the modules. modelkit imports it the first time it
builds an inference step or optimises a model, through the entry point in the group
``modelkit.runtime`` (see pyproject.toml). Each step computes exactly what ``forward`` computes;
modelkit's conformance check ``inference_step`` holds it to that, bit for bit.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from modelkit.components.base import LayerContext
from modelkit.runtime.stacking import linears_step, register_linear_groups
from modelkit.runtime.steps import Step, register_step, step_of

from .attention import GroupedQueryAttention
from .feedforward import SwiGLU
from .norm import RMSNorm

register_linear_groups(GroupedQueryAttention, lambda att: [(att.W_query, att.W_key, att.W_value)])
register_linear_groups(SwiGLU, lambda ff: [(ff.gate_proj, ff.up_proj)])


@register_step(RMSNorm)
def rms_norm_step(norm: RMSNorm) -> Step:
    weight, eps = norm.weight, norm.eps
    return lambda x: F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * weight


@register_step(SwiGLU)
def swiglu_step(ff: SwiGLU) -> Step:
    gate_up, down = linears_step((ff.gate_proj, ff.up_proj)), step_of(ff.down_proj)

    def step(x: Tensor) -> Tensor:
        gate, up = gate_up(x)
        return down(F.silu(gate) * up)

    return step


@register_step(GroupedQueryAttention)
def gqa_step(att: GroupedQueryAttention) -> Step | None:
    """None in training mode, where dropout applies: the module is called."""
    if att.training:
        return None
    qkv, out_proj = linears_step((att.W_query, att.W_key, att.W_value)), step_of(att.out_proj)

    def step(x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        return att.attend_projections(x, qkv(x), ctx, 0.0, out_proj)

    return step
