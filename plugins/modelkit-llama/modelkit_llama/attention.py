"""Grouped-query attention (kind ``attention``), Ainslie et al. 2023, "GQA"."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from modelkit.components.attention import BackendName, attend
from modelkit.components.base import Attention, LayerContext, ModelDims
from modelkit.components.kernels import get_attention_kernel
from modelkit.limits import MAX_CONTEXT_LENGTH, MAX_N_HEADS, MAX_N_LAYERS

#: Where ``llama.gqa`` RMS-normalises queries and keys: nowhere, over each head, or over the whole projection.
QKNormName = Literal["none", "head", "projection"]


class QKNorm(nn.Module):
    """RMSNorm of queries or keys over their last ``size`` features: ``weight · x / √(mean(x²) + eps)``,
    computed in float32 and cast back to the input's dtype before scaling (as ``llama.rmsnorm``).
    Parameter: ``weight`` (ones, ``size``)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: Tensor) -> Tensor:
        """``x: (..., size)`` -> the same shape and dtype."""
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GroupedQueryAttention(Attention):
    """Grouped-query attention (Ainslie et al. 2023): n_heads query heads share num_kv_heads key/value heads.

    ``num_kv_heads`` must divide ``n_heads`` (None: as many as n_heads, i.e. multi-head attention;
    1: multi-query attention). Projections ``W_query`` (emb -> emb), ``W_key``/``W_value``
    (emb -> num_kv_heads·head_dim, biased if the spec's ``qkv_bias``) and ``out_proj``. Only the
    num_kv_heads key/value heads are cached; they are shared by their query groups after caching.
    ``backend`` picks the kernel, as for ``mha``; dropout applies to the attention weights.

    Optional, off by default (Mistral, Gemma 2): ``sliding_window`` W makes a query see only itself
    and the W - 1 positions before it (the KV cache then keeps W positions), on the layers ``i`` where
    ``window_pattern[i % len(window_pattern)]`` is true (``[true, false]``: even layers slide, odd
    layers attend to everything); ``softcap`` c caps the scores to ``c·tanh(scores / c)``;
    ``query_scale`` replaces the score scale 1/√head_dim.

    ``qk_norm`` RMS-normalises queries and keys before RoPE (weights ``q_norm``, ``k_norm``, eps
    ``qk_norm_eps``): ``"head"`` over each head's ``head_dim`` features (Qwen3), ``"projection"``
    over the whole query (n_heads·head_dim) and key (num_kv_heads·head_dim) projections before the
    head split (OLMo 2); ``"none"`` (default) adds no module.
    """

    def __init__(
        self,
        dims: ModelDims,
        *,
        num_kv_heads: Annotated[int | None, Field(gt=0, le=MAX_N_HEADS,
                                                  description="key/value heads; must divide n_heads (None: n_heads)")] = None,
        backend: BackendName = "sdpa",
        out_bias: Annotated[bool, Field(description="bias in out_proj")] = False,
        sliding_window: Annotated[int | None, Field(gt=0, le=MAX_CONTEXT_LENGTH, description=(
            "a query sees itself and the sliding_window - 1 positions before it (None: every earlier position)"))] = None,
        window_pattern: Annotated[tuple[bool, ...], Field(min_length=1, max_length=MAX_N_LAYERS, description=(
            "layer i slides its window iff window_pattern[i % length]"))] = (True,),
        softcap: Annotated[float | None, Field(gt=0, description="scores become softcap·tanh(scores / softcap)")] = None,
        query_scale: Annotated[float | None, Field(gt=0, description="the score scale (None: 1/√head_dim)")] = None,
        qk_norm: Annotated[QKNormName, Field(
            description="RMSNorm of q and k before RoPE: none, per head (Qwen3), or over the whole "
                        "projection (OLMo 2)")] = "none",
        qk_norm_eps: Annotated[float, Field(gt=0, lt=1, description="eps of the q/k RMSNorms")] = 1e-6,
    ) -> None:
        super().__init__()
        problems = list(self.check_dims(dims, num_kv_heads=num_kv_heads, sliding_window=sliding_window,
                                        window_pattern=window_pattern))
        if problems:
            raise ValueError("; ".join(problems))
        self.num_heads = dims.n_heads
        self.num_kv_heads = num_kv_heads or dims.n_heads
        self.head_dim = dims.head_dim
        self.d_out = dims.attention_dim  # n_heads * head_dim: emb_dim unless the spec gives head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        self.W_query = nn.Linear(dims.emb_dim, self.d_out, bias=dims.qkv_bias)
        self.W_key = nn.Linear(dims.emb_dim, kv_dim, bias=dims.qkv_bias)
        self.W_value = nn.Linear(dims.emb_dim, kv_dim, bias=dims.qkv_bias)
        self.out_proj = nn.Linear(self.d_out, dims.emb_dim, bias=out_bias)
        self.dropout = nn.Dropout(dims.drop_rate)
        self.qk_norm = qk_norm
        if qk_norm != "none":  # built after the projections: the default builds exactly what it did
            per_head = qk_norm == "head"
            self.q_norm = QKNorm(self.head_dim if per_head else self.num_heads * self.head_dim, qk_norm_eps)
            self.k_norm = QKNorm(self.head_dim if per_head else kv_dim, qk_norm_eps)
        self.backend = backend
        self.kernel = get_attention_kernel(backend)
        self.sliding_window = sliding_window
        self.window_pattern = tuple(window_pattern)
        self.softcap = softcap
        self.query_scale = query_scale

    @classmethod
    def check_dims(cls, dims: ModelDims, **params: Any) -> Iterable[str]:
        problems = []
        kv = params.get("num_kv_heads")
        if kv is not None and dims.n_heads % kv:
            problems.append(f"n_heads {dims.n_heads} is not divisible by num_kv_heads {kv}")
        if params.get("sliding_window") is None and tuple(params.get("window_pattern", (True,))) != (True,):
            problems.append("window_pattern is set but sliding_window is not (there is no window to slide)")
        return problems

    def window_at(self, layer: int) -> int | None:
        """The sliding window of the block at index ``layer``, or None where it attends to every position."""
        if self.sliding_window is None or not self.window_pattern[layer % len(self.window_pattern)]:
            return None
        return self.sliding_window

    def residual_projections(self) -> list[nn.Linear]:
        return [self.out_proj]

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        """``x: (b, s, emb_dim)`` -> ``(b, s, emb_dim)``, causal; caches ``(b, num_kv_heads, s, d)``."""
        qkv = (self.W_query(x), self.W_key(x), self.W_value(x))
        dropout_p = self.dropout.p if self.training else 0.0
        return self.attend_projections(x, qkv, ctx, dropout_p, self.out_proj)

    def attend_projections(self, x: Tensor, qkv: Sequence[Tensor], ctx: LayerContext | None, dropout_p: float,
                           out_proj: Callable[[Tensor], Tensor]) -> Tensor:
        """The rest of ``forward`` from the projections ``qkv`` of ``x``: heads, :func:`attend`, ``out_proj``
        (the module or any function computing it)."""
        b, s, _ = x.shape
        q, k, v = qkv
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        window = self.window_at(ctx.layer if ctx is not None else 0)
        out = attend(q, k, v, ctx, self.kernel, dropout_p, window=window, softcap=self.softcap, scale=self.query_scale)
        return out_proj(out.transpose(1, 2).reshape(b, s, self.d_out))

    def extra_repr(self) -> str:
        options = [f"{name}={value}" for name, value in (("sliding_window", self.sliding_window),
                   ("softcap", self.softcap), ("query_scale", self.query_scale)) if value is not None]
        if self.sliding_window is not None and self.window_pattern != (True,):
            options.append(f"window_pattern={list(self.window_pattern)}")
        if self.qk_norm != "none":
            options.append(f"qk_norm={self.qk_norm}")
        return ", ".join([f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                          f"backend={self.backend}", *options])
