"""BLOOM (``model_type: "bloom"``, ``BloomForCausalLM``, e.g. BLOOM-560M) as a spec of registered parts.

BLOOM is the book's GPT with ALiBi instead of position embeddings and a LayerNorm on the embeddings:
``llama.alibi`` positions (the paper's slopes: :func:`modelkit_llama.positional.alibi_slopes`),
``embedding_norm`` a ``layernorm`` (``word_embeddings_layernorm``), ``mha`` with biases on q/k/v and
out, ``mlp`` with the tanh GELU (``gelu``) and 4·hidden units (BLOOM's MLP has no size field),
``layernorm`` with a shift (``layer_norm_epsilon``, every norm), ``pre_norm`` blocks, a final
LayerNorm, ``tie_embeddings`` from ``tie_word_embeddings`` (BLOOM's default: true), ``drop_rate`` 0.

Context length: BLOOM has no ``max_position_embeddings`` (ALiBi has no position table and
extrapolates), so ``context_length`` is the config's ``seq_length`` when present (export writes it,
so a round trip keeps it), else 2048, the sequence length every BLOOM model was trained on. It
sizes the KV cache and the longest input; longer contexts are a spec override away.

Fields read, with ``BloomConfig``'s defaults: ``vocab_size``, ``hidden_size`` (or the older
``n_embed``), ``n_layer`` (or ``num_hidden_layers``), ``n_head`` (or ``num_attention_heads``),
``layer_norm_epsilon``, ``tie_word_embeddings``, ``seq_length``; a name and its alias that disagree
are refused. ``hidden_dropout`` / ``attention_dropout`` are training-only (checked to be
probabilities). Megatron-era fields transformers ignores (``n_inner``, ``offset_alibi``,
``skip_bias_add``, ``attention_softmax_in_fp32``...) are ignored too.

The key map is explicit (:data:`BLOOM_KEY_MAP`, per block ``transformer.h.N``); every tensor is
copied as stored except the fused ``query_key_value``, per head interleaved as GPT-NeoX's (viewed
``(heads, 3, head_dim, hidden)``), split exactly on import and joined on export
(:func:`~.base.split_interleaved_qkv`, :func:`~.base.join_interleaved_qkv`). ``BloomModel`` files
(names without ``transformer.``, as the original ``bigscience/bloom-*`` checkpoints) are read too;
export writes ``transformer.``::

    transformer.word_embeddings.weight                        -> tok_emb.weight
    transformer.word_embeddings_layernorm.weight/bias         -> emb_norm.scale/shift
    transformer.h.N.input_layernorm.weight/bias               -> trf_blocks.N.norm1.scale/shift
    transformer.h.N.self_attention.query_key_value.weight/bias -> trf_blocks.N.att.W_{query,key,value}.weight/bias
    transformer.h.N.self_attention.dense.weight/bias          -> trf_blocks.N.att.out_proj.weight/bias
    transformer.h.N.post_attention_layernorm.weight/bias      -> trf_blocks.N.norm2.scale/shift
    transformer.h.N.mlp.dense_h_to_4h.weight/bias             -> trf_blocks.N.ff.layers.0.weight/bias
    transformer.h.N.mlp.dense_4h_to_h.weight/bias             -> trf_blocks.N.ff.layers.2.weight/bias
    transformer.ln_f.weight/bias                              -> final_norm.scale/shift
    lm_head.weight                                            -> out_head.weight  (absent or dropped when tied)

ALiBi: transformers adds ``slope_h · j`` to the scores of key ``j``; ``llama.alibi`` adds
``slope_h · (j − i)``, which softmax makes the same (a constant per query row). Its slopes are the
paper's and Megatron-DeepSpeed's (BLOOM's training code: Python floats rounded once to float32);
transformers computes them with a float32 ``pow``, which differs by at most 3e-6 relative (heads
not a power of two, or more than 8).

Refused with a :class:`CheckpointError` naming the field: ``apply_residual_connection_post_layernorm:
true`` (the residual is the normed input, which no registered block computes),
``pretraining_tp`` > 1 with ``slow_but_exact: true`` (transformers then drops the biases of
``dense`` and ``dense_4h_to_h``; ``pretraining_tp`` alone changes nothing), a ``hidden_size`` not
divisible by the heads; tensors outside the key map are refused as unknown.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from .base import HFFamily, join_interleaved_qkv, rename, rename_back, split_interleaved_qkv
from .gpt_neox import _first
from .llama import _read_config, _refuse
from ..hf import _HFSize, KeyRule, model_level_problems
from ...errors import CheckpointError, SpecError
from ...spec import ModelSpec, validate_spec

if TYPE_CHECKING:
    from ...model import GPTModel

#: BLOOM's training sequence length: the context length of a config without ``seq_length``.
DEFAULT_CONTEXT_LENGTH = 2048
_M = "trf_blocks.{i}."
_QKV = re.compile(r"^(transformer\.)?h\.(?P<i>\d+)\.self_attention\.query_key_value\.(?P<p>weight|bias)$")
_QKV_EXPORT = "transformer.h.{i}.self_attention.query_key_value.{p}"


def _rules(prefix: str) -> list[KeyRule]:
    """The one-to-one rules for tensor names starting with ``prefix`` (``transformer.`` or none)."""
    pairs = {"word_embeddings.weight": "tok_emb.weight", "word_embeddings_layernorm.weight": "emb_norm.scale",
             "word_embeddings_layernorm.bias": "emb_norm.shift", "ln_f.weight": "final_norm.scale",
             "ln_f.bias": "final_norm.shift"}
    rules = [KeyRule(prefix + hf, (mk,), "copy") for hf, mk in pairs.items()]
    layer = {"input_layernorm.weight": "norm1.scale", "input_layernorm.bias": "norm1.shift",
             "post_attention_layernorm.weight": "norm2.scale", "post_attention_layernorm.bias": "norm2.shift"}
    for hf, mk in {"self_attention.dense": "att.out_proj", "mlp.dense_h_to_4h": "ff.layers.0",
                   "mlp.dense_4h_to_h": "ff.layers.2"}.items():
        layer.update({f"{hf}.{p}": f"{mk}.{p}" for p in ("weight", "bias")})
    rules += [KeyRule(prefix + "h.{i}." + hf, (_M + mk,), "copy") for hf, mk in layer.items()]
    return rules


#: The one-to-one rules (``transformer.`` first: export writes the first rule's name);
#: ``self_attention.query_key_value`` is split / joined by the shared interleaved-qkv helpers.
BLOOM_KEY_MAP: tuple[KeyRule, ...] = (*_rules("transformer."), *_rules(""),
                                      KeyRule("lm_head.weight", ("out_head.weight",), "copy"))

_Probability = Annotated[float, Field(ge=0, lt=1)]


class _BloomConfig(BaseModel):
    """The ``config.json`` fields modelkit reads, with JSON's types (strict) and ``BloomConfig``'s
    defaults (the aliases are ``None`` when absent); others are ignored."""

    model_config = ConfigDict(strict=True, extra="allow")

    vocab_size: _HFSize = 250880
    hidden_size: _HFSize | None = None
    n_embed: _HFSize | None = None
    n_layer: _HFSize | None = None
    num_hidden_layers: _HFSize | None = None
    n_head: _HFSize | None = None
    num_attention_heads: _HFSize | None = None
    seq_length: _HFSize | None = None
    layer_norm_epsilon: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    pretraining_tp: _HFSize = 1
    slow_but_exact: bool = False
    hidden_dropout: _Probability = 0.0
    attention_dropout: _Probability = 0.0
    tie_word_embeddings: bool = True


def _sizes(cfg: _BloomConfig) -> tuple[dict[str, int], list[str]]:
    """``hidden_size``, ``n_layer`` and ``n_head`` read from each name or its alias (``BloomConfig``'s
    defaults 64, 2, 8 when neither is given), and the problems: a name and its alias that differ."""
    hidden, p1 = _first([("hidden_size", cfg.hidden_size), ("n_embed", cfg.n_embed)], 64)
    layers, p2 = _first([("n_layer", cfg.n_layer), ("num_hidden_layers", cfg.num_hidden_layers)], 2)
    heads, p3 = _first([("n_head", cfg.n_head), ("num_attention_heads", cfg.num_attention_heads)], 8)
    return {"hidden": hidden, "layers": layers, "heads": heads}, p1 + p2 + p3


def _problems(cfg: _BloomConfig, sizes: dict[str, int]) -> list[str]:
    """The fields of a well-typed BLOOM config that modelkit's parts cannot reproduce."""
    problems = []
    if cfg.apply_residual_connection_post_layernorm:
        problems.append("apply_residual_connection_post_layernorm true is not supported (its residual is the "
                        "normed input: no registered block computes x = norm(x) + att(norm(x)))")
    if cfg.pretraining_tp > 1 and cfg.slow_but_exact:
        problems.append(f"pretraining_tp {cfg.pretraining_tp} with slow_but_exact true is not supported "
                        "(transformers then leaves out the biases of dense and dense_4h_to_h)")
    if sizes["hidden"] % sizes["heads"]:
        problems.append(f"hidden_size {sizes['hidden']} is not divisible by n_head {sizes['heads']}")
    return problems


def spec_from_config(config: Mapping[str, Any], name: str = "bloom", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face ``BloomForCausalLM`` ``config.json`` (see the module doc).

    Raises :class:`CheckpointError` naming ``source`` and the field for a config that is not a BLOOM
    config object, has malformed fields or aliases that disagree, or asks for what the parts cannot
    compute (the post-layernorm residual, tensor-parallel slicing without biases, another head size).
    """
    cfg = _read_config(config, source, "bloom", "BLOOM", _BloomConfig)
    sizes, problems = _sizes(cfg)
    problems += _problems(cfg, sizes)
    if problems:
        raise CheckpointError(f"cannot build a modelkit spec from the BLOOM config {source}: " + "; ".join(problems))
    norm = {"type": "layernorm", "eps": cfg.layer_norm_epsilon}
    data = {
        "name": name, "vocab_size": cfg.vocab_size, "context_length": cfg.seq_length or DEFAULT_CONTEXT_LENGTH,
        "emb_dim": sizes["hidden"], "n_heads": sizes["heads"], "n_layers": sizes["layers"],
        "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": cfg.tie_word_embeddings,
        "positional": "llama.alibi", "norm": norm, "embedding_norm": norm,
        "attention": {"type": "mha", "out_bias": True},
        "feedforward": {"type": "mlp", "hidden_dim": 4 * sizes["hidden"], "activation": "gelu"},
        "block": "pre_norm",
    }
    try:
        return validate_spec(data, source)
    except SpecError as exc:
        raise CheckpointError(f"the BLOOM config {source} does not make a valid spec:\n{exc}") from None


def to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    """The folder's tensors under modelkit names, and the unmatched names: :data:`BLOOM_KEY_MAP` plus
    each ``query_key_value`` split into ``W_query``/``W_key``/``W_value`` (a first dimension that is not
    a multiple of ``3 · n_heads`` is refused). ``lm_head.weight`` is dropped when the spec ties the head."""
    split, rest = split_interleaved_qkv(sources, _QKV, spec.n_heads)
    mapped, unknown = rename(rest, BLOOM_KEY_MAP, drop=("lm_head.weight",) if spec.tie_embeddings else ())
    return {**mapped, **split}, unknown


def _layernorm_problem(slot: str, ref: Any, eps: float) -> list[str]:
    """Why the norm ``ref`` in ``slot`` is not a BLOOM LayerNorm with ``eps``, if it is not."""
    if ref is None or ref.type != "layernorm" or not ref.params.get("bias", True) or ref.params.get("eps") != eps:
        shown = None if ref is None else ref.model_dump()
        return [f"{slot} {shown} (BLOOM uses layernorm with a shift and one eps for every norm: {eps})"]
    return []


def _spec_problems(spec: ModelSpec) -> list[str]:
    """The parts of ``spec`` that are not BLOOM's (see the module doc)."""
    pos, att, ff = spec.positional, spec.attention, spec.feedforward
    problems = []
    if pos.type != "llama.alibi":
        problems.append(f"positional {pos.model_dump()} (BLOOM uses llama.alibi)")
    eps = spec.norm.params.get("eps", 1e-5)
    problems += _layernorm_problem("norm", spec.norm, eps) + _layernorm_problem("embedding_norm",
                                                                                spec.embedding_norm, eps)
    if att.type != "mha" or not att.params.get("out_bias", True) or not spec.qkv_bias:
        problems.append(f"attention {att.model_dump()}, qkv_bias {spec.qkv_bias} (BLOOM uses mha with all biases)")
    act = ff.params.get("activation")
    hidden = ff.params.get("hidden_dim") or ff.params.get("hidden_mult", 4) * spec.emb_dim
    if (ff.type != "mlp" or not ff.params.get("bias", True) or getattr(act, "type", None) != "gelu"
            or hidden != 4 * spec.emb_dim):
        problems.append(f"feedforward {ff.model_dump()} (BLOOM uses mlp with biases, gelu and 4 x emb_dim units)")
    if spec.block.type != "pre_norm":
        problems.append(f"block '{spec.block.type}' (BLOOM blocks are pre_norm)")
    problems += model_level_problems(spec, "BLOOM", stated=("embedding_norm",))
    return problems


def config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a ``BloomForCausalLM`` equivalent to ``spec`` (``seq_length`` holds its
    ``context_length``, which BLOOM's own fields cannot state).

    Raises :class:`CheckpointError` naming every part with no BLOOM equivalent.
    """
    _refuse(spec, "BLOOM", _spec_problems(spec))
    return {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom",
        "vocab_size": spec.vocab_size, "hidden_size": spec.emb_dim, "n_layer": spec.n_layers,
        "n_head": spec.n_heads, "seq_length": spec.context_length,
        "layer_norm_epsilon": spec.norm.params.get("eps", 1e-5),
        "apply_residual_connection_post_layernorm": False, "pretraining_tp": 1, "slow_but_exact": False,
        "hidden_dropout": spec.drop_rate, "attention_dropout": spec.drop_rate,
        "tie_word_embeddings": spec.tie_embeddings, "initializer_range": 0.02, "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def to_hf(model: GPTModel) -> dict[str, Tensor]:
    """The ``BloomForCausalLM`` state dict (``transformer.`` names) of a model :func:`config_from_spec`
    accepts, on CPU (q/k/v joined into ``query_key_value``; ``lm_head.weight`` only when not tied)."""
    config_from_spec(model.spec)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if model.spec.tie_embeddings:
        state.pop("out_head.weight", None)
    fused = join_interleaved_qkv(state, model.spec.n_layers, model.spec.n_heads, _QKV_EXPORT)
    return {**{k: v.contiguous() for k, v in rename_back(state, BLOOM_KEY_MAP).items()}, **fused}


BLOOM = HFFamily(model_type="bloom", label="BLOOM", spec_from_config=spec_from_config, to_modelkit=to_modelkit,
                 config_from_spec=config_from_spec, to_hf=to_hf)
