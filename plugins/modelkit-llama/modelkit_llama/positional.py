"""Relative positions without position embeddings (kind ``positional``): RoPE and ALiBi.

Both act inside attention, through the :class:`~modelkit.components.base.Positional` hooks, on the
absolute positions of the tokens being processed, so they work unchanged with the KV cache: RoPE
rotates each new key once before it is cached; ALiBi biases the scores of the new queries against
every cached key.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor

from modelkit.components.base import ModelDims, Positional


def rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RoPE(Positional):
    """Rotary position embedding (Su et al. 2021, RoFormer), applied to queries and keys.

    Each head dimension pair (i, i + d/2) of the token at position m is rotated by the angle
    m·θ^(−2i/d) (the "rotate half" layout of GPT-NeoX and Hugging Face Llama), so q_m·k_n depends
    only on m − n. Angles are computed for the positions given, in float32; no parameters, no buffers.
    """

    def __init__(self, dims: ModelDims, *,
                 theta: Annotated[float, Field(gt=1, description="rotation base (Llama 2: 10000)")] = 10000.0) -> None:
        super().__init__()
        self.head_dim = dims.head_dim
        self.theta = theta

    @classmethod
    def check_dims(cls, dims: ModelDims, **params: Any) -> Iterable[str]:
        if dims.head_dim % 2:
            return [f"RoPE needs an even head size; emb_dim/n_heads = {dims.head_dim}"]
        return ()

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of the rotation angles, each ``(s, head_dim)`` float32 for ``positions: (s,)``."""
        d = self.head_dim
        exponent = torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d
        inv_freq = 1.0 / (self.theta ** exponent)
        angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate ``q: (b, h, s, d)`` and ``k: (b, h_kv, s, d)`` of the tokens at ``positions: (s,)``."""
        cos, sin = self.cos_sin(positions)

        def apply(x: Tensor) -> Tensor:
            x32 = x.float()
            return (x32 * cos + rotate_half(x32) * sin).type_as(x)

        return apply(q), apply(k)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al. 2022 and their reference code).

    For a power of two n: the geometric sequence 2^(−8/n), 2^(−16/n), ..., 2^(−8) (8 heads:
    1/2, 1/4, ..., 1/256). Otherwise the slopes of the closest smaller power of two p, followed by
    every other slope of 2p, until there are n.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be positive, got {n_heads}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    if closest == n_heads:
        return power_of_two(n_heads)
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]


class ALiBi(Positional):
    """Attention with linear biases (Press et al. 2022): score(i, j) += slope_h · (j − i).

    Head h gets the slope :func:`alibi_slopes`\\ (n_heads)[h]; a query penalises keys linearly in
    their distance. No position embeddings, no parameters; the bias is ``(n_heads, s_q, s_k)``.
    """

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.n_heads = dims.n_heads
        self.slopes = alibi_slopes(dims.n_heads)

    def attention_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """``(n_heads, s_q, s_k)`` float32: slope_h · (k_positions[j] − q_positions[i])."""
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=q_positions.device)
        distance = (k_positions[None, :] - q_positions[:, None]).to(torch.float32)
        return slopes[:, None, None] * distance[None, :, :]

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}"
