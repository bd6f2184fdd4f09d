"""Optional fast paths for modelkit's runtime: the gated feed-forward's ``gate_proj``/``up_proj``, which
read one input, registered as a Linear group that ``optimize_for_inference`` stacks into one matrix,
and its inference step reading both through one call.

The components are complete without this module; modelkit imports it through the entry point in
the group ``modelkit.runtime`` (see pyproject.toml). The step computes exactly what ``forward``
computes; modelkit's conformance check ``inference_step`` holds it to that, bit for bit.
"""

from __future__ import annotations

from torch import Tensor

from modelkit.runtime.stacking import linears_step, register_linear_groups
from modelkit.runtime.steps import Step, register_step, step_of

from .feedforward import GatedFeedForward

register_linear_groups(GatedFeedForward, lambda ff: [(ff.gate_proj, ff.up_proj)])


@register_step(GatedFeedForward)
def gated_feedforward_step(ff: GatedFeedForward) -> Step:
    gate_up, act, down = linears_step((ff.gate_proj, ff.up_proj)), step_of(ff.activation), step_of(ff.down_proj)

    def step(x: Tensor) -> Tensor:
        gate, up = gate_up(x)
        return down(act(gate) * up)

    return step
