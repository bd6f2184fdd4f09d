"""OPT (``model_type: "opt"``, ``OPTForCausalLM``, e.g. OPT-125M) as a spec of registered parts.

OPT is the book's GPT with three differences, all parameters of the built-in parts: the learned
position table reserves two leading rows (``learned`` with ``offset: 2``: ``max_position_embeddings
+ 2`` rows, position ``p`` reads row ``p + 2``), the feed-forward is ``mlp`` with ``relu``
(``ffn_dim`` as ``hidden_dim``), and the attention is ``mha`` with biases on q/k/v and out
(``qkv_bias`` true). Norms are ``layernorm`` with a shift (eps 1e-5, ``nn.LayerNorm``'s default:
OPT configs have no eps), blocks ``pre_norm``, a final LayerNorm, ``tie_embeddings`` from
``tie_word_embeddings`` (default true), ``drop_rate`` 0.

The key map is explicit (:data:`OPT_KEY_MAP`, per block ``model.decoder.layers.N``; every tensor is
copied as stored, ``nn.Linear`` on both sides). ``OPTModel`` folders (names without ``model.``,
as the original ``facebook/opt-*`` checkpoints) are read too; export writes ``model.decoder.``::

    model.decoder.embed_tokens.weight                      -> tok_emb.weight
    model.decoder.embed_positions.weight                   -> pos_emb.weight  (max_position_embeddings + 2 rows)
    model.decoder.layers.N.self_attn_layer_norm.weight/bias -> trf_blocks.N.norm1.scale/shift
    model.decoder.layers.N.self_attn.{q,k,v}_proj.weight/bias -> trf_blocks.N.att.W_{query,key,value}.weight/bias
    model.decoder.layers.N.self_attn.out_proj.weight/bias  -> trf_blocks.N.att.out_proj.weight/bias
    model.decoder.layers.N.final_layer_norm.weight/bias    -> trf_blocks.N.norm2.scale/shift
    model.decoder.layers.N.fc1.weight/bias                 -> trf_blocks.N.ff.layers.0.weight/bias
    model.decoder.layers.N.fc2.weight/bias                 -> trf_blocks.N.ff.layers.2.weight/bias
    model.decoder.final_layer_norm.weight/bias             -> final_norm.scale/shift
    lm_head.weight                                         -> out_head.weight  (absent or dropped when tied)

Refused with a :class:`CheckpointError` naming the field: ``do_layer_norm_before: false`` (OPT-350m's
post-norm layers also drop the final LayerNorm, which modelkit models always have),
``word_embed_proj_dim`` other than ``hidden_size`` (``project_in``/``project_out``),
``enable_bias: false``, ``layer_norm_elementwise_affine: false``, ``activation_function`` other
than ``relu``, ``_remove_final_layer_norm: true``; tensors outside the key map are refused as unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from .base import HFFamily, rename
from .llama import _read_config, _refuse, _state_to_hf
from ..hf import _HFSize, KeyRule, model_level_problems
from ...errors import CheckpointError, SpecError
from ...spec import ModelSpec, validate_spec

if TYPE_CHECKING:
    from ...model import GPTModel

OFFSET = 2  # OPTLearnedPositionalEmbedding's reserved rows
EPS = 1e-5  # nn.LayerNorm's default, which every OPT LayerNorm uses
_M = "trf_blocks.{i}."


def _rules(prefix: str) -> list[KeyRule]:
    """The key map for tensor names starting with ``prefix`` (``model.decoder.`` or ``decoder.``)."""
    b = prefix + "layers.{i}."
    pairs = {"embed_tokens.weight": "tok_emb.weight", "embed_positions.weight": "pos_emb.weight",
             "final_layer_norm.weight": "final_norm.scale", "final_layer_norm.bias": "final_norm.shift"}
    rules = [KeyRule(prefix + hf, (mk,), "copy") for hf, mk in pairs.items()]
    layer = {"self_attn_layer_norm.weight": "norm1.scale", "self_attn_layer_norm.bias": "norm1.shift",
             "final_layer_norm.weight": "norm2.scale", "final_layer_norm.bias": "norm2.shift"}
    for hf, mk in {"q_proj": "W_query", "k_proj": "W_key", "v_proj": "W_value", "out_proj": "out_proj"}.items():
        layer.update({f"self_attn.{hf}.{p}": f"att.{mk}.{p}" for p in ("weight", "bias")})
    for hf, mk in {"fc1": "ff.layers.0", "fc2": "ff.layers.2"}.items():
        layer.update({f"{hf}.{p}": f"{mk}.{p}" for p in ("weight", "bias")})
    rules += [KeyRule(b + hf, (_M + mk,), "copy") for hf, mk in layer.items()]
    return rules


# ``model.decoder.`` first: export (rename_back) writes the first rule's name.
OPT_KEY_MAP: tuple[KeyRule, ...] = (*_rules("model.decoder."), *_rules("decoder."),
                                    KeyRule("lm_head.weight", ("out_head.weight",), "copy"))


class _OPTConfig(BaseModel):
    """The ``config.json`` fields modelkit reads, with JSON's types (strict) and ``OPTConfig``'s
    defaults; others are ignored (``_remove_final_layer_norm`` is read separately: pydantic
    fields cannot start with ``_``)."""

    model_config = ConfigDict(strict=True, extra="allow")

    vocab_size: _HFSize = 50272
    hidden_size: _HFSize = 768
    num_hidden_layers: _HFSize = 12
    ffn_dim: _HFSize = 3072
    max_position_embeddings: _HFSize = 2048
    num_attention_heads: _HFSize = 12
    do_layer_norm_before: bool = True
    word_embed_proj_dim: _HFSize | None = None
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1


def _problems(cfg: _OPTConfig, remove_final_norm: Any) -> list[str]:
    """The fields of a well-typed OPT config that modelkit's parts cannot reproduce."""
    problems = []
    if not cfg.do_layer_norm_before:
        problems.append("do_layer_norm_before false is not supported (OPT-350m's post-norm layers come "
                        "without a final LayerNorm; modelkit models always have one)")
    if cfg.word_embed_proj_dim is not None and cfg.word_embed_proj_dim != cfg.hidden_size:
        problems.append(f"word_embed_proj_dim {cfg.word_embed_proj_dim} differs from hidden_size {cfg.hidden_size} "
                        "(project_in/project_out are not supported)")
    if not cfg.enable_bias:
        problems.append("enable_bias false is not supported (OPT's attention and fc1/fc2 have biases)")
    if not cfg.layer_norm_elementwise_affine:
        problems.append("layer_norm_elementwise_affine false is not supported (layernorm learns scale and shift)")
    if cfg.activation_function != "relu":
        problems.append(f"activation_function {cfg.activation_function!r} is not supported (OPT uses 'relu')")
    if remove_final_norm is not False:
        problems.append(f"_remove_final_layer_norm {remove_final_norm!r} is not supported "
                        "(modelkit models always have a final LayerNorm)")
    return problems


def spec_from_config(config: Mapping[str, Any], name: str = "opt", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face ``OPTForCausalLM`` ``config.json`` (see the module doc).

    Raises :class:`CheckpointError` naming ``source`` and the field for a config that is not an OPT
    config object, has malformed fields, or asks for what the parts cannot compute (post-norm,
    projected embeddings, no biases, norms without parameters, another activation, no final norm).
    """
    cfg = _read_config(config, source, "opt", "OPT", _OPTConfig)
    problems = _problems(cfg, config.get("_remove_final_layer_norm", False))
    head = f"cannot build a modelkit spec from the OPT config {source}"
    if problems:
        raise CheckpointError(f"{head}: " + "; ".join(problems))
    data = {
        "name": name, "vocab_size": cfg.vocab_size, "context_length": cfg.max_position_embeddings,
        "emb_dim": cfg.hidden_size, "n_heads": cfg.num_attention_heads, "n_layers": cfg.num_hidden_layers,
        "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": cfg.tie_word_embeddings,
        "positional": {"type": "learned", "offset": OFFSET}, "norm": {"type": "layernorm", "eps": EPS},
        "attention": {"type": "mha", "out_bias": True},
        "feedforward": {"type": "mlp", "hidden_dim": cfg.ffn_dim, "activation": "relu"},
        "block": "pre_norm",
    }
    try:
        return validate_spec(data, source)
    except SpecError as exc:
        raise CheckpointError(f"the OPT config {source} does not make a valid spec:\n{exc}") from None


def to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    """The folder's tensors under modelkit names (:data:`OPT_KEY_MAP`), and the unmatched names.
    ``lm_head.weight`` is dropped when the spec ties the head to the embedding."""
    return rename(sources, OPT_KEY_MAP, drop=("lm_head.weight",) if spec.tie_embeddings else ())


def _spec_problems(spec: ModelSpec) -> list[str]:
    """The parts of ``spec`` that are not OPT's (see the module doc)."""
    pos, norm, att, ff = spec.positional, spec.norm, spec.attention, spec.feedforward
    problems = []
    if pos.type != "learned" or pos.params.get("offset") != OFFSET:
        problems.append(f"positional {pos.model_dump()} (OPT uses learned with offset {OFFSET})")
    if norm.type != "layernorm" or not norm.params.get("bias", True) or norm.params.get("eps") != EPS:
        problems.append(f"norm {norm.model_dump()} (OPT uses layernorm with a shift and eps {EPS})")
    if att.type != "mha" or not att.params.get("out_bias", True) or not spec.qkv_bias:
        problems.append(f"attention {att.model_dump()}, qkv_bias {spec.qkv_bias} (OPT uses mha with all biases)")
    act = ff.params.get("activation")
    if ff.type != "mlp" or not ff.params.get("bias", True) or getattr(act, "type", None) != "relu":
        problems.append(f"feedforward {ff.model_dump()} (OPT uses mlp with biases and relu)")
    if spec.block.type != "pre_norm":
        problems.append(f"block '{spec.block.type}' (modelkit exports OPT's pre_norm blocks only)")
    problems += model_level_problems(spec, "OPT")
    return problems


def config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of an ``OPTForCausalLM`` equivalent to ``spec``.

    Raises :class:`CheckpointError` naming every part with no OPT equivalent.
    """
    _refuse(spec, "OPT", _spec_problems(spec))
    ff = spec.feedforward.params
    return {
        "architectures": ["OPTForCausalLM"], "model_type": "opt",
        "vocab_size": spec.vocab_size, "max_position_embeddings": spec.context_length,
        "hidden_size": spec.emb_dim, "word_embed_proj_dim": spec.emb_dim,
        "ffn_dim": ff.get("hidden_dim") or ff.get("hidden_mult", 4) * spec.emb_dim,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "activation_function": "relu", "do_layer_norm_before": True, "_remove_final_layer_norm": False,
        "enable_bias": True, "layer_norm_elementwise_affine": True, "tie_word_embeddings": spec.tie_embeddings,
        "dropout": spec.drop_rate, "attention_dropout": spec.drop_rate, "layerdrop": 0.0,
        "init_std": 0.02, "use_cache": True, "dtype": str(dtype).removeprefix("torch."),
    }


def to_hf(model: GPTModel) -> dict[str, Tensor]:
    """The ``OPTForCausalLM`` state dict (``model.decoder.`` names) of a model :func:`config_from_spec`
    accepts (``lm_head.weight`` only when the head is not tied)."""
    config_from_spec(model.spec)
    return _state_to_hf(model, OPT_KEY_MAP)


OPT = HFFamily(model_type="opt", label="OPT", spec_from_config=spec_from_config, to_modelkit=to_modelkit,
               config_from_spec=config_from_spec, to_hf=to_hf)
