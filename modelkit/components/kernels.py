"""Attention kernels: the softmax(q·kᵀ/√d + bias)·v computation, chosen by an attention module's ``backend``.

A kernel takes ``q: (b, h, s_q, d)``, ``k, v: (b, h, s_k, d)`` (``s_k >= s_q``; the queries are the
last ``s_q`` of the ``s_k`` positions), an optional additive ``bias`` broadcastable to
``(b, h, s_q, s_k)``, and the dropout probability on the attention weights (0 in eval). It returns
``(b, h, s_q, d)``. **Every kernel applies the causal mask itself** (query i sees keys
``j <= i + s_k - s_q``), so a kernel cannot be registered without its mask and causality is tested for
each one. Register a new kernel with ``@register_attention_kernel("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import RegistryError, did_you_mean


class AttentionKernel(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None,
                 dropout_p: float = 0.0) -> Tensor: ...


_KERNELS: dict[str, AttentionKernel] = {}


def register_attention_kernel(name: str) -> Callable[[AttentionKernel], AttentionKernel]:
    """Decorator: make a kernel available as ``backend: name``. Duplicate names are an error."""

    def decorator(fn: AttentionKernel) -> AttentionKernel:
        if name in _KERNELS:
            raise RegistryError(f"attention kernel '{name}' is already registered")
        _KERNELS[name] = fn
        return fn

    return decorator


def attention_kernel_names() -> list[str]:
    return sorted(_KERNELS)


def get_attention_kernel(name: str) -> AttentionKernel:
    """The kernel called ``name``; unknown names raise an error listing the known ones."""
    try:
        return _KERNELS[name]
    except KeyError:
        known = attention_kernel_names()
        raise RegistryError(
            f"unknown attention backend '{name}'{did_you_mean(name, known)} (known: {', '.join(known)})"
        ) from None


def check_backend(name: str) -> str:
    """pydantic validator for a ``backend`` parameter."""
    if name not in _KERNELS:
        known = attention_kernel_names()
        raise ValueError(f"unknown attention backend '{name}'{did_you_mean(name, known)} (known: {', '.join(known)})")
    return name


def causal_mask(s_q: int, s_k: int, device: torch.device) -> Tensor:
    """Boolean ``(s_q, s_k)``, True where a query must NOT see a key (the queries are the last s_q)."""
    return torch.ones(s_q, s_k, dtype=torch.bool, device=device).triu(s_k - s_q + 1)


@register_attention_kernel("eager")
def eager_attention(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None,
                    dropout_p: float = 0.0) -> Tensor:
    """The book's maths, line by line: masked_fill(-inf), divide by √d, softmax, dropout, @v."""
    scores = q @ k.transpose(-2, -1)
    scores = scores.masked_fill(causal_mask(q.shape[-2], k.shape[-2], q.device), -torch.inf)
    scores = scores / k.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p, training=True)
    return weights @ v


@register_attention_kernel("sdpa")
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None,
                   dropout_p: float = 0.0) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels)."""
    s_q, s_k = q.shape[-2], k.shape[-2]
    if bias is not None:
        mask = causal_mask(s_q, s_k, q.device)
        attn_mask = bias.to(q.dtype).masked_fill(mask, -torch.inf)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    if s_q == 1:  # one query, the last position (one new token after cached ones): it sees every key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if s_q == s_k:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    # is_causal aligns the mask top-left; queries after a cached prefix need it bottom-right.
    allowed = ~causal_mask(s_q, s_k, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
