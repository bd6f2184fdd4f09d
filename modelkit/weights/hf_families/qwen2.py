"""Qwen2 (``model_type: "qwen2"``, ``Qwen2ForCausalLM``) as a spec of registered parts.

Qwen2 is Llama's architecture with biases on the query/key/value projections only: the spec is
the llama plugin's parts, as for :mod:`.llama` — ``llama.rope`` (``rope_theta``, default RoPE only),
``llama.rmsnorm`` (``rms_norm_eps``), ``llama.gqa`` (``num_key_value_heads``, ``out_bias: false``)
with the spec's ``qkv_bias: true``, ``llama.swiglu`` (``intermediate_size``, no bias), ``pre_norm``
blocks, ``tie_embeddings`` from ``tie_word_embeddings`` (Qwen2.5-0.5B ties), ``drop_rate`` 0.

The key map (:data:`QWEN2_KEY_MAP`) is Llama's without the tensors Qwen2 does not have
(``o_proj.bias``, the MLP biases), so such a tensor in a folder is refused as unknown::

    model.embed_tokens.weight                        -> tok_emb.weight
    model.layers.N.input_layernorm.weight            -> trf_blocks.N.norm1.weight
    model.layers.N.self_attn.{q,k,v}_proj.weight/bias -> trf_blocks.N.att.W_{query,key,value}.weight/bias
    model.layers.N.self_attn.o_proj.weight           -> trf_blocks.N.att.out_proj.weight
    model.layers.N.post_attention_layernorm.weight   -> trf_blocks.N.norm2.weight
    model.layers.N.mlp.{gate,up,down}_proj.weight    -> trf_blocks.N.ff.{gate,up,down}_proj.weight
    model.norm.weight                                -> final_norm.weight
    lm_head.weight                                   -> out_head.weight  (absent or dropped when tied)

Refused with a :class:`CheckpointError` naming the field: ``use_sliding_window: true`` or a
``layer_types`` entry other than ``full_attention`` (sliding-window attention is not implemented),
a ``rope_type`` other than ``default``, ``hidden_act`` other than ``silu``, a ``head_dim`` other
than ``hidden_size / num_attention_heads``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .base import HFFamily
from .llama import (LLAMA_KEY_MAP, _build_spec, _hf_fields, _LlamaConfig, _part_problems, _problems,
                    _read_config, _refuse, _rename_folder, _rope, _state_to_hf)
from ..hf import _HFSize, KeyRule
from ...spec import ModelSpec

if TYPE_CHECKING:
    from ...model import GPTModel

_NOT_IN_QWEN2 = re.compile(r"(self_attn\.o_proj|mlp\.(gate|up|down)_proj)\.bias$")
QWEN2_KEY_MAP: tuple[KeyRule, ...] = tuple(rule for rule in LLAMA_KEY_MAP if not _NOT_IN_QWEN2.search(rule.hf))


class _Qwen2Config(_LlamaConfig):
    """The ``config.json`` fields modelkit reads (strict JSON types), with ``Qwen2Config``'s defaults."""

    max_position_embeddings: _HFSize = 32768
    use_sliding_window: bool = False
    layer_types: list[str] | None = None


def _sliding_window_problems(cfg: _Qwen2Config) -> list[str]:
    """The sliding-window fields of ``cfg`` that ask for windowed attention (not implemented)."""
    problems = []
    if cfg.use_sliding_window:
        problems.append("use_sliding_window true is not supported (sliding-window attention is not implemented)")
    windowed = sorted({t for t in cfg.layer_types or () if t != "full_attention"})
    if windowed:
        problems.append(f"layer_types {windowed} are not supported (only 'full_attention' is implemented)")
    return problems


def spec_from_config(config: Mapping[str, Any], name: str = "qwen2", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face ``Qwen2ForCausalLM`` ``config.json`` (see the module doc).

    Raises :class:`CheckpointError` naming ``source`` and the field for a config that is not a Qwen2
    config object, has malformed fields, or asks for what the parts cannot compute (sliding window,
    a ``rope_type`` other than ``default``, ``hidden_act`` other than ``silu``, another ``head_dim``).
    """
    cfg = cast(_Qwen2Config, _read_config(config, source, "qwen2", "Qwen2", _Qwen2Config))
    positional, rope_problems = _rope(cfg, ("default",))
    problems = _problems(cfg) + rope_problems + _sliding_window_problems(cfg)
    return _build_spec(cfg, name, source, "Qwen2", positional, problems, qkv_bias=True, out_bias=False,
                       mlp_bias=False)


def to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    """The folder's tensors under modelkit names (:data:`QWEN2_KEY_MAP`), and the unmatched names.
    ``lm_head.weight`` is dropped when the spec ties the head to the embedding."""
    return _rename_folder(sources, spec, QWEN2_KEY_MAP)


def _qwen2_biases(spec: ModelSpec) -> str | None:
    """Why ``spec``'s attention biases are not Qwen2's (q/k/v biased, o_proj not), or None."""
    if not spec.qkv_bias or spec.attention.params.get("out_bias"):
        return "attention biases differ (Qwen2 has qkv_bias true and out_bias false)"
    return None


def config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a ``Qwen2ForCausalLM`` equivalent to ``spec``.

    Raises :class:`CheckpointError` naming every part with no Qwen2 equivalent (other attention
    biases, a biased feed-forward, RoPE scaling, parts that are not the llama ones).
    """
    problems = _part_problems(spec, "Qwen2", _qwen2_biases)
    if spec.feedforward.type == "llama.swiglu" and spec.feedforward.params.get("bias"):
        problems.append("feedforward bias true (Qwen2's MLP has no biases)")
    if spec.positional.type == "llama.rope" and spec.positional.params.get("scaling", "none") != "none":
        problems.append(f"positional scaling '{spec.positional.params['scaling']}' (Qwen2 uses default RoPE)")
    _refuse(spec, "Qwen2", problems)
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **_hf_fields(spec, dtype),
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": spec.n_layers,
            "layer_types": ["full_attention"] * spec.n_layers}


def to_hf(model: GPTModel) -> dict[str, Tensor]:
    """The ``Qwen2ForCausalLM`` state dict of a model :func:`config_from_spec` accepts
    (``lm_head.weight`` only when the head is not tied)."""
    config_from_spec(model.spec)
    return _state_to_hf(model, QWEN2_KEY_MAP)


QWEN2 = HFFamily(model_type="qwen2", label="Qwen2", spec_from_config=spec_from_config, to_modelkit=to_modelkit,
                 config_from_spec=config_from_spec, to_hf=to_hf)
