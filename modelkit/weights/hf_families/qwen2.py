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

Sliding windows are read as ``Qwen2Config`` derives them: with ``use_sliding_window: true``, the
layers ``layer_types`` names ``sliding_attention`` (by default layers ``max_window_layers`` and up)
attend over the last ``sliding_window`` positions: ``llama.gqa``'s ``sliding_window`` with a
``window_pattern`` (the shortest that repeats to the layers' list). Export writes ``layer_types``.

Refused with a :class:`CheckpointError` naming the field: ``sliding_attention`` layers without
``use_sliding_window``, a ``layer_types`` entry other than ``full_attention``/``sliding_attention``
or a list of another length than the layers, a ``rope_type`` other than ``default``, ``hidden_act``
other than ``silu``, a ``head_dim`` other than ``hidden_size / num_attention_heads``.
"""

from __future__ import annotations

import re
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

_NOT_IN_QWEN2 = re.compile(r"(self_attn\.o_proj|mlp\.(gate|up|down)_proj)\.bias$")
QWEN2_KEY_MAP: tuple[KeyRule, ...] = tuple(rule for rule in LLAMA_KEY_MAP if not _NOT_IN_QWEN2.search(rule.hf))


class _Qwen2Config(_LlamaConfig):
    """The ``config.json`` fields modelkit reads (strict JSON types), with ``Qwen2Config``'s defaults."""

    max_position_embeddings: _HFSize = 32768
    use_sliding_window: bool = False
    sliding_window: Annotated[int, Field(ge=1)] | None = 4096
    max_window_layers: Annotated[int, Field(ge=0)] = 28
    layer_types: list[str] | None = None


_LAYER_TYPES = ("full_attention", "sliding_attention")


def _window(cfg: _Qwen2Config) -> tuple[dict[str, Any], list[str]]:
    """The ``llama.gqa`` window parameters of ``cfg``'s sliding-window fields (as ``Qwen2Config``
    derives each layer's type), and the problems found."""
    window = cfg.sliding_window if cfg.use_sliding_window else None
    types = cfg.layer_types
    if types is None:
        types = ["sliding_attention" if window is not None and i >= cfg.max_window_layers else "full_attention"
                 for i in range(cfg.num_hidden_layers)]
    unknown = sorted({t for t in types if t not in _LAYER_TYPES})
    if unknown:
        return {}, [f"layer_types {unknown} are not supported (only {', '.join(map(repr, _LAYER_TYPES))})"]
    if len(types) != cfg.num_hidden_layers:
        return {}, [f"layer_types has {len(types)} entries for num_hidden_layers {cfg.num_hidden_layers}"]
    pattern = [t == "sliding_attention" for t in types]
    if not any(pattern):
        return {}, []
    if window is None:
        field = "use_sliding_window false" if cfg.use_sliding_window is False else "sliding_window null"
        return {}, [f"layer_types has 'sliding_attention' layers but {field} gives them no window"]
    return {"sliding_window": window, "window_pattern": _shortest_period(pattern)}, []


def _shortest_period(pattern: list[bool]) -> list[bool]:
    """The shortest ``p`` with ``p[i % len(p)] == pattern[i]`` for every layer ``i``."""
    return next(pattern[:n] for n in range(1, len(pattern) + 1)
                if all(pattern[i] == pattern[i % n] for i in range(len(pattern))))


def spec_from_config(config: Mapping[str, Any], name: str = "qwen2", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face ``Qwen2ForCausalLM`` ``config.json`` (see the module doc).

    Raises :class:`CheckpointError` naming ``source`` and the field for a config that is not a Qwen2
    config object, has malformed fields, or asks for what the parts cannot compute (sliding layers
    without a window, a ``rope_type`` other than ``default``, ``hidden_act`` other than ``silu``); a ``head_dim`` of its own is the spec's.
    """
    cfg = cast(_Qwen2Config, _read_config(config, source, "qwen2", "Qwen2", _Qwen2Config))
    positional, rope_problems = _rope(cfg, ("default",))
    window, window_problems = _window(cfg)
    problems = _problems(cfg, free_head_dim=True) + rope_problems + window_problems
    return _build_spec(cfg, name, source, "Qwen2", positional, problems, qkv_bias=True, out_bias=False,
                       mlp_bias=False, attention=window, head_dim=cfg.head_dim)


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
    problems = _part_problems(spec, "Qwen2", _qwen2_biases, window=True, window_pattern=True, stated=("head_dim",))
    if spec.feedforward.type == "llama.swiglu" and spec.feedforward.params.get("bias"):
        problems.append("feedforward bias true (Qwen2's MLP has no biases)")
    if spec.positional.type == "llama.rope" and spec.positional.params.get("scaling", "none") != "none":
        problems.append(f"positional scaling '{spec.positional.params['scaling']}' (Qwen2 uses default RoPE)")
    _refuse(spec, "Qwen2", problems)
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **_hf_fields(spec, dtype),
            **window_fields(spec)}


def window_fields(spec: ModelSpec) -> dict[str, Any]:
    """The sliding-window fields of a Qwen2-style ``config.json`` (``use_sliding_window``,
    ``sliding_window``, ``max_window_layers``, ``layer_types``) stating ``spec``'s ``llama.gqa`` window."""
    window = spec.attention.params.get("sliding_window")
    pattern = spec.attention.params.get("window_pattern", [True])
    sliding = [window is not None and pattern[i % len(pattern)] for i in range(spec.n_layers)]
    return {"use_sliding_window": any(sliding), "sliding_window": window if any(sliding) else None,
            "max_window_layers": sliding.index(True) if any(sliding) else spec.n_layers,
            "layer_types": [_LAYER_TYPES[s] for s in sliding]}


def to_hf(model: GPTModel) -> dict[str, Tensor]:
    """The ``Qwen2ForCausalLM`` state dict of a model :func:`config_from_spec` accepts
    (``lm_head.weight`` only when the head is not tied)."""
    config_from_spec(model.spec)
    return _state_to_hf(model, QWEN2_KEY_MAP)


QWEN2 = HFFamily(model_type="qwen2", label="Qwen2", spec_from_config=spec_from_config, to_modelkit=to_modelkit,
                 config_from_spec=config_from_spec, to_hf=to_hf)
