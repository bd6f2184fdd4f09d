"""Gemma (``model_type: "gemma"``, ``GemmaForCausalLM``) as a spec of registered parts.

The spec is the gemma plugin's parts with the llama plugin's attention and positions:
``llama.rope`` (``rope_theta``, default RoPE only), ``gemma.rmsnorm`` (``x̂·(1 + w)`` in float32,
``rms_norm_eps``), ``llama.gqa`` (``num_key_value_heads``: one for Gemma-2B, multi-query;
``attention_bias`` as ``qkv_bias`` and ``out_bias``), ``gemma.geglu`` (``intermediate_size``; the
activation of ``hidden_act``: ``gelu_pytorch_tanh`` and, as transformers reads it for Gemma, the
legacy ``gelu`` are the tanh GELU ``gelu``), ``pre_norm`` blocks; at model level ``head_dim`` (256,
independent of ``hidden_size / num_attention_heads``), ``embedding_scale`` √hidden_size (the
embeddings are multiplied by it in their dtype), ``tie_embeddings`` from ``tie_word_embeddings``
(Gemma's default: true), ``drop_rate`` 0. Missing fields take ``GemmaConfig``'s defaults
(``num_key_value_heads`` 16, ``head_dim`` 256, ``max_position_embeddings`` 8192, ``rms_norm_eps`` 1e-6).

The key map is explicit (:data:`GEMMA_KEY_MAP`, per block ``model.layers.N``; every tensor is
copied as stored; the norm weights are the offsets ``w`` of ``1 + w`` on both sides)::

    model.embed_tokens.weight                          -> tok_emb.weight
    model.layers.N.input_layernorm.weight              -> trf_blocks.N.norm1.weight
    model.layers.N.self_attn.{q,k,v}_proj.weight/bias  -> trf_blocks.N.att.W_{query,key,value}.weight/bias
    model.layers.N.self_attn.o_proj.weight/bias        -> trf_blocks.N.att.out_proj.weight/bias
    model.layers.N.post_attention_layernorm.weight     -> trf_blocks.N.norm2.weight
    model.layers.N.mlp.{gate,up,down}_proj.weight      -> trf_blocks.N.ff.{gate,up,down}_proj.weight
    model.norm.weight                                  -> final_norm.weight
    lm_head.weight                                     -> out_head.weight  (absent or dropped when tied)

Refused with a :class:`CheckpointError` naming the field: a ``rope_type`` other than ``default``, a
``hidden_act`` other than the GELUs, ``silu`` and ``relu``, a ``hidden_activation`` that differs from
``hidden_act`` (transformers 5 reads only ``hidden_act``; older versions read ``hidden_activation``),
``use_bidirectional_attention: true``. Export refuses specs with no Gemma equivalent (other parts,
RoPE scaling, an embedding scale other than √emb_dim, soft-capping, a sliding window, a head bias...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from .base import HFFamily
from .llama import LLAMA_KEY_MAP, _read_config, _refuse, _rename_folder, _rope, _state_to_hf
from ..hf import _HFSize, KeyRule, model_level_problems
from ...errors import CheckpointError, SpecError
from ...spec import ModelSpec, validate_spec

if TYPE_CHECKING:
    from ...model import GPTModel

_MLP_BIAS = re.compile(r"\.mlp\.\w+\.bias$")
GEMMA_KEY_MAP: tuple[KeyRule, ...] = tuple(rule for rule in LLAMA_KEY_MAP if not _MLP_BIAS.search(rule.hf))

#: Hugging Face activation names -> modelkit activations, as ``ACT2FN`` computes them
#: (Gemma's config turns a legacy ``gelu`` into ``gelu_pytorch_tanh``: see :data:`GEMMA_ACTIVATIONS`).
HF_ACTIVATIONS: dict[str, str] = {"gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "silu": "silu", "relu": "relu"}
GEMMA_ACTIVATIONS: dict[str, str] = {**HF_ACTIVATIONS, "gelu": "gelu"}

_Eps = Annotated[float, Field(gt=0, lt=1)]


class _GemmaConfig(BaseModel):
    """The ``config.json`` fields modelkit reads, with JSON's types (strict) and ``GemmaConfig``'s
    defaults; others are ignored."""

    model_config = ConfigDict(strict=True, extra="allow")

    vocab_size: _HFSize
    hidden_size: _HFSize
    intermediate_size: _HFSize
    num_hidden_layers: _HFSize
    num_attention_heads: _HFSize
    num_key_value_heads: _HFSize = 16
    head_dim: _HFSize = 256
    max_position_embeddings: _HFSize = 8192
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_activation: str | None = None
    rms_norm_eps: _Eps = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    use_bidirectional_attention: bool | None = None
    rope_theta: Annotated[float, Field(gt=1)] | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None


def activation_of(name: str, field: str, table: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """The modelkit activation of the Hugging Face activation ``name`` (read from ``field``) by ``table``,
    or None and the problem naming the field."""
    if name not in table:
        return None, [f"{field} {name!r} is not supported (supported: {', '.join(repr(n) for n in table)})"]
    return table[name], []


def _gemma_activation(cfg: _GemmaConfig) -> tuple[str | None, list[str]]:
    """Gemma's activation: ``hidden_act`` (transformers 5), refused when an old ``hidden_activation``
    (which transformers 4.38-4.4x read instead) says otherwise."""
    act, problems = activation_of(cfg.hidden_act, "hidden_act", GEMMA_ACTIVATIONS)
    if cfg.hidden_activation is not None:
        other, more = activation_of(cfg.hidden_activation, "hidden_activation", GEMMA_ACTIVATIONS)
        problems += more
        if act is not None and other is not None and other != act:
            problems.append(f"hidden_activation {cfg.hidden_activation!r} differs from hidden_act {cfg.hidden_act!r} "
                            "(transformers versions disagree on which one Gemma uses)")
    return act, problems


def attention_problems(cfg: _GemmaConfig) -> list[str]:
    """The attention fields of a Gemma-style config the parts cannot compute."""
    problems = []
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        problems.append(f"num_attention_heads {cfg.num_attention_heads} is not divisible by num_key_value_heads "
                        f"{cfg.num_key_value_heads}")
    if cfg.use_bidirectional_attention:
        problems.append("use_bidirectional_attention true is not supported (modelkit's attention is causal)")
    return problems


def embedding_scale(emb_dim: int) -> float:
    """Gemma's embedding scale, √emb_dim, computed as transformers does (``hidden_size ** 0.5``)."""
    return emb_dim ** 0.5


def gemma_spec(cfg: _GemmaConfig, name: str, source: str, label: str, problems: list[str], *,
               activation: str | None, attention: Mapping[str, Any], block: str,
               final_logit_softcap: float | None = None) -> ModelSpec:
    """The spec of a validated Gemma-style config (``attention``: further ``llama.gqa`` parameters;
    ``block``: the block type), or :class:`CheckpointError` listing ``problems`` (naming ``source``)
    if there are any, or if the result is not a valid spec."""
    positional, rope_problems = _rope(cast(Any, cfg), ("default",))
    problems = problems + rope_problems + attention_problems(cfg)
    if problems:
        raise CheckpointError(f"cannot build a modelkit spec from the {label} config {source}: " + "; ".join(problems))
    data = {
        "name": name, "vocab_size": cfg.vocab_size, "context_length": cfg.max_position_embeddings,
        "emb_dim": cfg.hidden_size, "n_heads": cfg.num_attention_heads, "n_layers": cfg.num_hidden_layers,
        "drop_rate": 0.0, "qkv_bias": cfg.attention_bias, "tie_embeddings": cfg.tie_word_embeddings,
        "head_dim": cfg.head_dim, "embedding_scale": embedding_scale(cfg.hidden_size),
        "final_logit_softcap": final_logit_softcap,
        "positional": positional, "norm": {"type": "gemma.rmsnorm", "eps": cfg.rms_norm_eps},
        "attention": {"type": "llama.gqa", "num_kv_heads": cfg.num_key_value_heads, "out_bias": cfg.attention_bias,
                      **attention},
        "feedforward": {"type": "gemma.geglu", "hidden_dim": cfg.intermediate_size, "activation": activation,
                        "bias": False},
        "block": block,
    }
    try:
        return validate_spec(data, source)
    except SpecError as exc:
        raise CheckpointError(f"the {label} config {source} does not make a valid spec:\n{exc}") from None


def spec_from_config(config: Mapping[str, Any], name: str = "gemma", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face ``GemmaForCausalLM`` ``config.json`` (see the module doc).

    Raises :class:`CheckpointError` naming ``source`` and the field for a config that is not a Gemma
    config object, has malformed fields, or asks for what the parts cannot compute.
    """
    cfg = cast(_GemmaConfig, _read_config(config, source, "gemma", "Gemma", _GemmaConfig))
    activation, problems = _gemma_activation(cfg)
    return gemma_spec(cfg, name, source, "Gemma", problems, activation=activation, attention={}, block="pre_norm")


def to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    """The folder's tensors under modelkit names (:data:`GEMMA_KEY_MAP`), and the unmatched names.
    ``lm_head.weight`` is dropped when the spec ties the head to the embedding."""
    return _rename_folder(sources, spec, GEMMA_KEY_MAP)


def part_problems(spec: ModelSpec, label: str, block: str, *, gemma2: bool, stated: tuple[str, ...]) -> list[str]:
    """The parts of ``spec`` that are not those a ``label`` model is made of (``block`` blocks; the
    attention options soft-capping, query scale and a sliding window only if ``gemma2``), and its
    model-level fields other than ``stated`` that differ from the book's model."""
    pos, norm, att, ff = spec.positional, spec.norm, spec.attention, spec.feedforward
    problems = []
    if pos.type != "llama.rope":
        problems.append(f"positional '{pos.type}' ({label} uses llama.rope)")
    elif pos.params.get("scaling", "none") != "none" or pos.params.get("rotary_fraction", 1.0) != 1.0:
        problems.append(f"positional {pos.model_dump()} ({label} uses default RoPE on whole heads)")
    if norm.type != "gemma.rmsnorm":
        problems.append(f"norm '{norm.type}' ({label} uses gemma.rmsnorm)")
    if att.type != "llama.gqa":
        problems.append(f"attention '{att.type}' ({label} uses llama.gqa)")
    else:
        if not gemma2:
            options = (("softcap", "attention soft-capping"), ("query_scale", "query scale other than 1/√head_dim"),
                       ("sliding_window", "sliding window"))
            problems += [f"attention {name} {att.params[name]} ({label} has no {what})"
                         for name, what in options if att.params.get(name) is not None]
        if bool(att.params.get("out_bias")) != spec.qkv_bias:
            problems.append(f"attention out_bias differs from qkv_bias ({label}'s attention_bias sets both)")
    if ff.type != "gemma.geglu":
        problems.append(f"feedforward '{ff.type}' ({label} uses gemma.geglu)")
    elif ff.params.get("bias"):
        problems.append(f"feedforward bias true ({label}'s MLP has no biases)")
    if spec.block.type != block:
        problems.append(f"block '{spec.block.type}' ({label} blocks are {block})")
    if spec.embedding_scale != embedding_scale(spec.emb_dim):
        problems.append(f"embedding_scale {spec.embedding_scale} ({label} scales by √emb_dim = "
                        f"{embedding_scale(spec.emb_dim)})")
    return problems + model_level_problems(spec, label, ("head_dim", "embedding_scale", *stated))


def hf_fields(spec: ModelSpec, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` fields Gemma and Gemma 2 share, for a spec :func:`part_problems` accepts."""
    ff = spec.feedforward
    hidden = ff.params.get("hidden_dim") or ff.params["hidden_mult"] * spec.emb_dim
    return {
        "vocab_size": spec.vocab_size, "max_position_embeddings": spec.context_length,
        "hidden_size": spec.emb_dim, "intermediate_size": hidden,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.attention.params.get("num_kv_heads") or spec.n_heads,
        "head_dim": spec.dims.head_dim, "rms_norm_eps": spec.norm.params.get("eps", 1e-6),
        "tie_word_embeddings": spec.tie_embeddings, "attention_bias": spec.qkv_bias,
        "attention_dropout": spec.drop_rate,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.positional.params.get("theta", 10000.0)},
        "initializer_range": 0.02, "use_cache": True, "dtype": str(dtype).removeprefix("torch."),
    }


def hf_activation(spec: ModelSpec, field: str, table: Mapping[str, str], label: str) -> tuple[str | None, list[str]]:
    """The Hugging Face name (for ``field``) of ``spec``'s feed-forward activation by ``table``, or
    None and the problem."""
    if spec.feedforward.type != "gemma.geglu":
        return None, []
    act = spec.feedforward.params["activation"].type
    names = [hf for hf, mk in table.items() if mk == act]
    if not names:
        return None, [f"feedforward activation '{act}' (no {label} {field} computes it)"]
    return names[0], []


def config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a ``GemmaForCausalLM`` equivalent to ``spec``.

    Raises :class:`CheckpointError` naming every part with no Gemma equivalent.
    """
    problems = part_problems(spec, "Gemma", "pre_norm", gemma2=False, stated=())
    act, act_problems = hf_activation(spec, "hidden_act", GEMMA_ACTIVATIONS, "Gemma")
    _refuse(spec, "Gemma", problems + act_problems)
    return {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", **hf_fields(spec, dtype), "hidden_act": act}


def to_hf(model: GPTModel) -> dict[str, Tensor]:
    """The ``GemmaForCausalLM`` state dict of a model :func:`config_from_spec` accepts
    (``lm_head.weight`` only when the head is not tied)."""
    config_from_spec(model.spec)
    return _state_to_hf(model, GEMMA_KEY_MAP)


GEMMA = HFFamily(model_type="gemma", label="Gemma", spec_from_config=spec_from_config, to_modelkit=to_modelkit,
                 config_from_spec=config_from_spec, to_hf=to_hf)
