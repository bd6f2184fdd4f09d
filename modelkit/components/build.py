"""Constructing a component from its spec reference, and the factories a block builds its parts with."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import get_registry
from ..spec import ComponentSpec, ModelSpec
from .base import Attention, FeedForward, ModelDims, Norm

__all__ = ["SpecBlockParts", "build_component"]


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
