"""OLMo 2 (``model_type: "olmo2"``, ``Olmo2ForCausalLM``) as a spec of registered parts.

OLMo 2 is Llama's parts arranged differently: the spec is ``llama.rope`` (``rope_theta``, default
RoPE only), ``llama.rmsnorm`` (``rms_norm_eps``), ``llama.gqa`` (``num_key_value_heads``;
``attention_bias`` as the spec's ``qkv_bias`` and ``out_bias``) with ``qk_norm: "projection"``
(RMSNorm over the whole query and key projections before the head split and RoPE,
``qk_norm_eps`` = ``rms_norm_eps``), ``llama.swiglu`` (``intermediate_size``, no bias) and the
``olmo.post_norm`` block of the modelkit-olmo plugin (``x + norm1(att(x))``, ``x + norm2(ff(x))``:
no norm before the sub-layers), ``tie_embeddings`` from ``tie_word_embeddings`` (default false),
``drop_rate`` 0.

The key map is explicit (:data:`OLMO2_KEY_MAP`, per block ``model.layers.N``; every tensor is
copied as stored)::

    model.embed_tokens.weight                          -> tok_emb.weight
    model.layers.N.self_attn.{q,k,v}_proj.weight/bias  -> trf_blocks.N.att.W_{query,key,value}.weight/bias
    model.layers.N.self_attn.o_proj.weight/bias        -> trf_blocks.N.att.out_proj.weight/bias
    model.layers.N.self_attn.{q,k}_norm.weight         -> trf_blocks.N.att.{q,k}_norm.weight
    model.layers.N.post_attention_layernorm.weight     -> trf_blocks.N.norm1.weight
    model.layers.N.mlp.{gate,up,down}_proj.weight      -> trf_blocks.N.ff.{gate,up,down}_proj.weight
    model.layers.N.post_feedforward_layernorm.weight   -> trf_blocks.N.norm2.weight
    model.norm.weight                                  -> final_norm.weight
    lm_head.weight                                     -> out_head.weight  (absent or dropped when tied)

Refused with a :class:`CheckpointError` naming the field: a ``rope_type`` other than ``default``,
``hidden_act`` other than ``silu``, a ``head_dim`` other than ``hidden_size / num_attention_heads``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .base import HFFamily
from .llama import (_build_spec, _Eps, _hf_fields, _llama_biases, _LlamaConfig, _part_problems, _problems,
                    _read_config, _refuse, _rename_folder, _rope, _state_to_hf)
from ..hf import _HFSize, KeyRule
from ...spec import ModelSpec

if TYPE_CHECKING:
    from ...model import GPTModel

_B = "model.layers.{i}."
_M = "trf_blocks.{i}."


def _rules() -> tuple[KeyRule, ...]:
    rules = [KeyRule("model.embed_tokens.weight", ("tok_emb.weight",), "copy")]
    attention = {"q_proj": "W_query", "k_proj": "W_key", "v_proj": "W_value", "o_proj": "out_proj"}
    for hf, mk in attention.items():
        for p in ("weight", "bias"):
            rules.append(KeyRule(f"{_B}self_attn.{hf}.{p}", (f"{_M}att.{mk}.{p}",), "copy"))
    for norm in ("q_norm", "k_norm"):
        rules.append(KeyRule(f"{_B}self_attn.{norm}.weight", (f"{_M}att.{norm}.weight",), "copy"))
    rules.append(KeyRule(_B + "post_attention_layernorm.weight", (_M + "norm1.weight",), "copy"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules.append(KeyRule(f"{_B}mlp.{proj}.weight", (f"{_M}ff.{proj}.weight",), "copy"))
    rules += [KeyRule(_B + "post_feedforward_layernorm.weight", (_M + "norm2.weight",), "copy"),
              KeyRule("model.norm.weight", ("final_norm.weight",), "copy"),
              KeyRule("lm_head.weight", ("out_head.weight",), "copy")]
    return tuple(rules)


OLMO2_KEY_MAP: tuple[KeyRule, ...] = _rules()
#: The block type OLMo 2's spec uses (registered by the modelkit-olmo plugin).
OLMO2_BLOCK = "olmo.post_norm"


class _Olmo2Config(_LlamaConfig):
    """The ``config.json`` fields modelkit reads (strict JSON types), with ``Olmo2Config``'s defaults."""

    max_position_embeddings: _HFSize = 2048
    rms_norm_eps: _Eps = 1e-5


def spec_from_config(config: Mapping[str, Any], name: str = "olmo2", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face ``Olmo2ForCausalLM`` ``config.json`` (see the module doc).

    Raises :class:`CheckpointError` naming ``source`` and the field for a config that is not an
    OLMo 2 config object, has malformed fields, or asks for what the parts cannot compute (a
    ``rope_type`` other than ``default``, ``hidden_act`` other than ``silu``, another ``head_dim``).
    """
    cfg = cast(_Olmo2Config, _read_config(config, source, "olmo2", "OLMo 2", _Olmo2Config))
    positional, rope_problems = _rope(cfg, ("default",))
    return _build_spec(cfg, name, source, "OLMo 2", positional, _problems(cfg) + rope_problems,
                       qkv_bias=cfg.attention_bias, out_bias=cfg.attention_bias, mlp_bias=False,
                       attention={"qk_norm": "projection", "qk_norm_eps": cfg.rms_norm_eps}, block=OLMO2_BLOCK)


def to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    """The folder's tensors under modelkit names (:data:`OLMO2_KEY_MAP`), and the unmatched names.
    ``lm_head.weight`` is dropped when the spec ties the head to the embedding."""
    return _rename_folder(sources, spec, OLMO2_KEY_MAP)


def single_eps_problems(spec: ModelSpec, label: str) -> list[str]:
    """Why ``spec``'s q/k norm eps cannot share the block norms' ``rms_norm_eps`` (``label`` has one), if so."""
    if spec.attention.type != "llama.gqa" or spec.norm.type != "llama.rmsnorm":
        return []
    norm_eps, qk_eps = spec.norm.params.get("eps", 1e-5), spec.attention.params.get("qk_norm_eps", 1e-6)
    if qk_eps != norm_eps:
        return [f"attention qk_norm_eps {qk_eps} differs from norm eps {norm_eps} ({label} has one rms_norm_eps)"]
    return []


def unbiased_default_rope_problems(spec: ModelSpec, label: str) -> list[str]:
    """Why ``spec``'s feed-forward bias or RoPE scaling has no ``label`` equivalent, if so."""
    problems = []
    if spec.feedforward.type == "llama.swiglu" and spec.feedforward.params.get("bias"):
        problems.append(f"feedforward bias true ({label}'s MLP has no biases)")
    if spec.positional.type == "llama.rope" and spec.positional.params.get("scaling", "none") != "none":
        problems.append(f"positional scaling '{spec.positional.params['scaling']}' ({label} uses default RoPE)")
    return problems


def config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of an ``Olmo2ForCausalLM`` equivalent to ``spec``.

    Raises :class:`CheckpointError` naming every part with no OLMo 2 equivalent (another block or
    q/k norm, out_bias differing from qkv_bias, a biased feed-forward, RoPE scaling, a q/k norm eps
    other than the norms' eps, parts that are not the llama ones).
    """
    problems = _part_problems(spec, "OLMo 2", _llama_biases, qk_norm="projection", block=OLMO2_BLOCK)
    problems += unbiased_default_rope_problems(spec, "OLMo 2") + single_eps_problems(spec, "OLMo 2")
    _refuse(spec, "OLMo 2", problems)
    # A spec names no special tokens: None, rather than Olmo2Config's defaults (pad 1, eos 50279).
    return {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", **_hf_fields(spec, dtype),
            "attention_bias": spec.qkv_bias, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def to_hf(model: GPTModel) -> dict[str, Tensor]:
    """The ``Olmo2ForCausalLM`` state dict of a model :func:`config_from_spec` accepts
    (``lm_head.weight`` only when the head is not tied)."""
    config_from_spec(model.spec)
    return _state_to_hf(model, OLMO2_KEY_MAP)


OLMO2 = HFFamily(model_type="olmo2", label="OLMo 2", spec_from_config=spec_from_config, to_modelkit=to_modelkit,
                 config_from_spec=config_from_spec, to_hf=to_hf)
