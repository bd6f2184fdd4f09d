"""Mistral (``model_type: "mistral"``, ``MistralForCausalLM``) as a spec of registered parts.

Mistral is Llama's architecture without biases, with sliding-window attention on every layer: the
spec is the llama plugin's parts, as for :mod:`.llama` — ``llama.rope`` (``rope_theta``, default
RoPE only), ``llama.rmsnorm`` (``rms_norm_eps``), ``llama.gqa`` (``num_key_value_heads``, no biases,
``sliding_window`` from ``sliding_window``: a query sees itself and the ``sliding_window - 1``
positions before it; ``null`` is full attention), ``llama.swiglu`` (``intermediate_size``, no bias),
``pre_norm`` blocks, ``tie_embeddings`` from ``tie_word_embeddings``, ``drop_rate`` 0. Missing fields
take ``MistralConfig``'s defaults (``sliding_window`` 4096, ``num_key_value_heads`` 8,
``max_position_embeddings`` 131072, ``rms_norm_eps`` 1e-6).

The key map (:data:`MISTRAL_KEY_MAP`) is Llama's without its optional biases (Mistral has none), so
a bias tensor in a folder is refused as unknown::

    model.embed_tokens.weight                        -> tok_emb.weight
    model.layers.N.input_layernorm.weight            -> trf_blocks.N.norm1.weight
    model.layers.N.self_attn.{q,k,v,o}_proj.weight   -> trf_blocks.N.att.{W_query,W_key,W_value,out_proj}.weight
    model.layers.N.post_attention_layernorm.weight   -> trf_blocks.N.norm2.weight
    model.layers.N.mlp.{gate,up,down}_proj.weight    -> trf_blocks.N.ff.{gate,up,down}_proj.weight
    model.norm.weight                                -> final_norm.weight
    lm_head.weight                                   -> out_head.weight  (absent or dropped when tied)

Refused with a :class:`CheckpointError` naming the field: a ``rope_type`` other than ``default``,
``hidden_act`` other than ``silu``, a ``head_dim`` other than ``hidden_size / num_attention_heads``,
``layer_types`` that mix full and sliding layers (``MistralForCausalLM`` ignores them and slides every
layer: such a folder is another model). ``attention_bias`` / ``mlp_bias`` are not Mistral fields and,
as in transformers, change nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, cast

import torch
from pydantic import Field
from torch import Tensor

from .base import HFFamily
from .llama import (LLAMA_KEY_MAP, _build_spec, _hf_fields, _LlamaConfig, _part_problems, _problems,
                    _read_config, _refuse, _rename_folder, _rope, _state_to_hf)
from ..hf import _HFSize, KeyRule
from ...spec import ModelSpec

if TYPE_CHECKING:
    from ...model import GPTModel

MISTRAL_KEY_MAP: tuple[KeyRule, ...] = tuple(rule for rule in LLAMA_KEY_MAP if not rule.hf.endswith(".bias"))


class _MistralConfig(_LlamaConfig):
    """The ``config.json`` fields modelkit reads (strict JSON types), with ``MistralConfig``'s defaults."""

    num_key_value_heads: _HFSize | None = 8
    max_position_embeddings: _HFSize = 4096 * 32
    sliding_window: Annotated[int, Field(ge=1)] | None = 4096
    layer_types: list[str] | None = None


def _layer_type_problems(cfg: _MistralConfig) -> list[str]:
    """Why ``cfg``'s ``layer_types`` (if any) are not what ``MistralForCausalLM`` computes on every layer."""
    computed = "full_attention" if cfg.sliding_window is None else "sliding_attention"
    others = sorted({t for t in cfg.layer_types or () if t != computed})
    if others:
        return [f"layer_types {others} are not supported (MistralForCausalLM ignores layer_types and computes "
                f"'{computed}' on every layer)"]
    return []


def spec_from_config(config: Mapping[str, Any], name: str = "mistral", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face ``MistralForCausalLM`` ``config.json`` (see the module doc).

    Raises :class:`CheckpointError` naming ``source`` and the field for a config that is not a Mistral
    config object, has malformed fields, or asks for what the parts cannot compute (a ``rope_type``
    other than ``default``, ``hidden_act`` other than ``silu``, mixed ``layer_types``); a ``head_dim`` of its own is the spec's.
    """
    cfg = cast(_MistralConfig, _read_config(config, source, "mistral", "Mistral", _MistralConfig))
    positional, rope_problems = _rope(cfg, ("default",))
    problems = _problems(cfg, free_head_dim=True) + rope_problems + _layer_type_problems(cfg)
    return _build_spec(cfg, name, source, "Mistral", positional, problems, qkv_bias=False, out_bias=False,
                       mlp_bias=False, attention={"sliding_window": cfg.sliding_window}, head_dim=cfg.head_dim)


def to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    """The folder's tensors under modelkit names (:data:`MISTRAL_KEY_MAP`), and the unmatched names.
    ``lm_head.weight`` is dropped when the spec ties the head to the embedding."""
    return _rename_folder(sources, spec, MISTRAL_KEY_MAP)


def _no_biases(spec: ModelSpec) -> str | None:
    """Why ``spec``'s attention has biases Mistral does not have, or None."""
    if spec.qkv_bias or spec.attention.params.get("out_bias"):
        return "attention biases (Mistral's attention has none)"
    return None


def config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a ``MistralForCausalLM`` equivalent to ``spec`` (``sliding_window``: the
    attention's, ``null`` for full attention).

    Raises :class:`CheckpointError` naming every part with no Mistral equivalent (biases, RoPE
    scaling, a window on some layers only, soft-capping, a query scale, parts that are not the llama ones).
    """
    problems = _part_problems(spec, "Mistral", _no_biases, window=True, stated=("head_dim",))
    if spec.feedforward.type == "llama.swiglu" and spec.feedforward.params.get("bias"):
        problems.append("feedforward bias true (Mistral's MLP has no biases)")
    if spec.positional.type == "llama.rope" and spec.positional.params.get("scaling", "none") != "none":
        problems.append(f"positional scaling '{spec.positional.params['scaling']}' (Mistral uses default RoPE)")
    _refuse(spec, "Mistral", problems)
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **_hf_fields(spec, dtype),
            "sliding_window": spec.attention.params.get("sliding_window")}


def to_hf(model: GPTModel) -> dict[str, Tensor]:
    """The ``MistralForCausalLM`` state dict of a model :func:`config_from_spec` accepts
    (``lm_head.weight`` only when the head is not tied)."""
    config_from_spec(model.spec)
    return _state_to_hf(model, MISTRAL_KEY_MAP)


MISTRAL = HFFamily(model_type="mistral", label="Mistral", spec_from_config=spec_from_config, to_modelkit=to_modelkit,
                   config_from_spec=config_from_spec, to_hf=to_hf)
