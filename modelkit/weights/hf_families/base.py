"""What a Hugging Face family provides (:class:`HFFamily`), and the key-map machinery families share:
:func:`rename_back` (the reverse of :func:`rename`), and the exact split / join of a fused
per-head-interleaved ``query_key_value`` (GPT-NeoX, BLOOM: :func:`split_interleaved_qkv`,
:func:`join_interleaved_qkv`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..hf import KeyRule, _compile, _derive, _Source, rename
from ...errors import CheckpointError
from ...spec import ModelSpec

if TYPE_CHECKING:
    from ...model import GPTModel


@dataclass(frozen=True)
class HFFamily:
    """One Hugging Face ``model_type``: its config -> spec, its key map both ways.

    ``spec_from_config(config, name, source)`` raises ``CheckpointError`` naming an unsupported
    field; ``to_modelkit(sources, spec)`` returns ``(modelkit-named items, unmatched HF names)``;
    ``config_from_spec(spec, dtype)`` raises ``CheckpointError`` listing the parts with no
    equivalent in the family; ``to_hf(model)`` is the family's state dict (tied heads absent).
    """

    model_type: str
    label: str
    spec_from_config: Callable[[Mapping[str, Any], str, str], ModelSpec]
    to_modelkit: Callable[[Mapping[str, Any], ModelSpec], tuple[dict[str, Any], list[str]]]
    config_from_spec: Callable[[ModelSpec, torch.dtype], dict[str, Any]]
    to_hf: Callable[[GPTModel], dict[str, Tensor]]


def rename_back(state: Mapping[str, Tensor], rules: Iterable[KeyRule]) -> dict[str, Tensor]:
    """The reverse of :func:`rename` for one-to-one ``copy`` rules: modelkit names -> HF names.

    Every tensor of ``state`` must match exactly one rule's modelkit name (a ``KeyError`` otherwise:
    the family's export refuses such models before this is called).
    """
    backward = [(rule, _compile(KeyRule(rule.modelkit[0], (rule.hf,), rule.how))) for rule in rules
                if rule.how == "copy" and len(rule.modelkit) == 1]
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        for rule, pattern in backward:
            m = pattern.match(name)
            if m is not None:
                out[rule.hf.format(i=m.group("i")) if "{i}" in rule.hf else rule.hf] = tensor
                break
        else:
            raise KeyError(f"no key-map rule for the modelkit tensor {name}")
    return out


def head_size_problems(hidden_size: int, heads: int, head_dim: int | None) -> list[str]:
    """Why a config's attention heads do not fit modelkit's head size (``hidden_size / heads``), if they do not."""
    if hidden_size % heads:
        return [f"hidden_size {hidden_size} is not divisible by num_attention_heads {heads}"]
    if head_dim is not None and head_dim != hidden_size // heads:
        return [f"head_dim {head_dim} differs from hidden_size / num_attention_heads = {hidden_size // heads} "
                "(modelkit's head size)"]
    return []


#: The modelkit names of the three projections a fused ``query_key_value`` holds, in its order.
QKV_NAMES = ("W_query", "W_key", "W_value")


def split_qkv(t: Tensor, n_heads: int, j: int) -> Tensor:
    """Part ``j`` (0 query, 1 key, 2 value) of a fused ``query_key_value`` weight ``(3·hidden, hidden)``
    or bias ``(3·hidden,)``, viewed per head as ``(heads, 3, head_dim, ...)``: ``(hidden, ...)``, exact."""
    fused = t.reshape(n_heads, 3, t.shape[0] // (3 * n_heads), *t.shape[1:])
    return fused[:, j].reshape(t.shape[0] // 3, *t.shape[1:]).clone()


def join_qkv(q: Tensor, k: Tensor, v: Tensor, n_heads: int) -> Tensor:
    """The fused per-head-interleaved ``query_key_value`` tensor of q, k, v (the inverse of :func:`split_qkv`)."""
    parts = [x.reshape(n_heads, 1, x.shape[0] // n_heads, *x.shape[1:]) for x in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(3 * q.shape[0], *q.shape[1:]).contiguous()


def split_interleaved_qkv(sources: Mapping[str, Any], pattern: re.Pattern[str],
                          n_heads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fused ``query_key_value`` tensors of ``sources`` (the names ``pattern`` matches; its groups
    ``i``: the layer, ``p``: ``weight`` or ``bias``) split into ``trf_blocks.i.att.W_{query,key,value}.p``
    (:func:`split_qkv`, lazily for lazy sources), and the other items as they are.

    Raises :class:`CheckpointError` naming a fused tensor whose first dimension is not a multiple of
    ``3 · n_heads``.
    """
    split: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for name, src in sources.items():
        m = pattern.match(name)
        if m is None:
            rest[name] = src
            continue
        shape = tuple(src.shape)
        if not shape or shape[0] % (3 * n_heads):
            raise CheckpointError(f"{name}: shape {shape} is not (3 x hidden, ...) for {n_heads} heads")
        new = (shape[0] // 3, *shape[1:])
        for j, target in enumerate(QKV_NAMES):
            fn = (lambda t, j=j: split_qkv(t, n_heads, j))
            key = f"trf_blocks.{m.group('i')}.att.{target}.{m.group('p')}"
            split[key] = _derive(src, new, fn) if isinstance(src, _Source) else fn(src)
    return split, rest


def join_interleaved_qkv(state: dict[str, Tensor], n_layers: int, n_heads: int, hf_name: str) -> dict[str, Tensor]:
    """Pop every layer's ``att.W_{query,key,value}.{weight,bias}`` from ``state`` and return them joined
    (:func:`join_qkv`) under ``hf_name.format(i=layer, p="weight" or "bias")``."""
    fused: dict[str, Tensor] = {}
    for i in range(n_layers):
        for p in ("weight", "bias"):
            qkv = [state.pop(f"trf_blocks.{i}.att.{n}.{p}") for n in QKV_NAMES]
            fused[hf_name.format(i=i, p=p)] = join_qkv(*qkv, n_heads)
    return fused
