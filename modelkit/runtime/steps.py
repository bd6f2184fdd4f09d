"""Inference steps: a module's forward as plain function calls, for decoding.

A gpt2-small decode step makes ~150 module calls, and each ``nn.Module.__call__`` checks for hooks
and each Linear checks dtype, device, autograd and layout: the same answer for every token of a
generation. :func:`step_of` checks all of that once and returns a function computing ``module(...)``;
:func:`modelkit.generate` calls the model through it (``docs/performance.md`` has the figures).

Steps are registered by component class, in the runtime, so components stay plain modules::

    @register_step(MultiHeadAttention)
    def mha_step(att: MultiHeadAttention) -> Step | None:
        ...  # a function computing att(x, ctx) from its parts' steps, or None (call the module)

A factory may return None when it cannot stand for the module (training mode, an unusual setting).
It applies to the registered class and to subclasses that do not override ``forward`` (a subclass
that does gets no step and is called as a module). ``nn.Sequential``, ``nn.Identity``, ``nn.Linear``
and ``nn.Embedding`` have theirs here; anything else, and any module with hooks, is called as a
module: plugins need no step to take part, and their forward runs exactly as before.

Where the factories come from: modelkit's own (:mod:`modelkit.runtime.builtin`) and every module
named by an entry point in the group ``modelkit.runtime`` (a plugin's optional fast paths), imported
the first time a step is asked for. Importing a plugin's runtime module by hand registers it too.

Steps compute exactly what ``forward`` computes (same kernels, same order: the conformance check
``inference_step`` compares them bit for bit). A step is valid for the module as it was when it was
built: it holds the parameter objects (in-place updates are seen), not a snapshot of the structure,
so replacing a submodule, adding hooks or switching to training mode needs a new step.
:func:`modelkit.generate` builds one at the start of every call.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RUNTIME_ENTRY_POINT_GROUP", "Step", "identity_step", "load_runtime_extensions", "register_step",
           "registered_for", "step_of"]

Step = Callable[..., Any]
StepFactory = Callable[[Any], "Step | None"]
F_ = TypeVar("F_", bound=Callable[..., Any])

#: The entry-point group of plugins' runtime modules (imported for their registrations).
RUNTIME_ENTRY_POINT_GROUP = "modelkit.runtime"
#: modelkit's own runtime registrations, loaded like a plugin's.
_BUILTIN_MODULE = "modelkit.runtime.builtin"

_STEPS: dict[type, StepFactory] = {}
_loaded = False


def register_step(cls: type[nn.Module]) -> Callable[[F_], F_]:
    """Decorator: ``factory(module) -> Step | None`` builds the inference step of ``cls`` modules.

    Registering a class twice replaces the earlier factory (the last registration wins).
    """

    def decorator(factory: F_) -> F_:
        _STEPS[cls] = factory
        return factory

    return decorator


def load_runtime_extensions() -> None:
    """Import modelkit's runtime registrations and each plugin's (entry-point group
    ``modelkit.runtime``), once. A plugin module that fails to import (any exception, ``SystemExit``
    included; only ``KeyboardInterrupt`` propagates) is skipped with a warning: its components still
    run, as modules."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module(_BUILTIN_MODULE)
    for ep in entry_points(group=RUNTIME_ENTRY_POINT_GROUP):
        try:
            ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a plugin's optional fast path must not end the process
            from ..registry import import_failure

            warnings.warn(f"modelkit runtime plugin '{ep.name}' ({ep.value}) failed to import, so its "
                          f"components run without fast paths: {import_failure(exc)}", RuntimeWarning,
                          stacklevel=2)


def _defining_class(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


def registered_for(registry: dict[type, Any], cls: type) -> Any | None:
    """The entry of ``registry`` for ``cls``: the nearest registered class in its MRO, if ``cls`` does
    not override ``forward`` below it (then the entry would not describe its forward)."""
    owner = next((c for c in cls.__mro__ if c in registry), None)
    if owner is None:
        return None
    forward_owner = _defining_class(cls, "forward")
    return registry[owner] if forward_owner is not None and issubclass(owner, forward_owner) else None


def identity_step(x: Tensor) -> Tensor:
    """The step of a module that returns its input (``nn.Identity``, dropout in eval mode)."""
    return x


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has hooks of its own (then it is called as a module)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or module._forward_hooks_with_kwargs
                or module._forward_pre_hooks_with_kwargs)


def global_hooks() -> bool:
    """Whether global module hooks are registered (then every module is called as a module)."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def step_of(module: nn.Module) -> Step:
    """A function computing ``module(*args)`` in inference (autograd off), or the module itself.

    See the module docstring for what it may return and for how long the result is valid. With global
    module hooks registered or autocast on, every module is called as a module.
    """
    load_runtime_extensions()
    if has_hooks(module) or global_hooks() or torch.is_autocast_enabled("cpu"):
        return module
    cls = type(module)
    if cls is nn.Identity:
        return identity_step
    if cls is nn.Sequential:
        return _sequence([step_of(m) for m in module])
    if cls is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    if cls is nn.Embedding:
        e = module
        weight, args = e.weight, (e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        return lambda x: F.embedding(x, weight, *args)
    factory = registered_for(_STEPS, cls)
    step = factory(module) if factory is not None else None
    return step if step is not None else module


def _sequence(steps: list[Step]) -> Step:
    """One step calling ``steps`` in order (identities dropped)."""
    steps = [s for s in steps if s is not identity_step]
    if not steps:
        return identity_step
    if len(steps) == 1:
        return steps[0]
    if len(steps) == 2:
        first, second = steps
        return lambda x: second(first(x))

    def chained(x: Tensor) -> Tensor:
        for step in steps:
            x = step(x)
        return x

    return chained
