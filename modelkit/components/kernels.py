"""Attention kernels: the softmax(q·kᵀ/√d + bias)·v computation, chosen by an attention module's ``backend``.

A kernel takes ``q: (b, h, s_q, d)``, ``k, v: (b, h, s_k, d)`` (``s_k >= s_q``; the queries are the
last ``s_q`` of the ``s_k`` positions, and the keys consecutive positions), an optional additive
``bias`` broadcastable to ``(b, h, s_q, s_k)``, and the dropout probability on the attention weights
(0 in eval). It returns ``(b, h, s_q, d)``. **Every kernel applies the causal mask itself** (query i
sees keys ``j <= i + s_k - s_q``), so a kernel cannot be registered without its mask and causality is
tested for each one.

Three keyword options change the maths; an attention passes them only when it sets them, so a
kernel that does not offer one fails loudly (a ``TypeError``) instead of ignoring it:

- ``scale``: the score scale (None: ``1/√d``, computed as a division by ``√d``; else a multiplication);
- ``softcap``: ``c``, scores become ``c·tanh(scores / c)`` after scaling, before the bias and the mask;
- ``window``: ``W``, a sliding window on top of the causal mask: query i also does not see keys
  ``j <= i + s_k - s_q - W`` (it sees the last ``W`` positions, itself included).

Order: ``q·kᵀ`` -> scale -> softcap -> ``+ bias`` -> mask -> softmax -> dropout -> ``@ v``. Register a
new kernel with ``@register_attention_kernel("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import RegistryError, did_you_mean


class AttentionKernel(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None, dropout_p: float = 0.0,
                 scale: float | None = None, softcap: float | None = None, window: int | None = None) -> Tensor: ...


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


def causal_mask(s_q: int, s_k: int, device: torch.device, window: int | None = None) -> Tensor:
    """Boolean ``(s_q, s_k)``, True where a query must NOT see a key (the queries are the last s_q).

    With ``window``, a query also does not see keys ``window`` or more positions before it.
    """
    mask = torch.ones(s_q, s_k, dtype=torch.bool, device=device).triu(s_k - s_q + 1)
    if window is not None and s_k - s_q - window >= -(s_q - 1):  # some key falls out of some query's window
        mask |= torch.ones(s_q, s_k, dtype=torch.bool, device=device).tril(s_k - s_q - window)
    return mask


def _scores(q: Tensor, k: Tensor, scale: float | None, softcap: float | None) -> Tensor:
    """``q·kᵀ`` scaled (divided by √d when ``scale`` is None), then soft-capped if ``softcap``."""
    scores = q @ k.transpose(-2, -1)
    scores = scores / k.shape[-1] ** 0.5 if scale is None else scores * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return scores


@register_attention_kernel("eager")
def eager_attention(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None, dropout_p: float = 0.0,
                    scale: float | None = None, softcap: float | None = None, window: int | None = None) -> Tensor:
    """The book's maths, line by line: scores, masked_fill(-inf), softmax, dropout, @v (see the module doc)."""
    scores = _scores(q, k, scale, softcap)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(causal_mask(q.shape[-2], k.shape[-2], q.device, window), -torch.inf)
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p, training=True)
    return weights @ v


@register_attention_kernel("sdpa")
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None, dropout_p: float = 0.0,
                   scale: float | None = None, softcap: float | None = None, window: int | None = None) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels).

    With ``softcap``, which it cannot apply, it computes the eager kernel's maths instead.
    """
    if softcap is not None:
        return eager_attention(q, k, v, bias=bias, dropout_p=dropout_p, scale=scale, softcap=softcap, window=window)
    s_q, s_k = q.shape[-2], k.shape[-2]
    if window is not None and s_k - s_q - window < -(s_q - 1):
        window = None  # every key is inside every query's window: the causal mask alone
    if bias is not None:
        mask = causal_mask(s_q, s_k, q.device, window)
        attn_mask = bias.to(q.dtype).masked_fill(mask, -torch.inf)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if window is None and s_q == 1:  # one query, the last position (one new token after cached ones): it sees every key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if window is None and s_q == s_k:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    # is_causal aligns the mask top-left; queries after a cached prefix need it bottom-right.
    allowed = ~causal_mask(s_q, s_k, q.device, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale)
