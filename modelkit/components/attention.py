"""Attention modules (kind ``attention``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field
from torch import Tensor, nn

from ..registry import register
from .base import Attention, LayerContext, ModelDims, NoPositional
from .kernels import attention_kernel_names, check_backend, get_attention_kernel

BackendName = Annotated[
    str,
    AfterValidator(check_backend),
    Field(description="attention kernel", json_schema_extra=lambda s: s.update(enum=attention_kernel_names())),
]

_NO_POSITIONAL = NoPositional()


def attend(q: Tensor, k: Tensor, v: Tensor, ctx: LayerContext | None, kernel: Any, dropout_p: float) -> Tensor:
    """The shared path of every attention module: positions, cache, then the kernel.

    ``q: (b, h, s, d)``, ``k, v: (b, h_kv, s, d)`` for the current tokens. Applies the positional
    component's rotation, appends k/v to the layer's KV cache if there is one, adds its score bias,
    and runs the (causal) kernel. Returns ``(b, h, s, d)``. Keys/values with fewer heads than the
    queries (grouped-query attention) are repeated to match after caching.
    """
    if ctx is None:
        ctx = LayerContext(torch.arange(q.shape[-2], device=q.device), _NO_POSITIONAL)
    q, k = ctx.positional.rotate(q, k, ctx.positions)
    if ctx.cache is not None:
        k, v = ctx.cache.update(k, v)
    bias = ctx.positional.attention_bias(ctx.positions, torch.arange(k.shape[-2], device=q.device))
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return kernel(q, k, v, bias=bias, dropout_p=dropout_p)


def stacked_rows(parts: Sequence[Tensor | None]) -> Tensor | None:
    """The ``(Σ out_i, in)`` matrix whose row blocks are ``parts`` (each ``(out_i, in)``), as one view,
    if they are adjacent blocks of a single column-major buffer (what
    :func:`modelkit.speed.set_weight_layout_` makes of W_query/W_key/W_value); otherwise None.
    1-D ``parts`` (biases) must be adjacent slices of one buffer. Costs a few attribute reads."""
    first = parts[0]
    if first is None or first.stride(0) != 1 or any(t is None for t in parts):
        return None  # the common case (ordinary weights) ends here
    total = sum(t.shape[0] for t in parts)  # type: ignore[union-attr]
    column_major = first.dim() == 2
    stride = (1, total) if column_major else (1,)
    offset = first.storage_offset()
    ptr = first.untyped_storage().data_ptr()
    for t in parts:
        if (t.stride() != stride or t.storage_offset() != offset or t.dtype != first.dtype  # type: ignore[union-attr]
                or t.shape[1:] != first.shape[1:] or t.untyped_storage().data_ptr() != ptr):  # type: ignore[union-attr]
            return None
        offset += t.shape[0]  # type: ignore[union-attr]
    return first.as_strided((total, first.shape[1]) if column_major else (total,), stride)


@register("attention", "mha")
class MultiHeadAttention(Attention):
    """Masked multi-head self-attention (the book's): W_query/W_key/W_value, causal, out_proj.

    Dropout applies to the attention weights. ``backend`` picks the kernel (``eager``: the book's
    maths; ``sdpa``: PyTorch's fused scaled_dot_product_attention); both use the same parameters.
    """

    def __init__(self, dims: ModelDims, *, backend: BackendName = "sdpa",
                 out_bias: Annotated[bool, Field(description="bias in out_proj")] = True) -> None:
        super().__init__()
        d = dims.emb_dim
        self.d_out = d
        self.num_heads = dims.n_heads
        self.head_dim = d // dims.n_heads
        self.W_query = nn.Linear(d, d, bias=dims.qkv_bias)
        self.W_key = nn.Linear(d, d, bias=dims.qkv_bias)
        self.W_value = nn.Linear(d, d, bias=dims.qkv_bias)
        self.out_proj = nn.Linear(d, d, bias=out_bias)
        self.dropout = nn.Dropout(dims.drop_rate)
        self.backend = backend
        self.kernel = get_attention_kernel(backend)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.out_proj]

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        b, s, _ = x.shape
        qkv = None if torch.is_grad_enabled() or torch.compiler.is_compiling() else self._stacked_qkv()
        if qkv is not None:  # one matmul for q, k and v (see set_weight_layout_); no autograd here
            q, k, v = F.linear(x, *qkv).split(self.d_out, dim=-1)
        else:
            q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        dropout_p = self.dropout.p if self.training else 0.0
        out = attend(q, k, v, ctx, self.kernel, dropout_p)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, self.d_out))

    def _stacked_qkv(self) -> tuple[Tensor, Tensor | None] | None:
        """W_query/W_key/W_value (and biases) as one ``(3·d, d)`` weight, if they share one buffer."""
        projections = (self.W_query, self.W_key, self.W_value)  # may be replaced (int8 layers): no .weight
        weight = stacked_rows([getattr(m, "weight", None) for m in projections])
        if weight is None:
            return None
        biases = [m.bias for m in projections]
        if all(t is None for t in biases):
            return weight, None
        bias = stacked_rows(biases)
        return (weight, bias) if bias is not None else None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The book's MultiHeadAttention stores its causal mask as a buffer; the kernels build
        # their own, so a book checkpoint's ``att.mask`` is accepted and dropped.
        state_dict.pop(prefix + "mask", None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend}"
