"""The builder: turn a validated spec into modules. Thin on purpose; components stand on their own."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .components.base import Attention, FeedForward, ModelDims, Norm
from .registry import get_registry
from .spec import ComponentSpec, ModelSpec, load_spec

if TYPE_CHECKING:
    from .model import GPTModel


def build_component(kind: str, ref: ComponentSpec, *args: Any) -> nn.Module:
    """Construct the component ``ref`` of ``kind`` with the builder's positional ``args``.

    Nested references (parameters declared with ``SubComponent``) are built first (with
    ``args[0]``, the dims) and passed as modules.
    """
    entry = get_registry(kind).get(ref.type)
    kwargs = dict(ref.params)
    for pname, sub_kind in entry.sub_components.items():
        kwargs[pname] = build_component(sub_kind, kwargs[pname], args[0])
    return entry.cls(*args, **kwargs)


class SpecBlockParts:
    """The :class:`~modelkit.components.base.BlockParts` a block gets: factories for the spec's parts."""

    def __init__(self, spec: ModelSpec, dims: ModelDims) -> None:
        self.spec, self.dims = spec, dims

    def norm(self) -> Norm:
        return build_component("norm", self.spec.norm, self.dims)  # type: ignore[return-value]

    def attention(self) -> Attention:
        return build_component("attention", self.spec.attention, self.dims)  # type: ignore[return-value]

    def feedforward(self) -> FeedForward:
        return build_component("feedforward", self.spec.feedforward, self.dims)  # type: ignore[return-value]


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
    from .model import GPTModel

    resolved = load_spec(spec)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    device_ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    meta = device is not None and torch.device(device).type == "meta"
    with device_ctx, _default_dtype(dtype), skip_values_on_meta() if meta else contextlib.nullcontext():
        return GPTModel(resolved)
