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

from .errors import BuildError
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
    would not fit the device's free memory (see :mod:`modelkit.sizing`); :class:`~modelkit.errors.BuildError`
    for a device or dtype it cannot build on.
    """
    resolved = load_spec(spec)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise BuildError(f"dtype must be a floating point torch.dtype, got {dtype!r}")
    try:
        target = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError) as exc:
        raise BuildError(f"unknown device {device!r}: {exc}") from None
    meta = target is not None and target.type == "meta"
    device_ctx = target if target is not None else contextlib.nullcontext()
    with device_ctx, _default_dtype(dtype), skip_values_on_meta() if meta else contextlib.nullcontext():
        return GPTModel(resolved)
