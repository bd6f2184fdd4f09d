"""The builder: turn a validated spec into modules. Thin on purpose; components stand on their own."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

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
    with device_ctx, _default_dtype(dtype):
        return GPTModel(resolved)
