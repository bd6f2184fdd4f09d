"""Llama (``model_type: "llama"``, ``LlamaForCausalLM``) as a spec of registered parts.

The spec is the llama plugin's parts: ``llama.rope`` positions (``rope_theta``; ``rope_type``
``"llama3"`` as the RoPE ``scaling`` parameters), ``llama.rmsnorm`` (``rms_norm_eps``),
``llama.gqa`` attention (``num_key_value_heads``; ``attention_bias`` as ``qkv_bias`` and
``out_bias``), ``llama.swiglu`` (``intermediate_size``, ``mlp_bias``), ``pre_norm`` blocks,
``tie_embeddings`` from ``tie_word_embeddings`` (Llama's default: false), ``drop_rate`` 0.

The key map is explicit (:data:`LLAMA_KEY_MAP`, per block ``model.layers.N``; every tensor is
copied as stored, ``nn.Linear`` on both sides)::

    model.embed_tokens.weight                        -> tok_emb.weight
    model.layers.N.input_layernorm.weight            -> trf_blocks.N.norm1.weight
    model.layers.N.self_attn.{q,k,v}_proj.weight/bias -> trf_blocks.N.att.W_{query,key,value}.weight/bias
    model.layers.N.self_attn.o_proj.weight/bias      -> trf_blocks.N.att.out_proj.weight/bias
    model.layers.N.post_attention_layernorm.weight   -> trf_blocks.N.norm2.weight
    model.layers.N.mlp.{gate,up,down}_proj.weight/bias -> trf_blocks.N.ff.{gate,up,down}_proj.weight/bias
    model.norm.weight                                -> final_norm.weight
    lm_head.weight                                   -> out_head.weight  (absent or dropped when tied)

Rotary ``inv_freq`` buffers of old checkpoints are ignored (modelkit computes them from the spec).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from .base import HFFamily, head_size_problems, rename, rename_back
from ..hf import _HFSize, KeyRule, _json_type, model_level_problems
from ..safetensors_file import pydantic_lines
from ...errors import CheckpointError, SpecError
from ...spec import ModelSpec, validate_spec

if TYPE_CHECKING:
    from ...model import GPTModel

_B = "model.layers.{i}."
_M = "trf_blocks.{i}."


def _rules() -> tuple[KeyRule, ...]:
    rules = [KeyRule("model.embed_tokens.weight", ("tok_emb.weight",), "copy"),
             KeyRule(_B + "input_layernorm.weight", (_M + "norm1.weight",), "copy"),
             KeyRule(_B + "post_attention_layernorm.weight", (_M + "norm2.weight",), "copy")]
    attention = {"q_proj": "W_query", "k_proj": "W_key", "v_proj": "W_value", "o_proj": "out_proj"}
    for hf, mk in attention.items():
        for p in ("weight", "bias"):
            rules.append(KeyRule(f"{_B}self_attn.{hf}.{p}", (f"{_M}att.{mk}.{p}",), "copy"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for p in ("weight", "bias"):
            rules.append(KeyRule(f"{_B}mlp.{proj}.{p}", (f"{_M}ff.{proj}.{p}",), "copy"))
    rules += [KeyRule("model.norm.weight", ("final_norm.weight",), "copy"),
              KeyRule("lm_head.weight", ("out_head.weight",), "copy")]
    return tuple(rules)


LLAMA_KEY_MAP: tuple[KeyRule, ...] = _rules()
_IGNORED = re.compile(r"^model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")

_Schema = TypeVar("_Schema", bound=BaseModel)
_Eps = Annotated[float, Field(gt=0, lt=1)]
_Factor = Annotated[float, Field(gt=0, le=1e6)]


class _LlamaConfig(BaseModel):
    """The ``config.json`` fields modelkit reads, with JSON's types (strict); others are ignored."""

    model_config = ConfigDict(strict=True, extra="allow")

    vocab_size: _HFSize
    hidden_size: _HFSize
    intermediate_size: _HFSize
    num_hidden_layers: _HFSize
    num_attention_heads: _HFSize
    num_key_value_heads: _HFSize | None = None
    head_dim: _HFSize | None = None
    max_position_embeddings: _HFSize = 2048
    hidden_act: str = "silu"
    rms_norm_eps: _Eps = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: Annotated[float, Field(gt=1)] | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None


class _Llama3Rope(BaseModel):
    """The parameters of ``rope_type: "llama3"`` (all required)."""

    model_config = ConfigDict(strict=True, extra="allow")

    factor: Annotated[float, Field(ge=1, le=1e6)]
    low_freq_factor: _Factor
    high_freq_factor: _Factor
    original_max_position_embeddings: _HFSize


def _rope(cfg: _LlamaConfig, rope_types: tuple[str, ...] = ("default", "llama3")) -> tuple[dict[str, Any], list[str]]:
    """The ``llama.rope`` reference of the config's RoPE fields, and the problems found.

    Reads transformers 5's ``rope_parameters`` or the older top-level ``rope_theta`` /
    ``rope_scaling``; a ``rope_type`` among ``rope_types`` (``default``, ``llama3``) is supported,
    anything else refused.
    """
    if cfg.rope_parameters is not None and cfg.rope_scaling is not None and cfg.rope_parameters != cfg.rope_scaling:
        return {}, ["rope_parameters and rope_scaling are both set and differ"]
    field = "rope_parameters" if cfg.rope_parameters is not None else "rope_scaling"
    params = dict(cfg.rope_parameters or cfg.rope_scaling or {})
    theta = params.get("rope_theta", cfg.rope_theta)
    if cfg.rope_theta is not None and theta != cfg.rope_theta:
        return {}, [f"rope_theta {cfg.rope_theta} differs from {field}.rope_theta {theta}"]
    if theta is None:
        theta = 10000.0
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        return {}, [f"{field}.rope_theta: expected a number, got {_json_type(theta)}"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    ref: dict[str, Any] = {"type": "llama.rope", "theta": float(theta)}
    if rope_type not in rope_types:
        supported = ", ".join(repr(t) for t in rope_types)
        return {}, [f"{field}.rope_type {rope_type!r} is not supported (supported: {supported})"]
    if rope_type == "default":
        return ref, []
    try:
        l3 = _Llama3Rope.model_validate(params)
    except ValidationError as exc:
        return {}, pydantic_lines(exc, field)[:20]
    ref.update(scaling="llama3", factor=l3.factor, low_freq_factor=l3.low_freq_factor,
               high_freq_factor=l3.high_freq_factor, original_context_length=l3.original_max_position_embeddings)
    return ref, []


def _problems(cfg: _LlamaConfig, *, free_head_dim: bool = False) -> list[str]:
    """The features of a well-typed Llama config that the llama parts cannot reproduce. With
    ``free_head_dim`` (a family whose attention honours ``head_dim``, stated in the spec) any
    ``head_dim`` is fine; otherwise it must be ``hidden_size / num_attention_heads``."""
    problems = []
    if cfg.hidden_act != "silu":
        problems.append(f"hidden_act {cfg.hidden_act!r} is not supported (llama.swiglu gates with 'silu')")
    if not free_head_dim:
        problems += head_size_problems(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim)
    return problems


def _read_config(config: Mapping[str, Any], source: str, model_type: str, label: str,
                 schema: type[_Schema]) -> _Schema:
    """``config`` validated with ``schema`` as a ``model_type`` config; raises :class:`CheckpointError`
    naming ``source`` and the field if it is not a JSON object of that ``model_type`` or a field is malformed."""
    head = f"cannot build a modelkit spec from the {label} config {source}"
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{head}: it must be a JSON object, got {_json_type(config)}")
    if config.get("model_type") != model_type:
        raise CheckpointError(f"{head}: model_type is {config.get('model_type')!r}, not {model_type!r}")
    try:
        return schema.model_validate(dict(config))
    except ValidationError as exc:
        raise CheckpointError(f"{head}:\n  " + "\n  ".join(pydantic_lines(exc, "config")[:20])) from None


def _build_spec(cfg: _LlamaConfig, name: str, source: str, label: str, positional: dict[str, Any],
                problems: list[str], *, qkv_bias: bool, out_bias: bool, mlp_bias: bool,
                attention: Mapping[str, Any] | None = None, block: str = "pre_norm",
                head_dim: int | None = None) -> ModelSpec:
    """The spec of llama parts for a validated config, or :class:`CheckpointError` listing ``problems``
    (naming ``source``) if there are any, or if the result is not a valid spec. ``attention`` holds
    further ``llama.gqa`` parameters (a sliding window, q/k norms); ``block`` is the block type;
    ``head_dim`` the spec's, stated only when it is not ``hidden_size / num_attention_heads``."""
    if problems:
        raise CheckpointError(f"cannot build a modelkit spec from the {label} config {source}: " + "; ".join(problems))
    data = {
        "name": name, "vocab_size": cfg.vocab_size, "context_length": cfg.max_position_embeddings,
        "emb_dim": cfg.hidden_size, "n_heads": cfg.num_attention_heads, "n_layers": cfg.num_hidden_layers,
        "drop_rate": 0.0, "qkv_bias": qkv_bias, "tie_embeddings": cfg.tie_word_embeddings,
        "positional": positional, "norm": {"type": "llama.rmsnorm", "eps": cfg.rms_norm_eps},
        "attention": {"type": "llama.gqa", "num_kv_heads": cfg.num_key_value_heads or cfg.num_attention_heads,
                      "out_bias": out_bias, **(attention or {})},
        "feedforward": {"type": "llama.swiglu", "hidden_dim": cfg.intermediate_size, "bias": mlp_bias},
        "block": block,
    }
    if head_dim is not None and head_dim * cfg.num_attention_heads != cfg.hidden_size:
        data["head_dim"] = head_dim
    try:
        return validate_spec(data, source)
    except SpecError as exc:
        raise CheckpointError(f"the {label} config {source} does not make a valid spec:\n{exc}") from None


def spec_from_config(config: Mapping[str, Any], name: str = "llama", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face ``LlamaForCausalLM`` ``config.json`` (see the module doc).

    Raises :class:`CheckpointError` naming ``source`` and the field for a config that is not a Llama
    config object, has malformed fields, or asks for what the parts cannot compute: a
    ``hidden_act`` other than ``silu``, a ``rope_type`` other than ``default``/``llama3``. A ``head_dim``
    other than ``hidden_size / num_attention_heads`` becomes the spec's ``head_dim``.
    """
    cfg = _read_config(config, source, "llama", "Llama", _LlamaConfig)
    positional, rope_problems = _rope(cfg)
    return _build_spec(cfg, name, source, "Llama", positional, _problems(cfg, free_head_dim=True) + rope_problems,
                       qkv_bias=cfg.attention_bias, out_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
                       head_dim=cfg.head_dim)


def to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    """The folder's tensors under modelkit names (:data:`LLAMA_KEY_MAP`), and the unmatched names.
    ``lm_head.weight`` is dropped when the spec ties the head to the embedding."""
    return _rename_folder(sources, spec, LLAMA_KEY_MAP)


def _rename_folder(sources: Mapping[str, Any], spec: ModelSpec,
                   key_map: tuple[KeyRule, ...]) -> tuple[dict[str, Any], list[str]]:
    """``sources`` renamed by ``key_map`` (rotary buffers ignored, ``lm_head.weight`` dropped when
    ``spec`` ties the head), and the unmatched names."""
    return rename(sources, key_map, ignored=_IGNORED, drop=("lm_head.weight",) if spec.tie_embeddings else ())


def _part_problems(spec: ModelSpec, label: str, gqa_check: Callable[[ModelSpec], str | None] | None = None, *,
                   window: bool = False, window_pattern: bool = False, stated: tuple[str, ...] = (),
                   partial_rotary: bool = False, qk_norm: str = "none", block: str = "pre_norm") -> list[str]:
    """The parts of ``spec`` that are not the llama parts a ``label`` model is made of (``llama.gqa``
    with ``qk_norm``, ``block`` blocks); with ``gqa_check``, also its problem (if any) with a
    ``llama.gqa`` attention, listed after it. A ``llama.gqa`` option the family does not have is a
    problem too: soft-capping, a query scale, a sliding window (unless ``window``), on some layers only
    (unless ``window_pattern``); so is a ``llama.rope`` rotating part of each head (``rotary_fraction``
    below 1) unless ``partial_rotary`` (Llama's, Qwen2's and Mistral's configs rotate whole heads); and
    so are the model-level fields other than ``stated`` that differ from the book's model."""
    pos, norm, att, ff = spec.positional, spec.norm, spec.attention, spec.feedforward
    problems = []
    if pos.type != "llama.rope":
        problems.append(f"positional '{pos.type}' ({label} uses llama.rope)")
    elif not partial_rotary and pos.params.get("rotary_fraction", 1.0) != 1.0:
        problems.append(f"positional rotary_fraction {pos.params['rotary_fraction']} ({label} rotates whole heads)")
    if norm.type != "llama.rmsnorm":
        problems.append(f"norm '{norm.type}' ({label} uses llama.rmsnorm)")
    if att.type != "llama.gqa":
        problems.append(f"attention '{att.type}' ({label} uses llama.gqa)")
    else:
        if att.params.get("qk_norm", "none") != qk_norm:
            problems.append(f"attention qk_norm '{att.params.get('qk_norm', 'none')}' ({label}'s is '{qk_norm}')")
        problems += _gqa_option_problems(spec, label, window, window_pattern)
        if gqa_check is not None and (problem := gqa_check(spec)) is not None:
            problems.append(problem)
    if ff.type != "llama.swiglu":
        problems.append(f"feedforward '{ff.type}' ({label} uses llama.swiglu)")
    if spec.block.type != block:
        problems.append(f"block '{spec.block.type}' ({label} blocks are {block})")
    return problems + model_level_problems(spec, label, stated)


def _gqa_option_problems(spec: ModelSpec, label: str, window: bool, window_pattern: bool) -> list[str]:
    """The ``llama.gqa`` options of ``spec`` a ``label`` model does not have (``window``: it can slide a
    window; ``window_pattern``: on some layers only)."""
    params = spec.attention.params
    missing = (("softcap", "attention soft-capping"), ("query_scale", "query scale other than 1/√head_dim"))
    problems = [f"attention {name} {params[name]} ({label} has no {what})"
                for name, what in missing if params.get(name) is not None]
    window_size = params.get("sliding_window")
    if window_size is not None and not window:
        problems.append(f"attention sliding_window {window_size} ({label} attends to every position)")
    elif window_size is not None and not window_pattern and not all(params.get("window_pattern", [True])):
        problems.append(f"attention window_pattern {params['window_pattern']} ({label} slides the window on every layer)")
    return problems


def _refuse(spec: ModelSpec, label: str, problems: list[str]) -> None:
    """Raise :class:`CheckpointError` listing ``problems`` if there are any."""
    if problems:
        raise CheckpointError(f"the model '{spec.name}' has no {label} equivalent; these parts differ:\n  "
                              + "\n  ".join(problems))


def _hf_fields(spec: ModelSpec, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` fields Llama-style families share, for a spec :func:`_part_problems` accepts."""
    pos, norm, att, ff = spec.positional, spec.norm, spec.attention, spec.feedforward
    hidden = ff.params.get("hidden_dim") or _default_hidden(spec.emb_dim, ff.params.get("multiple_of", 256))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": pos.params.get("theta", 10000.0)}
    if pos.params.get("scaling") == "llama3":
        rope.update(rope_type="llama3", factor=pos.params["factor"], low_freq_factor=pos.params["low_freq_factor"],
                    high_freq_factor=pos.params["high_freq_factor"],
                    original_max_position_embeddings=pos.params["original_context_length"])
    return {
        "vocab_size": spec.vocab_size, "max_position_embeddings": spec.context_length,
        "hidden_size": spec.emb_dim, "intermediate_size": hidden, "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads, "num_key_value_heads": att.params.get("num_kv_heads") or spec.n_heads,
        "head_dim": spec.dims.head_dim, "hidden_act": "silu",
        "rms_norm_eps": norm.params.get("eps", 1e-5), "tie_word_embeddings": spec.tie_embeddings,
        "attention_dropout": spec.drop_rate, "rope_parameters": rope,
        "initializer_range": 0.02, "use_cache": True, "dtype": str(dtype).removeprefix("torch."),
    }


def _llama_biases(spec: ModelSpec) -> str | None:
    """Why ``spec``'s attention biases have no Llama ``attention_bias`` (which sets all four), or None."""
    if bool(spec.attention.params.get("out_bias")) != spec.qkv_bias:
        return "attention out_bias differs from qkv_bias (Llama's attention_bias sets both)"
    return None


def config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a ``LlamaForCausalLM`` equivalent to ``spec``.

    Raises :class:`CheckpointError` naming every part with no Llama equivalent.
    """
    _refuse(spec, "Llama", _part_problems(spec, "Llama", _llama_biases, stated=("head_dim",)))
    fields = _hf_fields(spec, dtype)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **fields,
            "attention_bias": spec.qkv_bias, "mlp_bias": bool(spec.feedforward.params.get("bias", False))}


def _default_hidden(emb_dim: int, multiple_of: int) -> int:
    """llama.swiglu's default hidden size: ⌊8·emb_dim/3⌋ rounded up to a multiple of ``multiple_of``."""
    return multiple_of * math.ceil(int(8 * emb_dim / 3) / multiple_of)


def _state_to_hf(model: GPTModel, key_map: tuple[KeyRule, ...]) -> dict[str, Tensor]:
    """``model``'s state dict under ``key_map``'s HF names, on CPU (the tied head left out)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.spec.tie_embeddings:
        state.pop("out_head.weight", None)
    return {k: v.cpu().contiguous() for k, v in rename_back(state, key_map).items()}


def to_hf(model: GPTModel) -> dict[str, Tensor]:
    """The ``LlamaForCausalLM`` state dict of a model :func:`config_from_spec` accepts
    (``lm_head.weight`` only when the head is not tied)."""
    config_from_spec(model.spec)
    return _state_to_hf(model, LLAMA_KEY_MAP)


LLAMA = HFFamily(model_type="llama", label="Llama", spec_from_config=spec_from_config, to_modelkit=to_modelkit,
                 config_from_spec=config_from_spec, to_hf=to_hf)
