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

from .model import GPTModel
from .sizing import skip_values_on_meta
from .spec import ModelSpec, load_spec

__all__ = ["build_model", "skip_values_on_meta"]


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
    :class:`~modelkit.SpecError` before building anything if the spec is invalid or has more than
    ``MAX_PARAMETERS`` parameters, and :class:`~modelkit.errors.ModelTooLargeError` if the weights
    would not fit the device's free memory (see :mod:`modelkit.sizing`).
    """
    resolved = load_spec(spec)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    device_ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    meta = device is not None and torch.device(device).type == "meta"
    with device_ctx, _default_dtype(dtype), skip_values_on_meta() if meta else contextlib.nullcontext():
        return GPTModel(resolved)
