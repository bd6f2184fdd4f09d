"""Attention modules (kind ``attention``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field
from torch import Tensor, nn

from ..registry import register
from .base import Attention, Dropout, LayerContext, ModelDims, NoPositional, Positional
from .kernels import attention_kernel_names, check_backend, get_attention_kernel

BackendName = Annotated[
    str,
    AfterValidator(check_backend),
    Field(description="attention kernel", json_schema_extra=lambda s: s.update(enum=attention_kernel_names())),
]

_NO_POSITIONAL = NoPositional()


def attend(q: Tensor, k: Tensor, v: Tensor, ctx: LayerContext | None, kernel: Any, dropout_p: float, *,
           window: int | None = None, softcap: float | None = None, scale: float | None = None) -> Tensor:
    """The shared path of every attention module: positions, cache, then the kernel.

    ``q: (b, h, s, d)``, ``k, v: (b, h_kv, s, d)`` for the current tokens. Applies the positional
    component's rotation, appends k/v to the layer's KV cache if there is one, adds its score bias,
    and runs the (causal) kernel. Returns ``(b, h, s, d)``. Keys/values with fewer heads than the
    queries (grouped-query attention) are repeated to match after caching.

    ``window`` (a query sees itself and the ``window - 1`` positions before it; the cache then keeps
    only the last ``window`` positions), ``softcap`` and ``scale`` are the kernel options of
    :mod:`~modelkit.components.kernels`, passed to the kernel only when set.
    """
    if ctx is None:
        ctx = LayerContext(torch.arange(q.shape[-2], device=q.device), _NO_POSITIONAL)
    hooks = type(ctx.positional)
    if hooks.rotate is not Positional.rotate:  # the base class's hooks do nothing: skip the calls
        q, k = ctx.positional.rotate(q, k, ctx.positions)
    if ctx.cache is not None:
        k, v = ctx.cache.update(k, v) if window is None else ctx.cache.update(k, v, window=window)
    bias = None
    if hooks.attention_bias is not Positional.attention_bias:
        bias = ctx.positional.attention_bias(ctx.positions, _key_positions(ctx.positions, k.shape[-2], window))
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if window is None and softcap is None and scale is None:
        return kernel(q, k, v, bias=bias, dropout_p=dropout_p)
    options = {name: value for name, value in (("window", window), ("softcap", softcap), ("scale", scale))
               if value is not None}
    return kernel(q, k, v, bias=bias, dropout_p=dropout_p, **options)


def _key_positions(q_positions: Tensor, n_keys: int, window: int | None) -> Tensor:
    """The absolute positions of ``n_keys`` consecutive keys ending with the last query's position (a full
    cache's keys start at 0; a windowed cache's, later)."""
    if window is None:
        return torch.arange(n_keys, device=q_positions.device)
    return torch.arange(n_keys, device=q_positions.device) + (q_positions[-1] + 1 - n_keys)


def multi_head(x: Tensor, qkv: Sequence[Tensor], ctx: LayerContext | None, heads: int, kernel: Any,
               dropout_p: float, out_proj: Callable[[Tensor], Tensor]) -> Tensor:
    """Multi-head attention from the projections ``qkv`` (q, k, v) of ``x: (b, s, e)``: split into
    heads, :func:`attend`, merge the heads, ``out_proj`` (a module or any function computing it)."""
    b, s, _ = x.shape
    q, k, v = qkv
    q = q.view(b, s, heads, -1).transpose(1, 2)
    k = k.view(b, s, heads, -1).transpose(1, 2)
    v = v.view(b, s, heads, -1).transpose(1, 2)
    out = attend(q, k, v, ctx, kernel, dropout_p)
    return out_proj(out.transpose(1, 2).reshape(b, s, -1))


@register("attention", "mha")
class MultiHeadAttention(Attention):
    """Masked multi-head self-attention (the book's): W_query/W_key/W_value, causal, out_proj.

    Dropout applies to the attention weights. ``backend`` picks the kernel (``eager``: the book's
    maths; ``sdpa``: PyTorch's fused scaled_dot_product_attention); both use the same parameters.
    """

    def __init__(self, dims: ModelDims, *, backend: BackendName = "sdpa",
                 out_bias: Annotated[bool, Field(description="bias in out_proj")] = True) -> None:
        super().__init__()
        d, inner = dims.emb_dim, dims.attention_dim  # inner = n_heads * head_dim (emb_dim by default)
        self.d_out = inner
        self.num_heads = dims.n_heads
        self.head_dim = dims.head_dim
        self.W_query = nn.Linear(d, inner, bias=dims.qkv_bias)
        self.W_key = nn.Linear(d, inner, bias=dims.qkv_bias)
        self.W_value = nn.Linear(d, inner, bias=dims.qkv_bias)
        self.out_proj = nn.Linear(inner, d, bias=out_bias)
        self.dropout = Dropout(dims.drop_rate)
        self.backend = backend
        self.kernel = get_attention_kernel(backend)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.out_proj]

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        qkv = (self.W_query(x), self.W_key(x), self.W_value(x))
        dropout_p = self.dropout.p if self.training else 0.0
        return multi_head(x, qkv, ctx, self.num_heads, self.kernel, dropout_p, self.out_proj)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The book's MultiHeadAttention stores its causal mask as a buffer; the kernels build
        # their own, so a book checkpoint's ``att.mask`` is accepted and dropped.
        state_dict.pop(prefix + "mask", None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend}"
