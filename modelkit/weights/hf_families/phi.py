"""Phi-1 / Phi-1.5 / Phi-2 (``model_type: "phi"``, ``PhiForCausalLM``) as a spec of registered parts.

Phi is a ``parallel`` block with one LayerNorm shared by attention and feed-forward
(``shared_norm: true``: ``x + att(norm1(x)) + ff(norm1(x))``), ``llama.rope`` on the first
``int(head_dim * partial_rotary_factor)`` dims of each head (``rotary_fraction``; Phi's default
0.5, Phi-2 0.4; base ``rope_theta``), ``mha`` with biases on q/k/v and ``dense`` (``llama.gqa``
with the same biases when ``num_key_value_heads`` is below ``num_attention_heads``), ``mlp`` with
biases (``intermediate_size``; ``hidden_act`` ``gelu_new`` is modelkit's tanh ``gelu``),
``layernorm`` with a shift (``layer_norm_eps``), no position embeddings, a final LayerNorm, an
output head with a bias (``head_bias``), ``tie_embeddings`` from ``tie_word_embeddings`` (Phi's
default: false; the bias is never tied), ``drop_rate`` 0.

The key map is explicit (:data:`PHI_KEY_MAP`, per block ``model.layers.N``; every tensor is copied
as stored, ``nn.Linear`` on both sides)::

    model.embed_tokens.weight                          -> tok_emb.weight
    model.layers.N.input_layernorm.weight/bias         -> trf_blocks.N.norm1.scale/shift
    model.layers.N.self_attn.{q,k,v}_proj.weight/bias  -> trf_blocks.N.att.W_{query,key,value}.weight/bias
    model.layers.N.self_attn.dense.weight/bias         -> trf_blocks.N.att.out_proj.weight/bias
    model.layers.N.mlp.fc1.weight/bias                 -> trf_blocks.N.ff.layers.0.weight/bias
    model.layers.N.mlp.fc2.weight/bias                 -> trf_blocks.N.ff.layers.2.weight/bias
    model.final_layernorm.weight/bias                  -> final_norm.scale/shift
    lm_head.weight                                     -> out_head.weight  (absent or dropped when tied)
    lm_head.bias                                       -> out_head.bias

Refused with a :class:`CheckpointError` naming the field: ``qk_layernorm: true`` (a LayerNorm on
queries and keys, which no registered attention has), a ``rope_type`` other than ``default``, a
``partial_rotary_factor`` outside (0, 1] or given twice with two values, a ``hidden_act`` with no
modelkit activation, a ``head_dim`` other than ``hidden_size / num_attention_heads``; tensors
outside the key map (e.g. the ``q_layernorm`` of such a folder) are refused as unknown.

Export writes a spec of these parts as ``PhiForCausalLM``; a head without a bias is written with
a zero ``lm_head.bias`` (the same logits). Other model-level fields (``head_dim``, ``embedding_scale``,
``embedding_norm``, ``final_logit_softcap``) and ``llama.gqa``'s window, soft-capping and query scale
have no Phi equivalent and are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, cast

import torch
from pydantic import Field
from torch import Tensor

from .base import HFFamily, head_size_problems, rename, rename_back
from .llama import _gqa_option_problems, _LlamaConfig, _read_config, _refuse, _rope
from .phi3 import rotary_fraction
from ..hf import _HFSize, EXPORT_ACTIVATIONS, HF_ACTIVATIONS, KeyRule, model_level_problems
from ...errors import CheckpointError, SpecError
from ...spec import ModelSpec, validate_spec

if TYPE_CHECKING:
    from ...model import GPTModel

_B = "model.layers.{i}."
_M = "trf_blocks.{i}."
_IGNORED = re.compile(r"^model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")


def _rules() -> tuple[KeyRule, ...]:
    layer = {"input_layernorm.weight": "norm1.scale", "input_layernorm.bias": "norm1.shift"}
    for hf, mk in {"self_attn.q_proj": "att.W_query", "self_attn.k_proj": "att.W_key",
                   "self_attn.v_proj": "att.W_value", "self_attn.dense": "att.out_proj",
                   "mlp.fc1": "ff.layers.0", "mlp.fc2": "ff.layers.2"}.items():
        layer.update({f"{hf}.{p}": f"{mk}.{p}" for p in ("weight", "bias")})
    model = {"model.embed_tokens.weight": "tok_emb.weight", "model.final_layernorm.weight": "final_norm.scale",
             "model.final_layernorm.bias": "final_norm.shift", "lm_head.weight": "out_head.weight",
             "lm_head.bias": "out_head.bias"}
    return (tuple(KeyRule(_B + hf, (_M + mk,), "copy") for hf, mk in layer.items())
            + tuple(KeyRule(hf, (mk,), "copy") for hf, mk in model.items()))


PHI_KEY_MAP: tuple[KeyRule, ...] = _rules()
_Dropout = Annotated[float, Field(ge=0, le=1)]


class _PhiConfig(_LlamaConfig):
    """The ``config.json`` fields modelkit reads (strict JSON types), with ``PhiConfig``'s defaults;
    dropout probabilities are checked but unused (modelkit imports for inference, ``drop_rate`` 0)."""

    vocab_size: _HFSize = 51200
    hidden_size: _HFSize = 2048
    intermediate_size: _HFSize = 8192
    num_hidden_layers: _HFSize = 24
    num_attention_heads: _HFSize = 32
    max_position_embeddings: _HFSize = 2048
    hidden_act: str = "gelu_new"
    layer_norm_eps: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    partial_rotary_factor: Any = None
    qk_layernorm: bool = False
    resid_pdrop: _Dropout = 0.0
    embd_pdrop: _Dropout = 0.0
    attention_dropout: _Dropout | None = 0.0


def _problems(cfg: _PhiConfig) -> list[str]:
    """The fields of a well-typed Phi config that modelkit's parts cannot reproduce."""
    problems = []
    if cfg.qk_layernorm:
        problems.append("qk_layernorm true is not supported (no registered attention normalises queries and keys)")
    if cfg.hidden_act not in HF_ACTIVATIONS:
        problems.append(f"hidden_act {cfg.hidden_act!r} has no modelkit equivalent "
                        f"(supported: {', '.join(HF_ACTIVATIONS)})")
    return problems + head_size_problems(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim)


def _attention(cfg: _PhiConfig) -> dict[str, Any]:
    """``mha`` with an ``out_proj`` bias, or ``llama.gqa`` with one when there are fewer key/value heads."""
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    if kv == cfg.num_attention_heads:
        return {"type": "mha", "out_bias": True}
    return {"type": "llama.gqa", "num_kv_heads": kv, "out_bias": True}


def spec_from_config(config: Mapping[str, Any], name: str = "phi", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face ``PhiForCausalLM`` ``config.json`` (see the module doc).

    Raises :class:`CheckpointError` naming ``source`` and the field for a config that is not a Phi
    config object, has malformed fields, or asks for what the parts cannot compute (``qk_layernorm``,
    RoPE scaling, an activation modelkit lacks, another head size).
    """
    cfg = cast(_PhiConfig, _read_config(config, source, "phi", "Phi", _PhiConfig))
    positional, rope_problems = _rope(cfg, ("default",))
    fraction, fraction_problems = rotary_fraction(cfg.partial_rotary_factor, cfg.rope_parameters or cfg.rope_scaling,
                                                  0.5)
    if fraction != 1.0:
        positional["rotary_fraction"] = fraction
    problems = _problems(cfg) + rope_problems + fraction_problems
    if problems:
        raise CheckpointError(f"cannot build a modelkit spec from the Phi config {source}: " + "; ".join(problems))
    data = {
        "name": name, "vocab_size": cfg.vocab_size, "context_length": cfg.max_position_embeddings,
        "emb_dim": cfg.hidden_size, "n_heads": cfg.num_attention_heads, "n_layers": cfg.num_hidden_layers,
        "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": cfg.tie_word_embeddings, "head_bias": True,
        "positional": positional, "norm": {"type": "layernorm", "eps": cfg.layer_norm_eps},
        "attention": _attention(cfg),
        "feedforward": {"type": "mlp", "hidden_dim": cfg.intermediate_size,
                        "activation": HF_ACTIVATIONS[cfg.hidden_act]},
        "block": {"type": "parallel", "shared_norm": True},
    }
    try:
        return validate_spec(data, source)
    except SpecError as exc:
        raise CheckpointError(f"the Phi config {source} does not make a valid spec:\n{exc}") from None


def to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    """The folder's tensors under modelkit names (:data:`PHI_KEY_MAP`), and the unmatched names.
    ``lm_head.weight`` is dropped when the spec ties the head to the embedding (its bias is kept)."""
    return rename(sources, PHI_KEY_MAP, ignored=_IGNORED, drop=("lm_head.weight",) if spec.tie_embeddings else ())


def _spec_problems(spec: ModelSpec) -> list[str]:
    """The parts of ``spec`` that are not Phi's (see the module doc)."""
    pos, norm, att, ff, block = spec.positional, spec.norm, spec.attention, spec.feedforward, spec.block
    problems = []
    if pos.type != "llama.rope" or pos.params.get("scaling", "none") != "none":
        problems.append(f"positional {pos.model_dump()} (Phi uses llama.rope without scaling)")
    if norm.type != "layernorm" or not norm.params.get("bias", True):
        problems.append(f"norm {norm.model_dump()} (Phi uses layernorm with a shift)")
    if att.type not in ("mha", "llama.gqa") or not att.params.get("out_bias", att.type == "mha") or not spec.qkv_bias:
        problems.append(f"attention {att.model_dump()}, qkv_bias {spec.qkv_bias} "
                        "(Phi uses mha or llama.gqa with all biases)")
    elif att.type == "llama.gqa":
        problems += _gqa_option_problems(spec, "Phi", False, False)
    act = getattr(ff.params.get("activation"), "type", None)
    if ff.type != "mlp" or not ff.params.get("bias", True) or act not in EXPORT_ACTIVATIONS:
        problems.append(f"feedforward {ff.model_dump()} (Phi uses mlp with biases and one of "
                        f"{', '.join(EXPORT_ACTIVATIONS)})")
    if block.type != "parallel" or not block.params.get("shared_norm", True):
        problems.append(f"block {block.model_dump()} (Phi uses parallel with shared_norm true)")
    return problems + model_level_problems(spec, "Phi", ("head_bias",))


def config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a ``PhiForCausalLM`` equivalent to ``spec``.

    Raises :class:`CheckpointError` naming every part with no Phi equivalent.
    """
    _refuse(spec, "Phi", _spec_problems(spec))
    ff, pos, att = spec.feedforward.params, spec.positional.params, spec.attention.params
    theta, fraction = float(pos.get("theta", 10000.0)), float(pos.get("rotary_fraction", 1.0))
    return {
        "architectures": ["PhiForCausalLM"], "model_type": "phi",
        "vocab_size": spec.vocab_size, "max_position_embeddings": spec.context_length,
        "hidden_size": spec.emb_dim, "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": att.get("num_kv_heads") or spec.n_heads,
        "intermediate_size": ff.get("hidden_dim") or ff.get("hidden_mult", 4) * spec.emb_dim,
        "hidden_act": EXPORT_ACTIVATIONS[ff["activation"].type], "partial_rotary_factor": fraction,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": fraction},
        "layer_norm_eps": spec.norm.params.get("eps", 1e-5), "qk_layernorm": False,
        "tie_word_embeddings": spec.tie_embeddings, "resid_pdrop": spec.drop_rate, "embd_pdrop": spec.drop_rate,
        "attention_dropout": spec.drop_rate, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "dtype": str(dtype).removeprefix("torch."),
    }


def to_hf(model: GPTModel) -> dict[str, Tensor]:
    """The ``PhiForCausalLM`` state dict of a model :func:`config_from_spec` accepts, on CPU
    (``lm_head.weight`` only when the head is not tied; a zero ``lm_head.bias`` when it has none)."""
    config_from_spec(model.spec)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if model.spec.tie_embeddings:
        state.pop("out_head.weight", None)
    if "out_head.bias" not in state:
        state["out_head.bias"] = torch.zeros(model.spec.vocab_size, dtype=model.out_head.weight.dtype)
    return {k: v.contiguous() for k, v in rename_back(state, PHI_KEY_MAP).items()}


PHI = HFFamily(model_type="phi", label="Phi", spec_from_config=spec_from_config, to_modelkit=to_modelkit,
               config_from_spec=config_from_spec, to_hf=to_hf)
