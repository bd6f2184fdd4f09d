"""Gemma 2 (``model_type: "gemma2"``, ``Gemma2ForCausalLM``) as a spec of registered parts.

Gemma's parts (:mod:`.gemma`: ``llama.rope``, ``gemma.rmsnorm``, ``gemma.geglu``, ``head_dim``,
``embedding_scale`` √hidden_size) with ``gemma.sandwich`` blocks (a norm before and after each
sub-layer) and, on ``llama.gqa``: ``softcap`` from ``attn_logit_softcapping`` (scores become
``c·tanh(scores / c)``), ``query_scale`` ``query_pre_attn_scalar ** -0.5`` (instead of
1/√head_dim), ``sliding_window`` with ``window_pattern`` from ``layer_types`` (a query of a
``sliding_attention`` layer sees itself and the ``sliding_window - 1`` positions before it; by
default the even layers slide: pattern ``[true, false]``); at model level ``final_logit_softcap``
from ``final_logit_softcapping``. The activation is ``hidden_activation``'s, which is all
``Gemma2ForCausalLM`` reads (``gelu_pytorch_tanh``: the tanh GELU ``gelu``; ``gelu``: the exact
``gelu_exact``); ``hidden_act`` is ignored, as transformers ignores it. Missing fields take
``Gemma2Config``'s defaults (``num_key_value_heads`` 4, ``head_dim`` 256, ``query_pre_attn_scalar``
256, ``sliding_window`` 4096, soft-caps 50 and 30).

The key map is explicit (:data:`GEMMA2_KEY_MAP`, per block ``model.layers.N``; every tensor is
copied as stored)::

    model.embed_tokens.weight                          -> tok_emb.weight
    model.layers.N.input_layernorm.weight              -> trf_blocks.N.norm1.weight
    model.layers.N.self_attn.{q,k,v}_proj.weight/bias  -> trf_blocks.N.att.W_{query,key,value}.weight/bias
    model.layers.N.self_attn.o_proj.weight/bias        -> trf_blocks.N.att.out_proj.weight/bias
    model.layers.N.post_attention_layernorm.weight     -> trf_blocks.N.post_norm1.weight
    model.layers.N.pre_feedforward_layernorm.weight    -> trf_blocks.N.norm2.weight
    model.layers.N.mlp.{gate,up,down}_proj.weight      -> trf_blocks.N.ff.{gate,up,down}_proj.weight
    model.layers.N.post_feedforward_layernorm.weight   -> trf_blocks.N.post_norm2.weight
    model.norm.weight                                  -> final_norm.weight
    lm_head.weight                                     -> out_head.weight  (absent or dropped when tied)

Refused with a :class:`CheckpointError` naming the field: a ``rope_type`` other than ``default``, a
``hidden_activation`` other than the GELUs, ``silu`` and ``relu``, ``layer_types`` of another
length or with other entries than ``sliding_attention`` / ``full_attention``, sliding layers with
``sliding_window: null``, ``use_bidirectional_attention: true``. Export refuses specs with no Gemma 2
equivalent (other parts or blocks, RoPE scaling, a query scale that is not ``s ** -0.5`` for a whole
``s``, an embedding scale other than √emb_dim, a head bias...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, cast

import torch
from pydantic import Field
from torch import Tensor

from .base import HFFamily
from .gemma import (GEMMA_KEY_MAP, HF_ACTIVATIONS, _GemmaConfig, activation_of, gemma_spec, hf_activation, hf_fields,
                    part_problems)
from .llama import _read_config, _refuse, _rename_folder, _state_to_hf
from ..hf import _HFSize, KeyRule
from ...spec import ModelSpec

if TYPE_CHECKING:
    from ...model import GPTModel

_B = "model.layers.{i}."
_M = "trf_blocks.{i}."
_NORMS = {"post_attention_layernorm": "post_norm1", "pre_feedforward_layernorm": "norm2",
          "post_feedforward_layernorm": "post_norm2"}
GEMMA2_KEY_MAP: tuple[KeyRule, ...] = (
    tuple(rule for rule in GEMMA_KEY_MAP if rule.hf != _B + "post_attention_layernorm.weight")
    + tuple(KeyRule(f"{_B}{hf}.weight", (f"{_M}{mk}.weight",), "copy") for hf, mk in _NORMS.items()))
SLIDING, FULL = "sliding_attention", "full_attention"
_Cap = Annotated[float, Field(gt=0, le=1e6)]


class _Gemma2Config(_GemmaConfig):
    """The ``config.json`` fields modelkit reads (strict JSON types), with ``Gemma2Config``'s defaults."""

    num_key_value_heads: _HFSize = 4
    hidden_activation: str | None = "gelu_pytorch_tanh"
    query_pre_attn_scalar: Annotated[float, Field(gt=0, le=1e9)] = 256
    sliding_window: _HFSize | None = 4096
    layer_types: list[str] | None = None
    final_logit_softcapping: _Cap | None = 30.0
    attn_logit_softcapping: _Cap | None = 50.0


def sliding_layers(cfg: _Gemma2Config) -> tuple[list[bool], list[str]]:
    """Which layers slide their window (``layer_types``, or ``Gemma2Config``'s default: the even
    layers), and the problems with ``layer_types`` / ``sliding_window``."""
    n = cfg.num_hidden_layers
    types = cfg.layer_types if cfg.layer_types is not None else [SLIDING if i % 2 == 0 else FULL for i in range(n)]
    problems = []
    if len(types) != n:
        problems.append(f"layer_types has {len(types)} entries for num_hidden_layers {n}")
    others = sorted({t for t in types if t not in (SLIDING, FULL)})
    if others:
        problems.append(f"layer_types {others} are not supported (only {SLIDING!r} and {FULL!r})")
    sliding = [t == SLIDING for t in types]
    if any(sliding) and cfg.sliding_window is None:
        problems.append(f"sliding_window is null but layer_types has {SLIDING!r} layers")
    return sliding, problems


def shortest_period(flags: list[bool]) -> list[bool]:
    """The shortest prefix ``p`` of ``flags`` with ``flags[i] == p[i % len(p)]`` for every ``i``."""
    for size in range(1, len(flags) + 1):
        if all(flags[i] == flags[i % size] for i in range(len(flags))):
            return flags[:size]
    return flags


def _window(cfg: _Gemma2Config, sliding: list[bool]) -> dict[str, Any]:
    """The ``llama.gqa`` window parameters of the sliding layers ``sliding`` (none when no layer slides)."""
    if not any(sliding):
        return {}
    pattern = shortest_period(sliding)
    return {"sliding_window": cfg.sliding_window, **({"window_pattern": pattern} if pattern != [True] else {})}


def spec_from_config(config: Mapping[str, Any], name: str = "gemma2", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face ``Gemma2ForCausalLM`` ``config.json`` (see the module doc).

    Raises :class:`CheckpointError` naming ``source`` and the field for a config that is not a Gemma 2
    config object, has malformed fields, or asks for what the parts cannot compute.
    """
    cfg = cast(_Gemma2Config, _read_config(config, source, "gemma2", "Gemma 2", _Gemma2Config))
    if cfg.hidden_activation is None:
        activation, problems = None, ["hidden_activation is null (Gemma2ForCausalLM reads its activation there)"]
    else:
        activation, problems = activation_of(cfg.hidden_activation, "hidden_activation", HF_ACTIVATIONS)
    sliding, window_problems = sliding_layers(cfg)
    attention = {"softcap": cfg.attn_logit_softcapping, "query_scale": cfg.query_pre_attn_scalar ** -0.5,
                 **_window(cfg, sliding)}
    return gemma_spec(cfg, name, source, "Gemma 2", problems + window_problems, activation=activation,
                      attention=attention, block="gemma.sandwich", final_logit_softcap=cfg.final_logit_softcapping)


def to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    """The folder's tensors under modelkit names (:data:`GEMMA2_KEY_MAP`), and the unmatched names.
    ``lm_head.weight`` is dropped when the spec ties the head to the embedding."""
    return _rename_folder(sources, spec, GEMMA2_KEY_MAP)


def query_pre_attn_scalar(spec: ModelSpec) -> tuple[int | None, list[str]]:
    """The ``query_pre_attn_scalar`` s with ``s ** -0.5`` equal to ``spec``'s ``query_scale`` (the head
    size without one), or None and the problem when no whole number gives it exactly."""
    scale = spec.attention.params.get("query_scale")
    if scale is None:
        return spec.dims.head_dim, []
    scalar = round(scale ** -2)
    if scalar < 1 or scalar ** -0.5 != scale:
        return None, [f"attention query_scale {scale} (Gemma 2 scales by query_pre_attn_scalar ** -0.5 for a whole "
                      "query_pre_attn_scalar)"]
    return scalar, []


def _layer_types(spec: ModelSpec) -> list[str]:
    """``layer_types`` of ``spec``'s attention: which layers slide their window."""
    params = spec.attention.params
    pattern = params.get("window_pattern") or [True]
    slides = params.get("sliding_window") is not None
    return [SLIDING if slides and pattern[i % len(pattern)] else FULL for i in range(spec.n_layers)]


def config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a ``Gemma2ForCausalLM`` equivalent to ``spec``: ``layer_types`` from the
    window pattern; without a window every layer is ``full_attention`` (``sliding_window`` is then
    written as the context length, which no layer reads); ``query_pre_attn_scalar`` the whole number
    whose ``** -0.5`` is the query scale (the head size without one).

    Raises :class:`CheckpointError` naming every part with no Gemma 2 equivalent.
    """
    problems = part_problems(spec, "Gemma 2", "gemma.sandwich", gemma2=True, stated=("final_logit_softcap",))
    act, act_problems = hf_activation(spec, "hidden_activation", HF_ACTIVATIONS, "Gemma 2")
    scalar, scale_problems = (query_pre_attn_scalar(spec) if spec.attention.type == "llama.gqa" else (None, []))
    _refuse(spec, "Gemma 2", problems + act_problems + scale_problems)
    params = spec.attention.params
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", **hf_fields(spec, dtype),
            "hidden_activation": act, "query_pre_attn_scalar": scalar,
            "sliding_window": params.get("sliding_window") or spec.context_length,
            "layer_types": _layer_types(spec), "attn_logit_softcapping": params.get("softcap"),
            "final_logit_softcapping": spec.final_logit_softcap}


def to_hf(model: GPTModel) -> dict[str, Tensor]:
    """The ``Gemma2ForCausalLM`` state dict of a model :func:`config_from_spec` accepts
    (``lm_head.weight`` only when the head is not tied)."""
    config_from_spec(model.spec)
    return _state_to_hf(model, GEMMA2_KEY_MAP)


GEMMA2 = HFFamily(model_type="gemma2", label="Gemma 2", spec_from_config=spec_from_config, to_modelkit=to_modelkit,
                  config_from_spec=config_from_spec, to_hf=to_hf)
