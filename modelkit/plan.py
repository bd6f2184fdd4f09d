"""Inference steps: a module's forward as plain function calls, for decoding.

A gpt2-small decode step makes ~150 module calls, and each ``nn.Module.__call__`` checks for hooks,
each Linear checks dtype, device, autograd and layout, and attention checks that its stacked q/k/v
matrix is still valid. That is the same answer 200 times per generated sequence: measured on a
2-core CPU (gpt2-small, one decode step at 116 cached tokens, in-process rounds), the model's forward
took 12.8 ms per token where the same kernels called from one flat loop took 11.7
(``benchmarks/peers.py``'s hand-written loop). Through its inference step: 11.22 vs 11.19.

:func:`step_of` checks all of that once and returns a function computing ``module(...)``:

- a component that defines ``inference_step()`` (in the class that defines its ``forward``, so a
  subclass that overrides ``forward`` is never given its parent's step) returns a function built from
  its children's steps, or None when it cannot (training mode, an unusual configuration);
- ``nn.Sequential``, ``nn.Identity``, ``nn.Linear`` and ``nn.Embedding`` get their steps here;
- anything else, or any module with hooks, is called as a module: plugins need no step to take part,
  and their forward runs exactly as before.

Steps compute exactly what ``forward`` computes (same kernels, same order: the tests compare logits
bit for bit). A step is valid for the module as it was when the step was built: it holds the
parameter objects (in-place updates and ``.data`` swaps are seen), not a snapshot of the structure,
so replacing a submodule or parameter, adding hooks or switching to training mode needs a new step.
:func:`modelkit.generate` builds one at the start of every call, which is why the model must not be
changed while a generation runs (its KV cache would be stale anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["identity_step", "step_of", "uses_step"]

Step = Callable[..., Any]


def identity_step(x: Tensor) -> Tensor:
    """The step of a module that returns its input (``nn.Identity``, dropout in eval mode)."""
    return x


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or module._forward_hooks_with_kwargs
                or module._forward_pre_hooks_with_kwargs)


def _global_hooks() -> bool:
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def _defining_class(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


def uses_step(module: nn.Module) -> bool:
    """Whether ``module``'s own ``inference_step`` may stand for its forward: it is defined by the same
    class as ``forward``, and the module has no hooks."""
    cls = type(module)
    owner = _defining_class(cls, "inference_step")
    return not _has_hooks(module) and owner is not None and owner is _defining_class(cls, "forward")


def step_of(module: nn.Module) -> Step:
    """A function computing ``module(*args)`` in inference (autograd off), or the module itself.

    See the module docstring for what it may return and for how long the result is valid. With global
    module hooks registered or autocast on, every module is called as a module.
    """
    if _has_hooks(module) or _global_hooks() or torch.is_autocast_enabled("cpu"):
        return module
    cls = type(module)
    if cls is nn.Identity:
        return identity_step
    if cls is nn.Sequential:
        steps = [s for s in (step_of(m) for m in module) if s is not identity_step]
        if len(steps) == 1:
            return steps[0]
        if len(steps) == 2:
            first, second = steps
            return lambda x: second(first(x))
        return _chain(steps)
    if cls is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    if cls is nn.Embedding:
        e = module
        weight, args = e.weight, (e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        return lambda x: F.embedding(x, weight, *args)
    if uses_step(module):
        step = module.inference_step()  # type: ignore[operator]
        if step is not None:
            return step
    return module


def _chain(steps: list[Step]) -> Step:
    def chained(x: Tensor) -> Tensor:
        for step in steps:
            x = step(x)
        return x

    return chained
