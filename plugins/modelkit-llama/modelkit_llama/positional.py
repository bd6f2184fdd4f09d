"""Relative positions without position embeddings (kind ``positional``): RoPE and ALiBi.

Both act inside attention, through the :class:`~modelkit.components.base.Positional` hooks, on the
absolute positions of the tokens being processed, so they work unchanged with the KV cache: RoPE
rotates each new key once before it is cached; ALiBi biases the scores of the new queries against
every cached key.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Any, Literal

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

    ``scaling: "llama3"`` applies Llama 3.1's frequency scaling (``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_context_length``, all required then; Hugging Face's
    ``rope_type: "llama3"``, see :meth:`inv_freq`); with ``scaling: "none"`` (the default) they must
    be left out (null), so no scaling parameter is ever silently ignored.
    """

    def __init__(
        self,
        dims: ModelDims,
        *,
        theta: Annotated[float, Field(gt=1, description="rotation base (Llama 2: 10000)")] = 10000.0,
        scaling: Annotated[Literal["none", "llama3"], Field(
            description="frequency scaling: none, or Llama 3.1's (needs the four parameters below)")] = "none",
        factor: Annotated[float | None, Field(ge=1, le=1e6,
                                              description="llama3: low frequencies are divided by this")] = None,
        low_freq_factor: Annotated[float | None, Field(
            gt=0, le=1e6, description="llama3: wavelengths above original/this are scaled")] = None,
        high_freq_factor: Annotated[float | None, Field(
            gt=0, le=1e6, description="llama3: wavelengths below original/this are kept")] = None,
        original_context_length: Annotated[int | None, Field(
            gt=0, le=2**24, description="llama3: the pre-training context length")] = None,
        rotary_fraction: Annotated[float, Field(
            gt=0, le=1, description="rotate the first int(head_dim * this) dims of each head, pass the rest "
                                    "(GPT-NeoX's rotary_pct)")] = 1.0,
    ) -> None:
        super().__init__()
        scaling_params = dict(factor=factor, low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
                              original_context_length=original_context_length)
        problems = list(self.check_dims(dims, scaling=scaling, rotary_fraction=rotary_fraction, **scaling_params))
        if problems:
            raise ValueError("; ".join(problems))
        self.head_dim = dims.head_dim
        self.rotary_fraction = rotary_fraction
        self.rotary_dims = int(dims.head_dim * rotary_fraction)
        self.theta = theta
        self.scaling = scaling
        self.factor = factor
        self.low_freq_factor = low_freq_factor
        self.high_freq_factor = high_freq_factor
        self.original_context_length = original_context_length

    _SCALING_PARAMS = ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")

    @classmethod
    def check_dims(cls, dims: ModelDims, **params: Any) -> Iterable[str]:
        """An even head size (and an even number >= 2 of rotated dims); ``scaling: "llama3"`` with all four scaling parameters (high_freq_factor >
        low_freq_factor), ``scaling: "none"`` with none of them (they would be silently unused)."""
        problems = []
        if dims.head_dim % 2:
            size = "head_dim" if dims.head_size is not None else "emb_dim/n_heads"
            problems.append(f"RoPE needs an even head size; {size} = {dims.head_dim}")
        fraction = params.get("rotary_fraction", 1.0)
        rotary_dims = int(dims.head_dim * fraction)
        if fraction != 1.0 and (rotary_dims < 2 or rotary_dims % 2):
            problems.append(f"rotary_fraction {fraction} rotates int({dims.head_dim} * {fraction}) = {rotary_dims} "
                            "dims of each head; RoPE needs an even number, at least 2")
        given = [name for name in cls._SCALING_PARAMS if params.get(name) is not None]
        if params.get("scaling", "none") == "none":
            if given:
                problems.append(f"{', '.join(given)} only apply with scaling 'llama3' (scaling is 'none')")
            return problems
        missing = [name for name in cls._SCALING_PARAMS if name not in given]
        if missing:
            problems.append(f"scaling 'llama3' needs {', '.join(missing)}")
        elif not params["high_freq_factor"] > params["low_freq_factor"]:
            problems.append(f"scaling 'llama3' needs high_freq_factor > low_freq_factor, got "
                            f"{params['high_freq_factor']} and {params['low_freq_factor']}")
        return problems

    def inv_freq(self, device: torch.device | None = None) -> Tensor:
        """The ``rotary_dims / 2`` rotation frequencies θ^(−2i/d), d = ``rotary_dims`` (``head_dim`` unless
        ``rotary_fraction`` < 1, as GPT-NeoX's ``rotary_ndims``), float32, with the ``scaling`` applied.

        ``llama3`` (Llama 3.1, as Hugging Face's ``rope_type: "llama3"``): with wavelength
        λ = 2π/f and L = ``original_context_length``, frequencies with λ < L/high_freq_factor are
        kept, those with λ > L/low_freq_factor are divided by ``factor``, and those between are
        interpolated with weight s = (L/λ − low_freq_factor)/(high_freq_factor − low_freq_factor):
        (1 − s)·f/factor + s·f.
        """
        d = self.rotary_dims
        exponent = torch.arange(0, d, 2, device=device, dtype=torch.float32) / d
        inv_freq = 1.0 / (self.theta ** exponent)
        if self.scaling == "llama3":
            inv_freq = self._llama3(inv_freq)
        return inv_freq

    def _llama3(self, inv_freq: Tensor) -> Tensor:
        """Llama 3.1's frequency scaling of ``inv_freq`` (see :meth:`inv_freq`)."""
        assert self.factor and self.low_freq_factor and self.high_freq_factor and self.original_context_length  # __init__ checked
        old, factor, low, high = self.original_context_length, self.factor, self.low_freq_factor, self.high_freq_factor
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of the rotation angles, each ``(s, rotary_dims)`` float32 for ``positions: (s,)``."""
        inv_freq = self.inv_freq(positions.device)
        angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate ``q: (b, h, s, d)`` and ``k: (b, h_kv, s, d)`` of the tokens at ``positions: (s,)``:
        the first ``rotary_dims`` of each head (rotate-half within them), the rest passed through."""
        cos, sin = self.cos_sin(positions)
        r = self.rotary_dims

        def apply(x: Tensor) -> Tensor:
            if r < x.shape[-1]:
                return torch.cat((apply(x[..., :r]), x[..., r:]), dim=-1)
            x32 = x.float()
            return (x32 * cos + rotate_half(x32) * sin).type_as(x)

        return apply(q), apply(k)

    def extra_repr(self) -> str:
        text = f"head_dim={self.head_dim}, theta={self.theta}"
        if self.rotary_dims != self.head_dim:
            text += f", rotary_dims={self.rotary_dims}"
        if self.scaling == "llama3":
            text += (f", scaling=llama3, factor={self.factor}, low_freq_factor={self.low_freq_factor}, "
                     f"high_freq_factor={self.high_freq_factor}, original_context_length={self.original_context_length}")
        return text


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al. 2022 and their reference code).

    For a power of two n: the geometric sequence 2^(−8/n), 2^(−16/n), ..., 2^(−8) (8 heads:
    1/2, 1/4, ..., 1/256). Otherwise the slopes of the closest smaller power of two p, followed by
    every other slope of 2p, until there are n.

    Python floats, so that rounded to float32 they are the reference code's values, and
    Megatron-DeepSpeed's (BLOOM's training code). transformers' BLOOM computes them with a float32
    ``pow``, which differs from these by at most 3e-6 relative (n > 8 or not a power of two).
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
    BLOOM's (transformers') bias, slope_h · j, differs from this by slope_h · i, a constant per
    query row, which the softmax removes: the attention is the same.
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
