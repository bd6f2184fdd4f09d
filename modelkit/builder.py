"""The builder: a validated spec in, a :class:`~modelkit.model.GPTModel` out, on any device and dtype.

Thin on purpose: the model builds its parts with :mod:`modelkit.components.build`, and components
stand on their own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .model import GPTModel
from .spec import ModelSpec, load_spec


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


#: Calls that only set values, which a meta tensor does not have: the ``torch.nn.init`` functions,
#: the in-place random fills they come down to, and the clamp and erfinv of ``trunc_normal_``.
_VALUE_SETTERS: frozenset[Any] = frozenset(
    [getattr(nn.init, name) for name in nn.init.__all__ if name.endswith("_")]
    + [getattr(Tensor, name) for name in ("normal_", "uniform_", "exponential_", "log_normal_", "cauchy_",
                                          "geometric_", "bernoulli_", "random_", "erfinv_", "clamp_")]
)


class _SkipValuesOnMeta(TorchFunctionMode):
    """While active, the calls in :data:`_VALUE_SETTERS` return their meta tensor untouched.

    They would compute nothing on the meta device, yet PyTorch runs them through Python meta kernels,
    some of which import ``torch._dynamo`` (and so Inductor's dependencies): seconds of start-up for
    ``modelkit info``. Every other call runs as usual; no random number is drawn either way.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _VALUE_SETTERS:
            tensor = args[0] if args else kwargs.get("tensor")  # nn.init passes it by keyword
            if isinstance(tensor, Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def skip_values_on_meta() -> contextlib.AbstractContextManager[Any]:
    """A context in which initialising a meta tensor costs nothing (see :class:`_SkipValuesOnMeta`);
    for building models whose parameters are on the meta device."""
    return _SkipValuesOnMeta()


def build_model(
    spec: ModelSpec | Mapping[str, Any] | str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> GPTModel:
    """Validate ``spec`` (a ModelSpec, dict, JSON string or path) and build a :class:`GPTModel`.

    Parameters are created directly on ``device`` in ``dtype`` (a floating dtype); with
    ``device="meta"`` nothing is allocated, which makes counting a gpt2-xl instant. Raises
    :class:`~modelkit.SpecError` before building anything if the spec is invalid.
    """
    resolved = load_spec(spec)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    device_ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    meta = device is not None and torch.device(device).type == "meta"
    with device_ctx, _default_dtype(dtype), skip_values_on_meta() if meta else contextlib.nullcontext():
        return GPTModel(resolved)
