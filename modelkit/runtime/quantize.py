"""Weight-only int8 quantisation for CPU decoding: a quarter of fp32's weight bytes per token.

Batch-1 decoding reads every weight once per token, so its speed is bounded by memory bandwidth;
int8 weights (with one scale per output channel) halve bf16's bytes and quarter fp32's.
:func:`quantize_int8_` swaps every ``nn.Linear`` of a model for an :class:`Int8Linear`.

Numerics: each weight row ``w`` is stored as ``q = round(w / s)`` with ``s = max|w| / 127``
(symmetric, per output channel), so every weight is within ``s / 2`` of its float value. Activations
are not quantised. Few rows (decoding: ``<= SMALL_BATCH`` rows) use PyTorch's int8 weight kernel
(``aten._weight_int8pack_mm``) with bf16 activations, the fast CPU path; more rows (prefill,
scoring), other devices, and ``in_features`` that are not a multiple of 16 (the kernel's block: it
crashes or miscomputes otherwise, torch 2.13) dequantise the weight to the activations' dtype and run
an ordinary matmul (oneDNN's on the CPU in inference, see :mod:`modelkit.runtime.onednn`), and so does a
CPU where the kernel does not work (:func:`int8_kernel_available`, probed once). An fp32 model
therefore sees bf16-rounded activations in its decode matmuls only.

A quantised model is for inference: it has no float weights to train, and its state dict holds
``weight_int8`` and ``scale`` instead of ``weight``; save checkpoints from the float model.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SpeedOptionError
from .onednn import (
    OneDNNLinearActivation,
    onednn_applies,
    onednn_linear,
    onednn_linear_available,
)

__all__ = ["SMALL_BATCH", "Int8Linear", "int8_kernel_available", "quantize_int8_", "quantize_weight_int8"]

#: Up to this many rows (tokens) per call, Int8Linear uses the int8 matmul kernel; above it, the
#: weight is dequantised and a float matmul runs, which is faster for many rows.
SMALL_BATCH = 16
_KERNEL_BLOCK = 16  # aten._weight_int8pack_mm needs in_features % 16 == 0 on CPU


@functools.cache
def int8_kernel_available() -> bool:
    """Whether PyTorch's int8 weight kernel (``aten._weight_int8pack_mm``) exists and computes a small
    product correctly on this CPU (probed once per process). Without it, :class:`Int8Linear`
    dequantises its weight for every call: the same numbers up to rounding, none of the speed."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, generator=gen).to(torch.bfloat16)
    q, scale = quantize_weight_int8(torch.randn(8, 32, generator=gen))
    try:
        out = op(x, q, scale.to(torch.bfloat16)).float()
    except (RuntimeError, NotImplementedError):
        return False
    ref = x.float() @ (q.float() * scale.to(torch.bfloat16).float()[:, None]).t()
    return torch.allclose(out, ref, rtol=2e-2, atol=5e-2)


def quantize_weight_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``(q, scale)`` with ``weight ≈ q * scale[:, None]``.

    ``weight: (out, in)`` float; returns ``q: (out, in)`` int8 in ``[-127, 127]`` and ``scale: (out,)``
    float32. Every element is within ``scale / 2`` of its original value; an all-zero row gets scale 1.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear(nn.Module):
    """A drop-in for ``nn.Linear`` in inference: ``y = x @ (q * scale[:, None])ᵀ + bias``.

    ``x: (..., in_features)`` -> ``(..., out_features)`` in ``x``'s dtype. Buffers: ``weight_int8``
    ``(out, in)`` int8, ``scale`` ``(out,)``; ``bias`` ``(out,)`` or None (kept in float).
    """

    in_features: int
    out_features: int

    def __init__(self, weight_int8: Tensor, scale: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2:
            raise ValueError(f"weight_int8 must be a 2-D int8 tensor, got {weight_int8.dtype} {tuple(weight_int8.shape)}")
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self._kernel_ok = self.in_features % _KERNEL_BLOCK == 0 and int8_kernel_available()  # probed once
        self.register_buffer("scale", scale.float())
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantise ``linear``'s weight (see :func:`quantize_weight_int8`); the bias is copied."""
        q, scale = quantize_weight_int8(linear.weight)
        return cls(q.to(linear.weight.device), scale.to(linear.weight.device), linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight ``(out, in)`` this layer computes with (``q * scale``) in ``dtype``."""
        return (self.weight_int8.to(dtype) * self.scale.to(dtype)[:, None])

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if rows <= SMALL_BATCH and self._kernel_ok and x.device.type == "cpu":
            x2 = x.reshape(rows, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scale.to(torch.bfloat16))
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight = self.dequantized_weight(x.dtype)
        if not torch.is_grad_enabled() and onednn_linear_available(x.dtype) and onednn_applies(x, weight):
            return onednn_linear(x, weight, bias)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8_(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (in place) with an :class:`Int8Linear`; return ``model``.

    Embeddings and norms stay in float. A head tied to the token embedding gets its own int8 copy;
    the embedding keeps its float weight. The model is put in eval mode (quantised weights are for
    inference). Module names are unchanged, so ``model.trf_blocks[0].att.W_query`` still exists.
    A model whose Linear layers are already fused with their activations raises
    :class:`~modelkit.errors.SpeedOptionError`: quantise the float model.
    """
    if any(isinstance(m, OneDNNLinearActivation) for m in model.modules()):
        raise SpeedOptionError("this model's Linear layers are fused with their activations (optimize_for_inference "
                               "without quantize); quantise the float model instead: "
                               "optimize_for_inference(model, quantize='int8')")
    model.eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child))
    return model
