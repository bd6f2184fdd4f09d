"""The KV cache for incremental decoding: prefill once, then one token at a time.

A :class:`KVCache` holds one :class:`LayerKVCache` per layer. An attention module calls
``ctx.cache.update(k, v)`` with the keys and values of the tokens it is processing
(``(b, h_kv, s, d)``, already rotated if the positional component rotates them) and attends over the
returned tensors, which hold every cached token followed by the new ones. Storage is allocated on the
first update from the shapes it receives, so attention with fewer key/value heads (grouped-query) or
another head size takes part without any change here.

The model advances ``KVCache.length`` after each forward pass; positions of new tokens continue from
it. The cache holds at most ``max_length`` tokens (the model's ``context_length``): a forward pass that
would go past it raises ``ValueError``; :func:`modelkit.generate` handles a full window by recomputing
the last ``context_size`` tokens, exactly as the uncached loop does.

A layer whose attention slides a window of ``W`` positions passes ``window=W`` to ``update``: its
storage then holds only the last ``W`` positions (``min(W, max_length)``), whatever the length of the
generation, and ``update`` returns the keys/values its queries can see (the last ``W - 1`` cached
positions and the new ones), still consecutive positions ending at the newest token. Positions stay
absolute (``KVCache.length`` counts every token), so rotations and biases are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerKVCache:
    """Keys and values of one layer, in preallocated storage ``(b, h_kv, capacity, d)``: ``max_length``
    positions, or the last ``window`` positions for a layer that slides a window."""

    def __init__(self, owner: KVCache) -> None:
        self._owner = owner
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, window: int | None = None) -> tuple[Tensor, Tensor]:
        """Store the new keys/values at positions ``[length, length + s)``; return those the new queries see.

        Without ``window``: views ``(b, h_kv, length + s, d)`` of every position so far. With it: the
        positions ``[max(0, length - window + 1), length + s)``, of which storage keeps the last
        ``window``. The caller must not modify what is returned in place.
        """
        start = self._owner.length
        end = start + k.shape[-2]
        if end > self._owner.max_length:
            raise ValueError(
                f"KV cache is full: {start} cached + {k.shape[-2]} new tokens > max_length "
                f"{self._owner.max_length} (the model's context_length)"
            )
        if window is not None and window < self._owner.max_length:
            return self._update_window(k, v, start, window)
        store_k, store_v = self.storage(k, v)
        store_k[..., start:end, :] = k
        store_v[..., start:end, :] = v
        return store_k[..., :end, :], store_v[..., :end, :]

    def _update_window(self, k: Tensor, v: Tensor, start: int, window: int) -> tuple[Tensor, Tensor]:
        """:meth:`update` for a layer whose storage holds the last ``window`` positions, in order."""
        store_k, store_v = self.storage(k, v, window)
        held = min(start, window)  # storage[:held] are positions [start - held, start)
        s = k.shape[-2]
        if held + s <= window:  # room left: append in place, as the full cache does
            store_k[..., held:held + s, :] = k
            store_v[..., held:held + s, :] = v
            return store_k[..., :held + s, :], store_v[..., :held + s, :]
        all_k = torch.cat((store_k[..., :held, :], k), dim=-2)  # positions [start - held, start + s)
        all_v = torch.cat((store_v[..., :held, :], v), dim=-2)
        store_k.copy_(all_k[..., -window:, :])
        store_v.copy_(all_v[..., -window:, :])
        unseen = max(0, held - (window - 1))  # positions before the first new query's window
        return all_k[..., unseen:, :], all_v[..., unseen:, :]

    def storage(self, k: Tensor, v: Tensor, window: int | None = None) -> tuple[Tensor, Tensor]:
        """The ``(b, h_kv, capacity, d)`` key and value storage for new keys/values shaped like ``k`` and
        ``v`` (capacity ``max_length``, or ``min(window, max_length)``), allocated now if there is none
        yet or the batch size changed."""
        capacity = self._owner.max_length if window is None else min(window, self._owner.max_length)
        if self.k is None or self.v is None or self.k.shape[0] != k.shape[0] or self.k.shape[-2] != capacity:
            shape_k = (*k.shape[:-2], capacity, k.shape[-1])
            shape_v = (*v.shape[:-2], capacity, v.shape[-1])
            self.k = torch.empty(shape_k, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape_v, dtype=v.dtype, device=v.device)
        return self.k, self.v


class KVCache:
    """Per-layer key/value caches for a model; ``length`` tokens are cached so far."""

    def __init__(self, n_layers: int, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0
        self.layers = [LayerKVCache(self) for _ in range(n_layers)]

    def advance(self, n_tokens: int) -> None:
        """Record that the layers stored ``n_tokens`` more tokens (called by the model)."""
        self.length += n_tokens

    def reset(self) -> None:
        """Forget every cached token (storage is kept for reuse)."""
        self.length = 0

    @property
    def remaining(self) -> int:
        return self.max_length - self.length
