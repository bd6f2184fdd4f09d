"""GPT-NeoX (``model_type: "gpt_neox"``, ``GPTNeoXForCausalLM``, e.g. Pythia) as a spec of registered parts.

GPT-NeoX is a ``parallel`` block with two LayerNorms (``shared_norm: false``: ``x + att(norm1(x)) +
ff(norm2(x))``), ``llama.rope`` on the first ``int(head_dim * rotary_pct)`` dims of each head
(``rotary_fraction``; base ``rotary_emb_base`` / ``rope_theta``), ``mha`` with biases on q/k/v and
out, ``mlp`` with exact GELU (``intermediate_size``) and biases, ``layernorm`` with a shift
(``layer_norm_eps``), no position embeddings, a final LayerNorm, ``tie_embeddings`` from
``tie_word_embeddings`` (GPT-NeoX's default: false), ``drop_rate`` 0.

The key map is explicit (:data:`GPT_NEOX_KEY_MAP`, per block ``gpt_neox.layers.N``); every tensor is
copied as stored except the fused ``query_key_value``, whose ``(3·hidden, hidden)`` weight is per
head interleaved (viewed ``(heads, 3, head_dim, hidden)``; the bias ``(heads, 3, head_dim)``) and is
split exactly into q/k/v on import (:func:`split_qkv`) and joined on export (:func:`join_qkv`)::

    gpt_neox.embed_in.weight                          -> tok_emb.weight
    gpt_neox.layers.N.input_layernorm.weight/bias     -> trf_blocks.N.norm1.scale/shift
    gpt_neox.layers.N.post_attention_layernorm.weight/bias -> trf_blocks.N.norm2.scale/shift
    gpt_neox.layers.N.attention.query_key_value.weight/bias -> trf_blocks.N.att.W_{query,key,value}.weight/bias
    gpt_neox.layers.N.attention.dense.weight/bias     -> trf_blocks.N.att.out_proj.weight/bias
    gpt_neox.layers.N.mlp.dense_h_to_4h.weight/bias   -> trf_blocks.N.ff.layers.0.weight/bias
    gpt_neox.layers.N.mlp.dense_4h_to_h.weight/bias   -> trf_blocks.N.ff.layers.2.weight/bias
    gpt_neox.final_layer_norm.weight/bias             -> final_norm.scale/shift
    embed_out.weight                                  -> out_head.weight  (absent or dropped when tied)

transformers 5 holds the head as ``lm_head`` in memory and writes ``embed_out.weight``; a file with
``lm_head.weight`` is read too, and export writes ``embed_out.weight``.

Non-persistent buffers of old checkpoints (``attention.bias``, ``attention.masked_bias``,
``rotary_emb.inv_freq``) are ignored. Refused with a :class:`CheckpointError` naming the field:
``use_parallel_residual: false``, ``hidden_act`` other than ``gelu``, RoPE scaling (``rope_scaling``
or a ``rope_type`` other than ``default``), ``attention_bias: false``, a ``head_dim`` other than
``hidden_size / num_attention_heads``; tensors outside the key map are refused as unknown.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from .base import HFFamily, head_size_problems, join_interleaved_qkv, rename, rename_back, split_interleaved_qkv
from .base import join_qkv, split_qkv  # noqa: F401  (re-exported: GPT-NeoX's fused layout, used by its tests)
from .llama import _read_config, _refuse
from ..hf import _HFSize, _json_type, KeyRule, model_level_problems
from ...errors import CheckpointError, SpecError
from ...spec import ModelSpec, validate_spec

if TYPE_CHECKING:
    from ...model import GPTModel

_B = "gpt_neox.layers.{i}."
_M = "trf_blocks.{i}."
_QKV = re.compile(r"^gpt_neox\.layers\.(?P<i>\d+)\.attention\.query_key_value\.(?P<p>weight|bias)$")
_IGNORED = re.compile(r"^gpt_neox\.(layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)"
                      r"|rotary_emb\.inv_freq)$")


def _rules() -> tuple[KeyRule, ...]:
    pairs = {"gpt_neox.embed_in.weight": "tok_emb.weight", "gpt_neox.final_layer_norm.weight": "final_norm.scale",
             "gpt_neox.final_layer_norm.bias": "final_norm.shift", "embed_out.weight": "out_head.weight"}
    rules = [KeyRule(hf, (mk,), "copy") for hf, mk in pairs.items()]
    layer = {"input_layernorm.weight": "norm1.scale", "input_layernorm.bias": "norm1.shift",
             "post_attention_layernorm.weight": "norm2.scale", "post_attention_layernorm.bias": "norm2.shift"}
    for hf, mk in {"attention.dense": "att.out_proj", "mlp.dense_h_to_4h": "ff.layers.0",
                   "mlp.dense_4h_to_h": "ff.layers.2"}.items():
        layer.update({f"{hf}.{p}": f"{mk}.{p}" for p in ("weight", "bias")})
    rules.append(KeyRule("lm_head.weight", ("out_head.weight",), "copy"))  # read only: export writes embed_out
    return tuple(KeyRule(_B + hf, (_M + mk,), "copy") for hf, mk in layer.items()) + tuple(rules)


#: The one-to-one rules; ``attention.query_key_value`` is split / joined by :func:`split_qkv` / :func:`join_qkv`.
GPT_NEOX_KEY_MAP: tuple[KeyRule, ...] = _rules()


class _GPTNeoXConfig(BaseModel):
    """The ``config.json`` fields modelkit reads, with JSON's types (strict) and ``GPTNeoXConfig``'s
    defaults; others are ignored."""

    model_config = ConfigDict(strict=True, extra="allow")

    vocab_size: _HFSize = 50432
    hidden_size: _HFSize = 6144
    num_hidden_layers: _HFSize = 44
    num_attention_heads: _HFSize = 64
    intermediate_size: _HFSize = 24576
    head_dim: _HFSize | None = None
    hidden_act: str = "gelu"
    rotary_pct: Annotated[float, Field(gt=0, le=1)] | None = None
    rotary_emb_base: Annotated[float, Field(gt=1)] | None = None
    rope_theta: Annotated[float, Field(gt=1)] | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    max_position_embeddings: _HFSize = 2048
    layer_norm_eps: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False


def _first(values: list[tuple[str, Any]], default: Any) -> tuple[Any, list[str]]:
    """The common value of the ``(field, value)`` pairs that are set (``default`` if none), or a
    problem naming the fields that disagree."""
    given = [(field, v) for field, v in values if v is not None]
    if any(v != given[0][1] for _, v in given):
        return default, [" and ".join(f"{f} {v!r}" for f, v in given) + " differ"]
    return (given[0][1] if given else default), []


def _rope(cfg: _GPTNeoXConfig) -> tuple[dict[str, Any], list[str]]:
    """The ``llama.rope`` reference (theta, rotary_fraction) of the config's rotary fields, and the
    problems found. Reads transformers 5's ``rope_parameters`` and the older top-level fields."""
    problems = []
    params = dict(cfg.rope_parameters or {})
    if cfg.rope_scaling is not None:
        problems.append(f"rope_scaling {cfg.rope_scaling!r} is not supported (GPT-NeoX RoPE without scaling only)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope_parameters.rope_type {rope_type!r} is not supported (supported: 'default')")
    theta, p1 = _first([("rotary_emb_base", cfg.rotary_emb_base), ("rope_theta", cfg.rope_theta),
                        ("rope_parameters.rope_theta", params.get("rope_theta"))], 10000.0)
    fraction, p2 = _first([("rotary_pct", cfg.rotary_pct),
                           ("rope_parameters.partial_rotary_factor", params.get("partial_rotary_factor"))], 0.25)
    for field, value in (("rope_theta", theta), ("rotary_pct", fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{field}: expected a number, got {_json_type(value)}")
    problems += p1 + p2
    return {"type": "llama.rope", "theta": float(theta), "rotary_fraction": float(fraction)}, problems


def _problems(cfg: _GPTNeoXConfig) -> list[str]:
    """The fields of a well-typed GPT-NeoX config that modelkit's parts cannot reproduce."""
    problems = []
    if not cfg.use_parallel_residual:
        problems.append("use_parallel_residual false is not supported (modelkit builds GPT-NeoX's parallel blocks)")
    if cfg.hidden_act != "gelu":
        problems.append(f"hidden_act {cfg.hidden_act!r} is not supported (GPT-NeoX uses 'gelu', exact)")
    if not cfg.attention_bias:
        problems.append("attention_bias false is not supported (GPT-NeoX's query_key_value and dense have biases)")
    problems += head_size_problems(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim)
    return problems


def spec_from_config(config: Mapping[str, Any], name: str = "gpt_neox", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face ``GPTNeoXForCausalLM`` ``config.json`` (see the module doc).

    Raises :class:`CheckpointError` naming ``source`` and the field for a config that is not a
    GPT-NeoX config object, has malformed fields, or asks for what the parts cannot compute
    (sequential residual, another activation, RoPE scaling, no attention biases, another head size).
    """
    cfg = _read_config(config, source, "gpt_neox", "GPT-NeoX", _GPTNeoXConfig)
    positional, rope_problems = _rope(cfg)
    problems = _problems(cfg) + rope_problems
    if problems:
        raise CheckpointError(f"cannot build a modelkit spec from the GPT-NeoX config {source}: " + "; ".join(problems))
    data = {
        "name": name, "vocab_size": cfg.vocab_size, "context_length": cfg.max_position_embeddings,
        "emb_dim": cfg.hidden_size, "n_heads": cfg.num_attention_heads, "n_layers": cfg.num_hidden_layers,
        "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": cfg.tie_word_embeddings,
        "positional": positional, "norm": {"type": "layernorm", "eps": cfg.layer_norm_eps},
        "attention": {"type": "mha", "out_bias": True},
        "feedforward": {"type": "mlp", "hidden_dim": cfg.intermediate_size, "activation": "gelu_exact"},
        "block": {"type": "parallel", "shared_norm": False},
    }
    try:
        return validate_spec(data, source)
    except SpecError as exc:
        raise CheckpointError(f"the GPT-NeoX config {source} does not make a valid spec:\n{exc}") from None


def to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    """The folder's tensors under modelkit names, and the unmatched names: :data:`GPT_NEOX_KEY_MAP`
    plus each ``query_key_value`` split into ``W_query``/``W_key``/``W_value`` (:func:`split_qkv`; a
    first dimension that is not a multiple of ``3 · n_heads`` is refused). The head (``embed_out.weight``
    or ``lm_head.weight``) is dropped when the spec ties the head to the embedding; HF's non-persistent buffers are ignored."""
    out, rest = split_interleaved_qkv(sources, _QKV, spec.n_heads)
    mapped, unknown = rename(rest, GPT_NEOX_KEY_MAP, ignored=_IGNORED,
                             drop=("embed_out.weight", "lm_head.weight") if spec.tie_embeddings else ())
    return {**mapped, **out}, unknown


def _spec_problems(spec: ModelSpec) -> list[str]:
    """The parts of ``spec`` that are not GPT-NeoX's (see the module doc)."""
    pos, norm, att, ff, block = spec.positional, spec.norm, spec.attention, spec.feedforward, spec.block
    problems = []
    if pos.type != "llama.rope" or pos.params.get("scaling", "none") != "none":
        problems.append(f"positional {pos.model_dump()} (GPT-NeoX uses llama.rope without scaling)")
    if norm.type != "layernorm" or not norm.params.get("bias", True):
        problems.append(f"norm {norm.model_dump()} (GPT-NeoX uses layernorm with a shift)")
    if att.type != "mha" or not att.params.get("out_bias", True) or not spec.qkv_bias:
        problems.append(f"attention {att.model_dump()}, qkv_bias {spec.qkv_bias} (GPT-NeoX uses mha with all biases)")
    act = ff.params.get("activation")
    if ff.type != "mlp" or not ff.params.get("bias", True) or getattr(act, "type", None) != "gelu_exact":
        problems.append(f"feedforward {ff.model_dump()} (GPT-NeoX uses mlp with biases and gelu_exact)")
    if block.type != "parallel" or block.params.get("shared_norm", True):
        problems.append(f"block {block.model_dump()} (GPT-NeoX uses parallel with shared_norm false)")
    problems += model_level_problems(spec, "GPT-NeoX")
    return problems


def config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a ``GPTNeoXForCausalLM`` equivalent to ``spec``.

    Raises :class:`CheckpointError` naming every part with no GPT-NeoX equivalent.
    """
    _refuse(spec, "GPT-NeoX", _spec_problems(spec))
    ff, pos = spec.feedforward.params, spec.positional.params
    theta, fraction = float(pos.get("theta", 10000.0)), float(pos.get("rotary_fraction", 1.0))
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
        "vocab_size": spec.vocab_size, "max_position_embeddings": spec.context_length,
        "hidden_size": spec.emb_dim, "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "intermediate_size": ff.get("hidden_dim") or ff.get("hidden_mult", 4) * spec.emb_dim,
        "hidden_act": "gelu", "rotary_pct": fraction, "rotary_emb_base": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": fraction},
        "layer_norm_eps": spec.norm.params.get("eps", 1e-5), "use_parallel_residual": True,
        "attention_bias": True, "tie_word_embeddings": spec.tie_embeddings,
        "attention_dropout": spec.drop_rate, "hidden_dropout": spec.drop_rate, "classifier_dropout": 0.1,
        "initializer_range": 0.02, "use_cache": True, "dtype": str(dtype).removeprefix("torch."),
    }


def to_hf(model: GPTModel) -> dict[str, Tensor]:
    """The ``GPTNeoXForCausalLM`` state dict of a model :func:`config_from_spec` accepts, on CPU
    (q/k/v joined into ``query_key_value``; ``embed_out.weight`` only when the head is not tied)."""
    config_from_spec(model.spec)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if model.spec.tie_embeddings:
        state.pop("out_head.weight", None)
    fused = join_interleaved_qkv(state, model.spec.n_layers, model.spec.n_heads,
                                 "gpt_neox.layers.{i}.attention.query_key_value.{p}")
    return {**{k: v.contiguous() for k, v in rename_back(state, GPT_NEOX_KEY_MAP).items()}, **fused}


GPT_NEOX = HFFamily(model_type="gpt_neox", label="GPT-NeoX", spec_from_config=spec_from_config,
                    to_modelkit=to_modelkit, config_from_spec=config_from_spec, to_hf=to_hf)
