"""Qwen3 (``model_type: "qwen3"``, ``Qwen3ForCausalLM``) as a spec of registered parts.

Qwen3 is Llama's parts with RMSNorm on each query and key head before RoPE and a head size of its
own: the spec is ``llama.rope`` (``rope_theta``, default RoPE only), ``llama.rmsnorm``
(``rms_norm_eps``), ``llama.gqa`` (``num_key_value_heads``; ``attention_bias`` as the spec's
``qkv_bias`` and ``out_bias``) with ``qk_norm: "head"`` (``qk_norm_eps`` = ``rms_norm_eps``),
``llama.swiglu`` (``intermediate_size``, no bias), ``pre_norm`` blocks, the spec's ``head_dim``
from ``head_dim`` (Qwen3Config's default: 128, whatever ``hidden_size / num_attention_heads`` is;
left out of the spec when it equals that), ``tie_embeddings`` from ``tie_word_embeddings``
(Qwen3-0.6B ties), ``drop_rate`` 0.

The key map (:data:`QWEN3_KEY_MAP`) is Llama's without MLP biases, plus the q/k norms::

    model.embed_tokens.weight                        -> tok_emb.weight
    model.layers.N.input_layernorm.weight            -> trf_blocks.N.norm1.weight
    model.layers.N.self_attn.{q,k,v}_proj.weight/bias -> trf_blocks.N.att.W_{query,key,value}.weight/bias
    model.layers.N.self_attn.o_proj.weight/bias      -> trf_blocks.N.att.out_proj.weight/bias
    model.layers.N.self_attn.{q,k}_norm.weight       -> trf_blocks.N.att.{q,k}_norm.weight  (head_dim each)
    model.layers.N.post_attention_layernorm.weight   -> trf_blocks.N.norm2.weight
    model.layers.N.mlp.{gate,up,down}_proj.weight    -> trf_blocks.N.ff.{gate,up,down}_proj.weight
    model.norm.weight                                -> final_norm.weight
    lm_head.weight                                   -> out_head.weight  (absent or dropped when tied)

Sliding windows are read as for :mod:`.qwen2` (``Qwen3Config`` derives them the same way:
``use_sliding_window``, ``sliding_window``, ``max_window_layers`` or ``layer_types``), as
``llama.gqa``'s ``sliding_window`` and ``window_pattern``; export writes ``layer_types``.

Refused with a :class:`CheckpointError` naming the field: ``sliding_attention`` layers without a
window, a ``layer_types`` entry other than ``full_attention``/``sliding_attention``, a ``rope_type``
other than ``default``, ``hidden_act`` other than ``silu``, a ``head_dim`` that is not a positive integer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .base import HFFamily
from .llama import (_B, _M, LLAMA_KEY_MAP, _build_spec, _hf_fields, _llama_biases, _part_problems, _read_config,
                    _refuse, _rename_folder, _rope, _state_to_hf)
from .olmo2 import single_eps_problems, unbiased_default_rope_problems
from .qwen2 import _Qwen2Config, _window, window_fields
from ..hf import _HFSize, KeyRule
from ...spec import ModelSpec

if TYPE_CHECKING:
    from ...model import GPTModel

_MLP_BIAS = re.compile(r"mlp\.(gate|up|down)_proj\.bias$")
QWEN3_KEY_MAP: tuple[KeyRule, ...] = (
    *(rule for rule in LLAMA_KEY_MAP if not _MLP_BIAS.search(rule.hf)),
    *(KeyRule(f"{_B}self_attn.{norm}.weight", (f"{_M}att.{norm}.weight",), "copy") for norm in ("q_norm", "k_norm")),
)


class _Qwen3Config(_Qwen2Config):
    """The ``config.json`` fields modelkit reads (strict JSON types), with ``Qwen3Config``'s defaults."""

    head_dim: _HFSize = 128
    num_key_value_heads: _HFSize | None = 32


def spec_from_config(config: Mapping[str, Any], name: str = "qwen3", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face ``Qwen3ForCausalLM`` ``config.json`` (see the module doc).

    Raises :class:`CheckpointError` naming ``source`` and the field for a config that is not a Qwen3
    config object, has malformed fields, or asks for what the parts cannot compute (sliding layers
    without a window, a ``rope_type`` other than ``default``, ``hidden_act`` other than ``silu``).
    """
    cfg = cast(_Qwen3Config, _read_config(config, source, "qwen3", "Qwen3", _Qwen3Config))
    positional, rope_problems = _rope(cfg, ("default",))
    window, window_problems = _window(cfg)
    problems = rope_problems + window_problems
    if cfg.hidden_act != "silu":
        problems.insert(0, f"hidden_act {cfg.hidden_act!r} is not supported (llama.swiglu gates with 'silu')")
    return _build_spec(cfg, name, source, "Qwen3", positional, problems, qkv_bias=cfg.attention_bias,
                       out_bias=cfg.attention_bias, mlp_bias=False, head_dim=cfg.head_dim,
                       attention={"qk_norm": "head", "qk_norm_eps": cfg.rms_norm_eps, **window})


def to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    """The folder's tensors under modelkit names (:data:`QWEN3_KEY_MAP`), and the unmatched names.
    ``lm_head.weight`` is dropped when the spec ties the head to the embedding."""
    return _rename_folder(sources, spec, QWEN3_KEY_MAP)


def config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a ``Qwen3ForCausalLM`` equivalent to ``spec``.

    Raises :class:`CheckpointError` naming every part with no Qwen3 equivalent (other q/k norms,
    out_bias differing from qkv_bias, a biased feed-forward, RoPE scaling, a q/k norm eps other
    than the norms' eps, parts that are not the llama ones).
    """
    problems = _part_problems(spec, "Qwen3", _llama_biases, window=True, window_pattern=True, stated=("head_dim",),
                              qk_norm="head")
    problems += unbiased_default_rope_problems(spec, "Qwen3") + single_eps_problems(spec, "Qwen3")
    _refuse(spec, "Qwen3", problems)
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **_hf_fields(spec, dtype),
            "attention_bias": spec.qkv_bias, **window_fields(spec)}


def to_hf(model: GPTModel) -> dict[str, Tensor]:
    """The ``Qwen3ForCausalLM`` state dict of a model :func:`config_from_spec` accepts
    (``lm_head.weight`` only when the head is not tied)."""
    config_from_spec(model.spec)
    return _state_to_hf(model, QWEN3_KEY_MAP)


QWEN3 = HFFamily(model_type="qwen3", label="Qwen3", spec_from_config=spec_from_config, to_modelkit=to_modelkit,
                 config_from_spec=config_from_spec, to_hf=to_hf)
