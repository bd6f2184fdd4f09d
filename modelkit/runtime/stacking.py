"""Stacked Linear layers: layers that read one input (an attention's q/k/v), stored as one matrix so
that inference reads all their weights in one matmul.

A component class declares which of its Linear layers always read the same input, in the runtime::

    register_linear_groups(MultiHeadAttention, lambda att: [(att.W_query, att.W_key, att.W_value)])

The declaration is a promise about the class's ``forward``: it calls the layers of a group one after
the other with the same tensor, unchanged in between. ``optimize_for_inference`` then calls
:func:`stack_linears_`: each group whose layers are plain :class:`~modelkit.runtime.onednn.OneDNNLinear`
of one dtype, device and input size gets one ``(sum of out_features, in_features)`` matrix, in the
weights' current layout, and each ``Parameter`` is pointed at its block (objects, names, values and
the state dict unchanged). The layers become :class:`StackedLinear` modules sharing a
:class:`StackedLinears` group, so the component's ``forward`` is untouched:

- in inference (autograd off, not compiling) the first layer called with an input computes the
  whole group's outputs with one oneDNN matmul, and the others take theirs when called with the very
  same tensor; any other call computes the layer alone, as a OneDNNLinear;
- inference steps (:func:`linears_step`) call the one matmul directly.

``.to()``, a new weight layout or a re-assigned weight moves a parameter out of the matrix: the group
checks the parameters' addresses before each use and then lets the matrix go for good. A deep copy
of the model gets a released group (its parameters are copied one by one). ``docs/performance.md``
has what stacking saves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .onednn import OneDNNLinear, onednn_applies, onednn_linear_available
from .steps import Step, global_hooks, has_hooks, register_step, registered_for, step_of

__all__ = ["StackedLinear", "StackedLinears", "linears_step", "register_linear_groups", "stack_linears_"]

GroupsOf = Callable[[Any], Sequence[Sequence[nn.Module]]]
_GROUPS: dict[type, GroupsOf] = {}


def register_linear_groups(cls: type[nn.Module], groups: GroupsOf) -> None:
    """Declare the groups of Linear layers that a ``cls`` module's forward applies to one input
    (see the module docstring for the promise this makes). The last registration for a class wins."""
    _GROUPS[cls] = groups


class StackedLinears:
    """The shared matrix of a group of :class:`StackedLinear` layers (see the module docstring)."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        w0 = layers[0].weight
        if any(m.weight.dtype != w0.dtype or m.weight.device != w0.device or m.in_features != layers[0].in_features
               for m in layers):
            raise ValueError("stacked layers need one dtype, device and in_features")
        if len({m.bias is None for m in layers}) > 1:
            raise ValueError("stacked layers need biases in all of them or in none")
        self.sizes = [m.out_features for m in layers]
        total, n_in = sum(self.sizes), layers[0].in_features
        columns = all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in layers)
        with torch.no_grad():
            weight = (torch.empty(n_in, total, dtype=w0.dtype, device=w0.device).t() if columns
                      else torch.empty(total, n_in, dtype=w0.dtype, device=w0.device))
            for m, block in zip(layers, weight.split(self.sizes)):
                block.copy_(m.weight)
                m.weight.data = block
            bias = None
            if layers[0].bias is not None:
                bias = torch.empty(total, dtype=layers[0].bias.dtype, device=w0.device)
                for m, block in zip(layers, bias.split(self.sizes)):
                    block.copy_(m.bias)
                    m.bias.data = block
        self.weight: Tensor | None = weight
        self.bias = bias
        self.members: list[StackedLinear] = []
        self._offsets = self._offsets_of(layers)
        self._pending: tuple[Tensor, list[Tensor], set[int]] | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> StackedLinears:
        # The copied parameters are copied one by one, no longer blocks of one matrix: a released group.
        new = copy.copy(self)
        memo[id(self)] = new
        new.weight = new.bias = new._pending = None
        new.members = copy.deepcopy(self.members, memo)
        return new

    def _offsets_of(self, layers: Sequence[nn.Linear]) -> list[tuple[int, int]]:
        """Where each layer's weight and bias start, in bytes from the stacked matrix and bias."""
        assert self.weight is not None
        w0, b0 = self.weight.data_ptr(), self.bias.data_ptr() if self.bias is not None else 0
        return [(m.weight.data_ptr() - w0, m.bias.data_ptr() - b0 if m.bias is not None else 0) for m in layers]

    def usable(self) -> bool:
        """Whether the matrix still holds the members' parameters (else it is let go for good) and the
        oneDNN op computes its dtype here."""
        if self.weight is not None and self._offsets_of(self.members) != self._offsets:
            self.weight = self.bias = self._pending = None
        return self.weight is not None and onednn_linear_available(self.weight.dtype)

    def outputs(self, x: Tensor) -> list[Tensor]:
        """Every member's output for ``x``, from one matmul (the caller checked :meth:`usable`)."""
        return list(torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
                    .split(self.sizes, dim=-1))

    def output_for(self, member: StackedLinear, x: Tensor) -> Tensor | None:
        """``member(x)`` from the group's one matmul in inference, or None: the member computes it alone."""
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or self.weight is None:
            return None
        pending = self._pending
        if pending is None or pending[0] is not x or member.index in pending[2]:
            if not (self.usable() and onednn_applies(x, self.weight)):  # type: ignore[arg-type]
                return None
            pending = self._pending = (x, self.outputs(x), set())
        pending[2].add(member.index)
        if len(pending[2]) == len(self.members):
            self._pending = None  # every member has its output: hold no tensor
        return pending[1][member.index]


class StackedLinear(OneDNNLinear):
    """A :class:`~modelkit.runtime.onednn.OneDNNLinear` whose parameters are blocks of its group's
    matrix; in inference it takes its output from the group's one matmul (see the module docstring)."""

    group: StackedLinears
    index: int

    def forward(self, x: Tensor) -> Tensor:
        out = self.group.output_for(self, x)
        return out if out is not None else super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stacked {self.index + 1} of {len(self.group.members)}"


def _stack(layers: Sequence[nn.Module]) -> StackedLinears | None:
    """Stack ``layers`` when each is a plain OneDNNLinear and they fit one matrix, else None."""
    if len(layers) < 2 or not all(type(m) is OneDNNLinear for m in layers):
        return None
    try:
        group = StackedLinears(layers)  # type: ignore[arg-type]
    except ValueError:
        return None
    for index, layer in enumerate(layers):
        layer.__class__ = StackedLinear  # the same module object: parents, hooks and names unchanged
        layer.group, layer.index = group, index  # type: ignore[attr-defined]
        group.members.append(layer)  # type: ignore[arg-type]
    return group


def stack_linears_(model: nn.Module) -> int:
    """Stack the declared groups (:func:`register_linear_groups`) of every module of ``model``, in
    place; returns how many groups were stacked."""
    for module in list(model.modules()):  # members of a released group become plain layers again
        if type(module) is StackedLinear and not module.group.usable():
            module.__class__ = OneDNNLinear
            del module.group, module.index
    stacked = 0
    for module in list(model.modules()):
        groups_of = registered_for(_GROUPS, type(module))
        if groups_of is not None:
            stacked += sum(_stack(layers) is not None for layers in groups_of(module))
    return stacked


def linears_step(layers: Sequence[nn.Module]) -> Callable[[Tensor], Sequence[Tensor]]:
    """An inference step computing ``[layer(x) for layer in layers]``: one matmul when the layers are
    exactly one usable stacked group, in order (checked once; the input's dtype and device and the
    grad mode per call), else each layer's step."""
    steps = [step_of(m) for m in layers]

    def each(x: Tensor) -> list[Tensor]:
        return [step(x) for step in steps]

    group = getattr(layers[0], "group", None) if type(layers[0]) is StackedLinear else None
    if group is None or list(layers) != group.members or not group.usable():
        return each
    if any(has_hooks(m) for m in layers) or global_hooks() or torch.is_autocast_enabled("cpu"):
        return each  # hooks must see each call: call the modules
    op, w, b, sizes = torch.ops.mkldnn._linear_pointwise, group.weight, group.bias, group.sizes
    dtype, grad_enabled = w.dtype, torch.is_grad_enabled

    def one_matmul(x: Tensor) -> Sequence[Tensor]:
        if x.dtype is dtype and x.is_cpu and not grad_enabled():
            return op(x, w, b, "none", [], "").split(sizes, dim=-1)
        return each(x)

    return one_matmul


@register_step(StackedLinear)
def stacked_linear_step(layer: StackedLinear) -> Step | None:
    """A member alone is called as a module (its forward knows its group); groups go through
    :func:`linears_step`."""
    return None
