"""Which forward :func:`modelkit.generate` runs for a model: the native decode step where
``optimize_for_inference(native=True)`` chose it, else the model's inference steps.

The choice is held here, in a weak set keyed by the model, not on the model: a copy of the model, or
the model after it is garbage collected, is not in it.
"""

from __future__ import annotations

import weakref

from torch import nn

from .steps import Step, step_of

__all__ = ["choose_native_decoder", "decoding_forward", "native_decoder_chosen"]

_NATIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def choose_native_decoder(model: nn.Module) -> None:
    """Decode ``model`` with the native step from now on (``optimize_for_inference`` checks it first)."""
    _NATIVE.add(model)


def native_decoder_chosen(model: nn.Module) -> bool:
    """Whether ``optimize_for_inference(model, native=True)`` chose the native step for ``model``."""
    return model in _NATIVE


def decoding_forward(model: nn.Module) -> Step:
    """A function computing ``model(in_idx, cache=..., last_only=...)`` for one generation: the native
    step when it was chosen and the model is still its composition, else the inference steps."""
    if model in _NATIVE:
        from .native import native_step

        step = native_step(model)
        if step is not None:
            return step
    return step_of(model)
