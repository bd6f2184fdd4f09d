"""GPTModel: the book's GPT (chapter 4), assembled from the components a spec names."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .cache import KVCache
from .components.base import Block, Dropout, LayerContext, Positional
from .components.build import SpecBlockParts, build_component
from .sizing import check_model_size
from .spec import ModelSpec, load_spec

#: What stands for a part in :meth:`GPTModel.forward_with`: the module, or a function computing the same.
Part = Callable[..., Tensor]


class GPTModel(nn.Module):
    """Token + positional embeddings, dropout, ``n_layers`` blocks, final norm, output head.

    What other architectures add around that is in the spec, each off by default: ``embedding_scale``
    (multiplies the token embeddings), ``embedding_norm`` (a norm after the embeddings, ``emb_norm``),
    ``head_bias`` (a bias in ``out_head``) and ``final_logit_softcap`` (``c·tanh(logits/c)``).

    Attribute names are the book's (``tok_emb``, ``pos_emb``, ``drop_emb``, ``trf_blocks``,
    ``final_norm``, ``out_head``) and modules are created in the book's order, so after
    ``torch.manual_seed(123)`` the default gpt2-small spec has exactly the book's weights.
    ``GPTModel(GPT_CONFIG_124M)`` works with the book's dict, as does any spec :func:`load_spec` takes.
    A spec over ``MAX_PARAMETERS`` parameters, or too large for the free memory of the device it is
    built on (torch's default device), is refused before anything is allocated
    (:func:`modelkit.sizing.check_model_size`).
    """

    def __init__(self, cfg: ModelSpec | Mapping[str, Any] | str | os.PathLike[str]) -> None:
        super().__init__()
        spec = load_spec(cfg)
        check_model_size(spec)  # before any allocation: MAX_PARAMETERS, and the device's free memory
        dims = spec.dims
        self.spec = spec
        self.tok_emb = nn.Embedding(dims.vocab_size, dims.emb_dim)
        self.pos_emb: Positional = build_component("positional", spec.positional, dims)  # type: ignore[assignment]
        if spec.embedding_norm is not None:  # no attribute at all without one: the book's modules, in its order
            self.emb_norm = build_component("norm", spec.embedding_norm, dims)
        self.drop_emb = Dropout(dims.drop_rate)
        parts = SpecBlockParts(spec, dims)
        self.trf_blocks = nn.ModuleList(build_component("block", spec.block, dims, parts) for _ in range(dims.n_layers))
        self.final_norm = build_component("norm", spec.norm, dims)
        self.out_head = nn.Linear(dims.emb_dim, dims.vocab_size, bias=spec.head_bias)
        if spec.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        if spec.init == "gpt2":
            init_gpt2_(self)

    @property
    def context_length(self) -> int:
        return self.spec.context_length

    def new_cache(self) -> KVCache:
        """An empty KV cache sized for this model (``context_length`` tokens)."""
        return KVCache(len(self.trf_blocks), self.spec.context_length)

    def forward(self, in_idx: Tensor, *, cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        """Logits ``(batch, seq, vocab_size)`` for token ids ``in_idx: (batch, seq)``.

        With ``cache``, ``in_idx`` continues the cached tokens (positions start at ``cache.length``)
        and the cache is extended. ``last_only`` computes logits for the last position only
        (``(batch, 1, vocab_size)``), which is what generation needs.
        """
        return self.forward_with(in_idx, cache, last_only, self.tok_emb, self.drop_emb, self.trf_blocks,
                                 self.final_norm, self.out_head)

    def forward_with(self, in_idx: Tensor, cache: KVCache | None, last_only: bool, tok_emb: Part, drop_emb: Part,
                     blocks: Iterable[Part], final_norm: Part, out_head: Part) -> Tensor:
        """:meth:`forward` with the given callables standing for the parts (``forward`` passes the
        modules; a caller may pass functions computing the same). Positions and the cache are handled
        here, so callers only choose how each part is computed."""
        _, seq_len = in_idx.shape
        start = cache.length if cache is not None else 0
        if start + seq_len > self.spec.context_length:
            raise ValueError(
                f"{start + seq_len} tokens ({start} cached + {seq_len} new) exceed context_length "
                f"{self.spec.context_length}; crop the input to its last {self.spec.context_length} tokens"
            )
        positions = torch.arange(start, start + seq_len, device=in_idx.device)
        spec = self.spec
        x = tok_emb(in_idx)
        if spec.embedding_scale != 1.0:  # in the embeddings' dtype, as Gemma rounds sqrt(emb_dim)
            x = x * torch.tensor(spec.embedding_scale, dtype=x.dtype)
        pos_emb = self.pos_emb
        pos = pos_emb.embedding(positions)
        if pos is not None:
            x = x + pos
        if spec.embedding_norm is not None:
            x = self.emb_norm(x)
        x = drop_emb(x)
        for i, block in enumerate(blocks):
            x = block(x, LayerContext(positions, pos_emb, cache.layers[i] if cache is not None else None, i))
        if cache is not None:
            cache.advance(seq_len)
        x = final_norm(x)
        if last_only:
            x = x[:, -1:, :]
        logits = out_head(x)
        cap = spec.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


@torch.no_grad()
def init_gpt2_(model: GPTModel) -> None:
    """GPT-2's initialisation: weights N(0, 0.02), biases 0, norms untouched, residual projections
    (attention output, feed-forward output) N(0, 0.02/√(2·n_layers)) (Radford et al. 2019)."""
    std = 0.02
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Positional):
            for param in module.parameters(recurse=False):
                nn.init.normal_(param, 0.0, std)
    residual_std = std / math.sqrt(2 * model.spec.n_layers)
    for block in model.trf_blocks:
        assert isinstance(block, Block)
        for proj in block.residual_projections():
            nn.init.normal_(proj.weight, 0.0, residual_std)
