"""What a Hugging Face family provides (:class:`HFFamily`), and the key-map machinery families share."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..hf import KeyRule, _compile, rename
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
