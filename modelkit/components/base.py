"""The plugin API: what each kind of component receives, and what it must return.

Every component is an ``nn.Module`` subclass of one of the base classes below, constructed as
``Component(dims, *, **json_params)`` (blocks as ``Block(dims, parts, *, **json_params)``):

- ``dims`` (:class:`ModelDims`): the spec's model-wide sizes: ``vocab_size``, ``context_length``,
  ``emb_dim``, ``n_heads``, ``n_layers``, ``drop_rate``, ``qkv_bias``, and ``head_dim`` (the spec's, else
  ``emb_dim // n_heads``) with ``attention_dim = n_heads * head_dim``, the width attention projects to.
- keyword-only arguments: the component's own JSON parameters, validated by the registry from their
  type hints (``Annotated[float, Field(gt=0)]`` adds constraints). A parameter annotated
  ``Annotated[nn.Module, SubComponent("activation")]`` is a nested component reference in JSON and
  arrives built.

Forward contracts (``b`` batch, ``s`` sequence, ``e`` emb_dim, ``h`` heads, ``d`` head dim):

- :class:`Activation`, :class:`Norm`, :class:`FeedForward`: ``forward(x) -> same shape`` on ``(b, s, e)``.
- :class:`Attention`: ``forward(x, ctx)`` with ``x: (b, s, e)`` -> ``(b, s, e)``. It must be causal,
  apply ``ctx.positional.rotate`` to q/k and ``ctx.positional.attention_bias`` to the scores, and,
  when ``ctx.cache`` is set, pass its new keys/values through ``ctx.cache.update`` and attend over
  what that returns (see :mod:`modelkit.cache`). The simplest way to do all of that is to compute
  q ``(b, h, s, d)`` and k/v ``(b, h_kv, s, d)`` and call
  :func:`modelkit.components.attention.attend` with a kernel from
  :func:`~modelkit.components.kernels.get_attention_kernel` (a ``backend`` parameter annotated
  ``BackendName`` offers the same kernels as ``mha``).
- :class:`Positional`: where positions enter; override any of ``embedding`` (added to the token
  embeddings), ``rotate`` (q/k rotation, as RoPE) and ``attention_bias`` (score bias, as ALiBi).
  Hooks receive *absolute* positions (continuing after the cached tokens), so computing from them
  makes a positional work with the KV cache unchanged.
- :class:`Block`: ``forward(x, ctx) -> (b, s, e)``; builds its parts with ``parts.norm()``,
  ``parts.attention()`` and ``parts.feedforward()`` and arranges norms, shortcuts and dropout.

The KV cache: the model creates one :class:`~modelkit.cache.LayerKVCache` per block and hands it
down in ``ctx.cache``; only attention touches it (keys already rotated, with however many key/value
heads it has). Other kinds take part simply by being position-wise.

A component is complete with ``forward`` (and ``residual_projections()`` where it has one): nothing
here is about speed. Speed is the business of :mod:`modelkit.runtime`, where it is registered per
component class; a plugin may do that in a module of its own (``docs/extending.md``).

Rules every component follows (checked by :func:`modelkit.testing.check_component`): causal,
deterministic in eval mode, all state it needs in its state dict (a fresh instance that loads it
computes the same), constructible on the meta device (tensors needed at run time are parameters,
persistent buffers, or computed in forward), exact under the KV cache.

Registering: built-ins use :func:`modelkit.register`; a third-party package declares one entry point
per component in the group ``modelkit.<kind>`` (name ``namespace.name``, value ``module:Class``) and
its modules register nothing on import. Bare names are modelkit's; duplicate names are an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..cache import LayerKVCache


@dataclass(frozen=True)
class ModelDims:
    """The model-wide sizes every component is built with (the book's GPT_CONFIG fields)."""

    vocab_size: int
    context_length: int
    emb_dim: int
    n_heads: int
    n_layers: int
    drop_rate: float
    qkv_bias: bool
    head_size: int | None = None  #: the spec's ``head_dim`` when it gives one

    @property
    def head_dim(self) -> int:
        """The size of each attention head: the spec's ``head_dim``, else ``emb_dim // n_heads``."""
        return self.head_size or self.emb_dim // self.n_heads

    @property
    def attention_dim(self) -> int:
        """The width of all query heads together, ``n_heads * head_dim`` (``emb_dim`` unless ``head_dim``
        is given): attention projects ``emb_dim`` to this and back."""
        return self.n_heads * self.head_dim


class Component(nn.Module):
    """Common base of every component kind."""

    @classmethod
    def check_dims(cls, dims: ModelDims, **params: Any) -> Iterable[str]:
        """Problems with building this component at these sizes (validated before anything is built).

        ``params`` are the component's validated JSON parameters. Return human-readable messages;
        the spec reports them at the component's JSON path.
        """
        return ()

    def residual_projections(self) -> list[nn.Linear]:
        """Linear layers whose output joins the residual stream (the ``gpt2`` init scales them)."""
        return []


class Activation(Component):
    """Elementwise non-linearity: ``forward(x) -> same shape``."""


class Norm(Component):
    """Normalisation over the last dimension (``emb_dim``): ``forward(x) -> same shape``."""


class FeedForward(Component):
    """Position-wise network: ``forward(x: (b, s, e)) -> (b, s, e)``."""


class Positional(Component):
    """Where token positions enter the model. The defaults do nothing; override what applies.

    ``positions`` are absolute positions (LongTensor ``(s,)``) of the tokens being processed; with a
    KV cache they continue from the number of tokens already cached.
    """

    def embedding(self, positions: Tensor) -> Tensor | None:
        """A ``(s, emb_dim)`` tensor added to the token embeddings, or None."""
        return None

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate queries ``(b, h, s, d)`` and keys ``(b, h_kv, s, d)`` of tokens at ``positions``.

        Called before keys enter the KV cache, so cached keys are already rotated.
        """
        return q, k

    def attention_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """A bias ``(h, s_q, s_k)`` (or broadcastable) added to the scaled attention scores, or None."""
        return None


class NoPositional(Positional):
    """Used when a module runs outside a model (no context given): no positional information."""


class Dropout(nn.Dropout):
    """``nn.Dropout`` that returns its input at once when it does nothing (eval mode, or ``p = 0``).

    Same module, ``repr``, state dict (none) and random numbers as ``nn.Dropout``; it only skips the
    functional call, which ``nn.Dropout`` makes even in eval mode, a cost paid several times per layer
    for every decoded token. Built-in blocks and attention use it; plugins may too.
    """

    def forward(self, input: Tensor) -> Tensor:
        if self.training and self.p > 0.0:
            return F.dropout(input, self.p, True, self.inplace)
        return input


@dataclass
class LayerContext:
    """What a block (and its attention) receives besides the hidden states, for one forward pass.

    ``layer`` is the block's index in the model (0 for a module run on its own), for parts that
    differ by depth, such as attention that slides its window on some layers only.
    """

    positions: Tensor
    positional: Positional
    cache: LayerKVCache | None = None
    layer: int = 0


class Attention(Component):
    """Causal self-attention: ``forward(x: (b, s, e), ctx: LayerContext | None) -> (b, s, e)``."""


class BlockParts(Protocol):
    """Factories a block uses to build its parts; each call builds a new module from the spec."""

    def norm(self) -> Norm: ...

    def attention(self) -> Attention: ...

    def feedforward(self) -> FeedForward: ...


class Block(Component):
    """One transformer layer: ``forward(x: (b, s, e), ctx: LayerContext | None) -> (b, s, e)``."""

    def residual_projections(self) -> list[nn.Linear]:
        """Its parts' residual projections (attention output, feed-forward output)."""
        return [p for child in self.children() if isinstance(child, Component)
                for p in child.residual_projections()]
