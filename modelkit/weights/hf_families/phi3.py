"""Phi-3 (``model_type: "phi3"``, ``Phi3ForCausalLM``, e.g. Phi-3-mini) as a spec of registered parts.

Phi-3 is Llama's architecture without biases, with its query/key/value and gate/up projections
stored fused. The spec is the llama plugin's parts, as for :mod:`.llama`: ``llama.rope``
(``rope_theta``; ``partial_rotary_factor`` below 1 as ``rotary_fraction``; default RoPE only),
``llama.rmsnorm`` (``rms_norm_eps``), ``llama.gqa`` (``num_key_value_heads``, no biases),
``llama.swiglu`` (``intermediate_size``, no bias), ``pre_norm`` blocks, ``tie_embeddings`` from
``tie_word_embeddings`` (Phi-3's default: false), ``drop_rate`` 0.

``sliding_window`` (Phi-3-mini-4k: 2047; ``null``: full attention) is ``llama.gqa``'s
``sliding_window`` on every layer, as transformers' ``Phi3ForCausalLM`` computes it: a query sees
itself and the ``sliding_window - 1`` positions before it.

The key map is explicit (per block ``model.layers.N``); the fused tensors are split exactly, by
rows, on import (:func:`split_rows`) and joined by concatenation on export::

    model.embed_tokens.weight                      -> tok_emb.weight
    model.layers.N.input_layernorm.weight          -> trf_blocks.N.norm1.weight
    model.layers.N.self_attn.qkv_proj.weight       -> trf_blocks.N.att.W_{query,key,value}.weight
        rows [0, heads·d) query, then kv_heads·d rows key, then kv_heads·d rows value (d = head size)
    model.layers.N.self_attn.o_proj.weight         -> trf_blocks.N.att.out_proj.weight
    model.layers.N.post_attention_layernorm.weight -> trf_blocks.N.norm2.weight
    model.layers.N.mlp.gate_up_proj.weight         -> trf_blocks.N.ff.{gate,up}_proj.weight
        rows [0, intermediate) gate, then intermediate rows up (``chunk(2)`` in transformers)
    model.layers.N.mlp.down_proj.weight            -> trf_blocks.N.ff.down_proj.weight
    model.norm.weight                              -> final_norm.weight
    lm_head.weight                                 -> out_head.weight  (absent or dropped when tied)

Refused with a :class:`CheckpointError` naming the field: a ``rope_type`` other than ``default``
(``longrope``, and the older ``su`` / ``yarn`` that transformers reads as ``longrope``), a
``partial_rotary_factor`` outside (0, 1] or given twice with two values, ``hidden_act`` other than
``silu``, a ``head_dim`` other than ``hidden_size / num_attention_heads``.

Export: a spec of these parts without biases is also a Llama spec (a Mistral spec with a window),
and :func:`export_family_of` tries Llama and Mistral first, so such a model is written as
``LlamaForCausalLM`` / ``MistralForCausalLM`` (the same computation) unless Phi-3 is asked for
(``export_hf(..., model_type="phi3")``, ``modelkit export-hf --model-type phi3``); a
``rotary_fraction`` below 1, which neither of their configs can state, is written as Phi-3.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, cast

import torch
from pydantic import Field
from torch import Tensor

from .base import HFFamily, rename, rename_back
from .gpt_neox import _first
from .llama import (_build_spec, _default_hidden, _hf_fields, _LlamaConfig, _part_problems, _problems, _read_config,
                    _refuse, _rope)
from ..hf import _HFSize, _Source, _derive, _json_type, KeyRule
from ...errors import CheckpointError
from ...spec import ModelSpec

if TYPE_CHECKING:
    from ...model import GPTModel

_B = "model.layers.{i}."
_M = "trf_blocks.{i}."
_QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight$")
_GATE_UP = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight$")
_QKV_NAMES = ("W_query", "W_key", "W_value")
_GATE_UP_NAMES = ("gate_proj", "up_proj")
_IGNORED = re.compile(r"^model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")

#: The one-to-one rules; ``qkv_proj`` and ``gate_up_proj`` are split / joined by rows (see the module doc).
PHI3_KEY_MAP: tuple[KeyRule, ...] = tuple(KeyRule(hf, (mk,), "copy") for hf, mk in {
    "model.embed_tokens.weight": "tok_emb.weight",
    _B + "input_layernorm.weight": _M + "norm1.weight",
    _B + "self_attn.o_proj.weight": _M + "att.out_proj.weight",
    _B + "post_attention_layernorm.weight": _M + "norm2.weight",
    _B + "mlp.down_proj.weight": _M + "ff.down_proj.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "out_head.weight",
}.items())

_Dropout = Annotated[float, Field(ge=0, le=1)]


class _Phi3Config(_LlamaConfig):
    """The ``config.json`` fields modelkit reads (strict JSON types), with ``Phi3Config``'s defaults;
    dropout probabilities are checked but unused (modelkit imports for inference, ``drop_rate`` 0)."""

    vocab_size: _HFSize = 32064
    hidden_size: _HFSize = 3072
    intermediate_size: _HFSize = 8192
    num_hidden_layers: _HFSize = 32
    num_attention_heads: _HFSize = 32
    max_position_embeddings: _HFSize = 4096
    original_max_position_embeddings: _HFSize | None = None
    rms_norm_eps: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    partial_rotary_factor: Any = None
    sliding_window: Annotated[int, Field(ge=1)] | None = None
    resid_pdrop: _Dropout = 0.0
    embd_pdrop: _Dropout = 0.0
    attention_dropout: _Dropout = 0.0


def rotary_fraction(top_level: Any, rope_params: Mapping[str, Any] | None, default: float) -> tuple[float, list[str]]:
    """The rotated fraction of each head: the config's ``partial_rotary_factor`` (top level, as older
    configs write it, or in ``rope_parameters``/``rope_scaling``; ``default`` if neither), and the
    problems found (the two disagree, or it is not a number in (0, 1])."""
    inner = (rope_params or {}).get("partial_rotary_factor")
    fraction, problems = _first([("partial_rotary_factor", top_level),
                                 ("rope_parameters.partial_rotary_factor", inner)], default)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        return default, problems + [f"partial_rotary_factor: expected a number, got {_json_type(fraction)}"]
    if not 0 < fraction <= 1:
        return default, problems + [f"partial_rotary_factor {fraction} is not in (0, 1]"]
    return float(fraction), problems


def spec_from_config(config: Mapping[str, Any], name: str = "phi3", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face ``Phi3ForCausalLM`` ``config.json`` (see the module doc).

    Raises :class:`CheckpointError` naming ``source`` and the field for a config that is not a Phi-3
    config object, has malformed fields, or asks for what the parts cannot compute (``longrope`` /
    ``su`` / ``yarn`` or another ``rope_type``, ``hidden_act`` other than ``silu``, another ``head_dim``).
    """
    cfg = cast(_Phi3Config, _read_config(config, source, "phi3", "Phi-3", _Phi3Config))
    positional, rope_problems = _rope(cfg, ("default",))
    fraction, fraction_problems = rotary_fraction(cfg.partial_rotary_factor,
                                                  cfg.rope_parameters or cfg.rope_scaling, 1.0)
    if fraction != 1.0:
        positional["rotary_fraction"] = fraction
    return _build_spec(cfg, name, source, "Phi-3", positional, _problems(cfg) + rope_problems + fraction_problems,
                       qkv_bias=False, out_bias=False, mlp_bias=False,
                       attention={"sliding_window": cfg.sliding_window})


def split_rows(t: Tensor, sizes: Sequence[int], j: int) -> Tensor:
    """Rows ``[sum(sizes[:j]), sum(sizes[:j + 1]))`` of ``t``, a copy (exact)."""
    start = sum(sizes[:j])
    return t[start:start + sizes[j]].clone()


def _split(name: str, src: Any, sizes: tuple[int, ...], what: str) -> list[Any]:
    """``src`` (a tensor or the loader's lazy source) split by rows into ``sizes``; raises
    :class:`CheckpointError` naming ``name`` if its first dimension is not their sum."""
    shape = tuple(src.shape)
    if len(shape) != 2 or shape[0] != sum(sizes):
        raise CheckpointError(f"{name}: shape {shape} is not ({' + '.join(map(str, sizes))}, hidden) ({what})")
    parts = []
    for j, size in enumerate(sizes):
        fn = (lambda t, j=j: split_rows(t, sizes, j))
        parts.append(_derive(src, (size, shape[1]), fn) if isinstance(src, _Source) else fn(src))
    return parts


def _fused_sizes(spec: ModelSpec) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """The row counts of ``qkv_proj`` (query, key, value) and ``gate_up_proj`` (gate, up) for ``spec``."""
    head_dim = spec.emb_dim // spec.n_heads
    kv = (spec.attention.params.get("num_kv_heads") or spec.n_heads) * head_dim
    ff = spec.feedforward.params
    hidden = ff.get("hidden_dim") or _default_hidden(spec.emb_dim, ff.get("multiple_of", 256))
    return (spec.emb_dim, kv, kv), (hidden, hidden)


def to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    """The folder's tensors under modelkit names, and the unmatched names: :data:`PHI3_KEY_MAP` plus
    ``qkv_proj`` split into ``W_query``/``W_key``/``W_value`` and ``gate_up_proj`` into
    ``gate_proj``/``up_proj`` (a first dimension that does not fit the spec is refused, named).
    ``lm_head.weight`` is dropped when the spec ties the head to the embedding."""
    qkv_sizes, gate_up_sizes = _fused_sizes(spec)
    rest: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for name, src in sources.items():
        if (m := _QKV.match(name)) is not None:
            parts = _split(name, src, qkv_sizes, f"query, key, value rows for {spec.n_heads} heads")
            out.update({f"trf_blocks.{m.group(1)}.att.{n}.weight": p for n, p in zip(_QKV_NAMES, parts)})
        elif (m := _GATE_UP.match(name)) is not None:
            parts = _split(name, src, gate_up_sizes, "gate, up rows of the spec's hidden_dim")
            out.update({f"trf_blocks.{m.group(1)}.ff.{n}.weight": p for n, p in zip(_GATE_UP_NAMES, parts)})
        else:
            rest[name] = src
    mapped, unknown = rename(rest, PHI3_KEY_MAP, ignored=_IGNORED,
                             drop=("lm_head.weight",) if spec.tie_embeddings else ())
    return {**mapped, **out}, unknown


def _phi3_biases(spec: ModelSpec) -> str | None:
    """Why ``spec``'s attention has biases Phi-3 lacks, or None."""
    if spec.qkv_bias or spec.attention.params.get("out_bias"):
        return "attention biases (Phi-3's qkv_proj and o_proj have none)"
    return None


def config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a ``Phi3ForCausalLM`` equivalent to ``spec``.

    Raises :class:`CheckpointError` naming every part with no Phi-3 equivalent (attention or
    feed-forward biases, RoPE scaling, a window on some layers only, soft-capping, a query scale,
    model-level fields, parts that are not the llama ones).
    """
    problems = _part_problems(spec, "Phi-3", _phi3_biases, window=True, partial_rotary=True)
    if spec.feedforward.type == "llama.swiglu" and spec.feedforward.params.get("bias"):
        problems.append("feedforward bias true (Phi-3's MLP has no biases)")
    if spec.positional.type == "llama.rope" and spec.positional.params.get("scaling", "none") != "none":
        problems.append(f"positional scaling '{spec.positional.params['scaling']}' (Phi-3 uses default RoPE)")
    _refuse(spec, "Phi-3", problems)
    fields = _hf_fields(spec, dtype)
    fields.pop("head_dim")  # not a Phi3Config field; transformers derives it as modelkit does
    fields["rope_parameters"]["partial_rotary_factor"] = float(spec.positional.params.get("rotary_fraction", 1.0))
    return {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", **fields,
            "original_max_position_embeddings": spec.context_length,
            "sliding_window": spec.attention.params.get("sliding_window"),
            "resid_pdrop": spec.drop_rate, "embd_pdrop": spec.drop_rate,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def to_hf(model: GPTModel) -> dict[str, Tensor]:
    """The ``Phi3ForCausalLM`` state dict of a model :func:`config_from_spec` accepts, on CPU
    (q/k/v joined into ``qkv_proj``, gate/up into ``gate_up_proj``; ``lm_head.weight`` only when
    the head is not tied)."""
    config_from_spec(model.spec)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if model.spec.tie_embeddings:
        state.pop("out_head.weight", None)
    fused: dict[str, Tensor] = {}
    for i in range(model.spec.n_layers):
        b = f"trf_blocks.{i}."
        qkv = [state.pop(f"{b}att.{n}.weight") for n in _QKV_NAMES]
        gate_up = [state.pop(f"{b}ff.{n}.weight") for n in _GATE_UP_NAMES]
        fused[f"model.layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(qkv).contiguous()
        fused[f"model.layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(gate_up).contiguous()
    return {**{k: v.contiguous() for k, v in rename_back(state, PHI3_KEY_MAP).items()}, **fused}


PHI3 = HFFamily(model_type="phi3", label="Phi-3", spec_from_config=spec_from_config, to_modelkit=to_modelkit,
                config_from_spec=config_from_spec, to_hf=to_hf)
