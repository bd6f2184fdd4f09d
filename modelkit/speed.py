"""Speed options for inference in one call: dtype, int8 weights, torch.compile, threads.

``optimize_for_inference(model, dtype=torch.bfloat16, quantize="int8")`` returns a model ready for
:func:`modelkit.generate`. Each option trades accuracy or start-up time for speed; the figures for
gpt2-small on a CPU are in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import torch
from torch import nn

__all__ = ["DTYPES", "QUANTIZE", "optimize_for_inference", "parse_dtype"]

#: dtype names accepted by :func:`parse_dtype` (and the CLI's ``--dtype``).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
#: values of ``quantize`` (and the CLI's ``--quantize``).
QUANTIZE = ("none", "int8")

M = TypeVar("M", bound=nn.Module)


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``/``"bfloat16"`` -> ``torch.bfloat16`` etc.; unknown names raise ``ValueError``."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}' (known: {', '.join(DTYPES)})") from None


def optimize_for_inference(
    model: M,
    *,
    dtype: torch.dtype | str | None = None,
    quantize: Literal["none", "int8"] | None = None,
    compile: bool = False,
    threads: int | None = None,
) -> M:
    """Put ``model`` in eval mode and apply the chosen speed options, in place; return the model to use.

    - ``dtype``: cast parameters and buffers (``torch.bfloat16``: about 2x faster decoding and much
      faster matmuls on CPUs with AVX-512 BF16/AMX; logits move by a few 1e-2).
    - ``quantize="int8"``: weight-only int8 Linear layers (:func:`modelkit.quantize.quantize_int8_`),
      applied after the cast; fewest bytes per decoded token.
    - ``compile``: wrap in ``torch.compile`` (the returned module is the compiled wrapper; the first
      calls compile, which takes a while).
    - ``threads``: ``torch.set_num_threads(threads)`` (process-wide).

    The weights' state-dict names are kept unless ``quantize`` is set (see :mod:`modelkit.quantize`).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if quantize not in (None, *QUANTIZE):
        raise ValueError(f"unknown quantize '{quantize}' (known: {', '.join(QUANTIZE)})")
    model.eval()
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        model.to(dtype)
    if quantize == "int8":
        from .quantize import quantize_int8_

        quantize_int8_(model)
    if compile:
        return torch.compile(model)  # type: ignore[return-value]  # an OptimizedModule wrapping model
    return model
