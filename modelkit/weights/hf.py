"""GPT-2 in the Hugging Face layout: load ``GPT2LMHeadModel``/``GPT2Model`` weights, export them back.

The key map is explicit (:data:`GPT2_KEY_MAP`, per block ``h.N``; Hugging Face's Conv1D stores its
weight as ``(in, out)``, the transpose of ``nn.Linear``'s)::

    wte.weight                    -> tok_emb.weight
    wpe.weight                    -> pos_emb.weight
    h.N.ln_1.weight / .bias       -> trf_blocks.N.norm1.scale / .shift
    h.N.attn.c_attn.weight (e,3e) -> trf_blocks.N.att.W_query/W_key/W_value.weight  (split in 3, transposed)
    h.N.attn.c_attn.bias (3e)     -> trf_blocks.N.att.W_query/W_key/W_value.bias    (split in 3)
    h.N.attn.c_proj.weight / bias -> trf_blocks.N.att.out_proj.weight (transposed) / .bias
    h.N.ln_2.weight / .bias       -> trf_blocks.N.norm2.scale / .shift
    h.N.mlp.c_fc.weight / .bias   -> trf_blocks.N.ff.layers.0.weight (transposed) / .bias
    h.N.mlp.c_proj.weight / .bias -> trf_blocks.N.ff.layers.2.weight (transposed) / .bias
    ln_f.weight / .bias           -> final_norm.scale / .shift
    lm_head.weight                -> out_head.weight  (not stored when tied to wte)

``GPT2LMHeadModel`` keys carry a ``transformer.`` prefix, ``GPT2Model`` keys do not; both are read.
The causal-mask buffers of old checkpoints (``h.N.attn.bias``, ``h.N.attn.masked_bias``) are ignored.

The folder reading (:func:`load_mapped`), key-map rules (:class:`KeyRule`) and folder writing
(:func:`write_hf_folder`) here are shared by the other families (:mod:`modelkit.weights.hf_families`,
which dispatches on ``model_type``); this module imports none of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
from torch import Tensor

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .checkpoint import _Source, _load_sources, _resolve_device, _torch_load, build_empty, check_spec_fits_tensors
from .safetensors_file import describe_json, loads_json, map_tensors, open_file, pydantic_lines, read_header
from ..errors import CheckpointError, SpecError
from ..files import atomic_file, atomic_folder, write_bytes
from ..spec import ModelSpec, load_spec, model_level_features, validate_spec

if TYPE_CHECKING:
    from ..model import GPTModel

# Hugging Face activation_function -> modelkit activation (identical maths).
HF_ACTIVATIONS: dict[str, str] = {
    "gelu_new": "gelu",  # tanh approximation
    "gelu_pytorch_tanh": "gelu",
    "gelu": "gelu_exact",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
# modelkit activation -> the name written to config.json on export.
EXPORT_ACTIVATIONS: dict[str, str] = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}

_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_PREFIX = "transformer."


@dataclass(frozen=True)
class KeyRule:
    """One line of the key map: a Hugging Face name, the modelkit name(s) it becomes, and how.

    ``how`` is ``"copy"``, ``"transpose"`` (a Conv1D weight), ``"split_qkv_t"`` (c_attn weight:
    split the output dimension in three, transpose each) or ``"split_qkv"`` (c_attn bias).
    ``{i}`` stands for the block index.
    """

    hf: str
    modelkit: tuple[str, ...]
    how: str


_QKV = ("W_query", "W_key", "W_value")
GPT2_KEY_MAP: tuple[KeyRule, ...] = (
    KeyRule("wte.weight", ("tok_emb.weight",), "copy"),
    KeyRule("wpe.weight", ("pos_emb.weight",), "copy"),
    KeyRule("h.{i}.ln_1.weight", ("trf_blocks.{i}.norm1.scale",), "copy"),
    KeyRule("h.{i}.ln_1.bias", ("trf_blocks.{i}.norm1.shift",), "copy"),
    KeyRule("h.{i}.attn.c_attn.weight", tuple(f"trf_blocks.{{i}}.att.{w}.weight" for w in _QKV), "split_qkv_t"),
    KeyRule("h.{i}.attn.c_attn.bias", tuple(f"trf_blocks.{{i}}.att.{w}.bias" for w in _QKV), "split_qkv"),
    KeyRule("h.{i}.attn.c_proj.weight", ("trf_blocks.{i}.att.out_proj.weight",), "transpose"),
    KeyRule("h.{i}.attn.c_proj.bias", ("trf_blocks.{i}.att.out_proj.bias",), "copy"),
    KeyRule("h.{i}.ln_2.weight", ("trf_blocks.{i}.norm2.scale",), "copy"),
    KeyRule("h.{i}.ln_2.bias", ("trf_blocks.{i}.norm2.shift",), "copy"),
    KeyRule("h.{i}.mlp.c_fc.weight", ("trf_blocks.{i}.ff.layers.0.weight",), "transpose"),
    KeyRule("h.{i}.mlp.c_fc.bias", ("trf_blocks.{i}.ff.layers.0.bias",), "copy"),
    KeyRule("h.{i}.mlp.c_proj.weight", ("trf_blocks.{i}.ff.layers.2.weight",), "transpose"),
    KeyRule("h.{i}.mlp.c_proj.bias", ("trf_blocks.{i}.ff.layers.2.bias",), "copy"),
    KeyRule("ln_f.weight", ("final_norm.scale",), "copy"),
    KeyRule("ln_f.bias", ("final_norm.shift",), "copy"),
    KeyRule("lm_head.weight", ("out_head.weight",), "copy"),
)


def _compile(rule: KeyRule) -> re.Pattern[str]:
    return re.compile("^" + re.escape(rule.hf).replace(r"\{i\}", r"(?P<i>\d+)") + "$")




# -- config.json <-> spec ---------------------------------------------------------------------------

_MAX_HF_SIZE = 2**31 - 1  # no GPT-2 size comes near; larger ones are refused before anything is built
_HFSize = Annotated[int, Field(ge=1, le=_MAX_HF_SIZE)]
_MAX_JSON = 16 * 1024 * 1024  # bytes of config.json / index read at most


class _HFConfig(BaseModel):
    """The ``config.json`` fields modelkit reads, with JSON's types (strict); others are ignored."""

    model_config = ConfigDict(strict=True, extra="allow")

    model_type: str = "gpt2"
    vocab_size: _HFSize
    n_positions: _HFSize
    n_embd: _HFSize
    n_layer: _HFSize
    n_head: _HFSize
    n_inner: _HFSize | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    add_cross_attention: bool = False


def _hf_config_problems(cfg: _HFConfig) -> list[str]:
    """The features of a well-typed GPT-2 config that modelkit's GPT-2 parts cannot reproduce."""
    problems = []
    if cfg.activation_function not in HF_ACTIVATIONS:
        problems.append(f"activation_function {cfg.activation_function!r} has no modelkit equivalent "
                        f"(supported: {', '.join(HF_ACTIVATIONS)})")
    if not cfg.scale_attn_weights:
        problems.append("scale_attn_weights false (modelkit attention always scales by 1/sqrt(head_dim))")
    if cfg.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx true is not supported")
    if cfg.add_cross_attention:
        problems.append("add_cross_attention true (an encoder-decoder GPT-2) is not supported")
    return problems


def spec_from_hf_config(config: Mapping[str, Any], name: str = "gpt2", source: str = "config.json") -> ModelSpec:
    """The modelkit spec of a Hugging Face GPT-2 ``config.json``: its sizes, ``qkv_bias`` true,
    ``drop_rate`` 0 and ``tie_embeddings`` from ``tie_word_embeddings`` (default true).

    The config is data: every field modelkit reads is checked for its JSON type and a sane size
    (at most 2**31 - 1) before anything is built. Raises :class:`CheckpointError` naming ``source``
    for a config that is not a GPT-2 config object, has malformed fields, or uses a feature
    modelkit's GPT-2 parts cannot reproduce (an unknown activation, unscaled or layer-scaled
    attention, cross-attention).
    """
    head = f"cannot build a modelkit spec from the GPT-2 config {source}"
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{head}: it must be a JSON object, got {_json_type(config)}")
    model_type = config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise CheckpointError(f"{head}: model_type is {model_type!r}, not 'gpt2'")
    try:
        cfg = _HFConfig.model_validate(dict(config))
    except ValidationError as exc:
        raise CheckpointError(f"{head}:\n  " + "\n  ".join(pydantic_lines(exc, "config")[:20])) from None
    problems = _hf_config_problems(cfg)
    if problems:
        raise CheckpointError(f"{head}: " + "; ".join(problems))
    feedforward: dict[str, Any] = {"type": "mlp", "activation": HF_ACTIVATIONS[cfg.activation_function]}
    if cfg.n_inner is not None:
        feedforward["hidden_dim"] = cfg.n_inner
    data = {
        "name": name, "vocab_size": cfg.vocab_size, "context_length": cfg.n_positions,
        "emb_dim": cfg.n_embd, "n_heads": cfg.n_head, "n_layers": cfg.n_layer,
        "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": cfg.tie_word_embeddings,
        "positional": "learned", "norm": {"type": "layernorm", "eps": cfg.layer_norm_epsilon},
        "attention": {"type": "mha"}, "feedforward": feedforward, "block": "pre_norm",
    }
    try:
        return validate_spec(data, source)
    except SpecError as exc:
        raise CheckpointError(f"the GPT-2 config {source} does not make a valid spec:\n{exc}") from None


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (``an array``, ``a number``)."""
    kinds = [(bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"),
             (dict, "an object"), (type(None), "null")]
    return next((word for kind, word in kinds if isinstance(value, kind)), type(value).__name__)


def _read_json(path: Path) -> Any:
    """A small JSON file (config.json, an index) parsed; at most 16 MiB are read, whatever ``path`` is."""
    try:
        with open_file(path, "file") as fh:
            raw = fh.read(_MAX_JSON + 1)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > _MAX_JSON:
        raise CheckpointError(f"{path} is larger than {_MAX_JSON // 2**20} MiB: not a config or index file")
    try:
        return loads_json(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def model_level_problems(spec: ModelSpec, label: str, stated: tuple[str, ...] = ()) -> list[str]:
    """The model-level fields of ``spec`` that differ from the book's model (:func:`model_level_features`)
    and that a ``label`` config cannot state: the fields not named in ``stated``."""
    return [f"{feature} (a {label} config cannot state it)" for feature in model_level_features(spec)
            if feature.split()[0] not in stated]


def hf_config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a ``GPT2LMHeadModel`` equivalent to ``spec``.

    Raises :class:`CheckpointError` naming every component with no GPT-2 equivalent.
    """
    problems = []
    if spec.positional.type != "learned":
        problems.append(f"positional '{spec.positional.type}' (GPT-2 has learned absolute positions: 'learned')")
    elif spec.positional.params.get("offset", 0):
        problems.append(f"positional offset {spec.positional.params['offset']} (GPT-2's wpe has no offset: 0)")
    if spec.norm.type != "layernorm" or not spec.norm.params.get("bias", True):
        problems.append(f"norm {spec.norm.model_dump()} (GPT-2 uses layernorm with a shift)")
    att = spec.attention
    if att.type != "mha" or not att.params.get("out_bias", True):
        problems.append(f"attention {att.model_dump()} (GPT-2 uses mha with out_bias true)")
    ff = spec.feedforward
    act = ff.params.get("activation")
    act_name = act.type if act is not None and hasattr(act, "type") else None
    if ff.type != "mlp" or not ff.params.get("bias", True):
        problems.append(f"feedforward {ff.model_dump()} (GPT-2 uses mlp with biases)")
    elif act_name not in EXPORT_ACTIVATIONS:
        problems.append(f"activation '{act_name}' (GPT-2 configs support {', '.join(EXPORT_ACTIVATIONS)})")
    if spec.block.type != "pre_norm":
        problems.append(f"block '{spec.block.type}' (GPT-2 blocks are pre_norm)")
    problems += model_level_problems(spec, "GPT-2")
    if problems:
        raise CheckpointError(f"the model '{spec.name}' has no GPT-2 equivalent; these parts differ:\n  "
                              + "\n  ".join(problems))
    hidden = ff.params.get("hidden_dim") or ff.params.get("hidden_mult", 4) * spec.emb_dim
    special = 50256 if spec.vocab_size > 50256 else None  # GPT-2's <|endoftext|>
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": spec.vocab_size, "n_positions": spec.context_length, "n_embd": spec.emb_dim,
        "n_layer": spec.n_layers, "n_head": spec.n_heads, "n_inner": None if hidden == 4 * spec.emb_dim else hidden,
        "activation_function": EXPORT_ACTIVATIONS[str(act_name)],
        "layer_norm_epsilon": spec.norm.params.get("eps", 1e-5),
        "resid_pdrop": spec.drop_rate, "embd_pdrop": spec.drop_rate, "attn_pdrop": spec.drop_rate,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "tie_word_embeddings": spec.tie_embeddings, "initializer_range": 0.02,
        "bos_token_id": special, "eos_token_id": special, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# -- reading a Hugging Face folder ---------------------------------------------------------------

def _shard_names(index: Path, folder: Path) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names: plain file names inside ``folder``
    (never a path elsewhere), each an existing file. Raises naming the index and the entry."""
    data = _read_json(index)
    if not isinstance(data, dict):
        raise CheckpointError(f"{index}: not a safetensors index (expected a JSON object, got {_json_type(data)})")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        got = "missing" if weight_map is None else f"got {_json_type(weight_map)}"
        raise CheckpointError(f"{index}: not a safetensors index: weight_map must be an object of tensor name "
                              f"-> file name, {got}")
    files: set[str] = set()
    for tensor, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(f"{index}: weight_map.{tensor}: expected a file name, got {describe_json(file)}")
        if file in ("", ".", "..") or "/" in file or "\\" in file or Path(file).is_absolute():
            raise CheckpointError(f"{index}: weight_map.{tensor}: {file!r} is not a file name in {folder} "
                                  "(an index names files beside it, never paths)")
        files.add(file)
    missing = [f for f in sorted(files) if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{index}: weight_map names files that are not in {folder}: {', '.join(missing[:20])}")
    return [folder / f for f in sorted(files)]


def _safetensors_sources(files: list[Path]) -> dict[str, _Source]:
    """Lazy tensors of safetensors files, each file opened once (header and data from one open file)."""
    sources: dict[str, _Source] = {}
    for file in files:
        with open_file(file) as fh:
            try:
                header = read_header(fh, file)
                getters = map_tensors(fh, header, file)
            except OSError as exc:
                raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}") from None
        for name, entry in header.entries.items():
            if name in sources:
                raise CheckpointError(f"{file}: tensor {name} is also in another shard")
            sources[name] = _Source(entry.shape, entry.torch_dtype, getters[name])
    return sources


def _hf_sources(folder: Path) -> tuple[dict[str, _Source], str]:
    """Lazy tensors of the folder's weights by their Hugging Face names, and a description."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    binary = folder / "pytorch_model.bin"
    if single.is_file():
        return _safetensors_sources([single]), str(single)
    if index.is_file():
        return _safetensors_sources(_shard_names(index, folder)), str(index)
    if binary.is_file():
        obj = _torch_load(binary)
        if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise CheckpointError(f"{binary} does not hold a state dict")
        return {k: _Source(tuple(v.shape), v.dtype, lambda v=v: v) for k, v in obj.items()}, str(binary)
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _derive(source: _Source, shape: tuple[int, ...], fn: Callable[[Tensor], Tensor]) -> _Source:
    return _Source(shape, source.dtype, lambda: fn(source.get()))


def map_hf_to_modelkit(sources: Mapping[str, Any], *, tie_embeddings: bool = True) -> tuple[dict[str, Any], list[str]]:
    """Rename and reshape Hugging Face GPT-2 tensors to modelkit names with :data:`GPT2_KEY_MAP`.

    ``sources`` maps HF names (with or without the ``transformer.`` prefix) to tensors (or the
    loader's lazy sources). Returns the modelkit-named items and the HF names no rule matched.
    ``lm_head.weight`` is dropped when ``tie_embeddings`` (GPT-2 ties it to ``wte``).
    """
    return rename(sources, GPT2_KEY_MAP, ignored=_IGNORED, prefix=_PREFIX,
                  drop=("lm_head.weight",) if tie_embeddings else ())


def rename(sources: Mapping[str, Any], rules: Iterable[KeyRule], *, ignored: re.Pattern[str] | None = None,
           drop: Iterable[str] = (), prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """Map HF-named tensors (or lazy sources) to modelkit names with ``rules`` (every family's key map).

    Rules, ``ignored`` and ``drop`` see each name without ``prefix``; returns the mapped items and the
    full names no rule matched (the caller refuses those).
    """
    compiled = [(rule, _compile(rule)) for rule in rules]
    dropped = set(drop)
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for full, src in sources.items():
        name = full.removeprefix(prefix)
        if name in dropped or (ignored is not None and ignored.match(name)):
            continue
        for rule, pattern in compiled:
            m = pattern.match(name)
            if m is None:
                continue
            targets = [t.format(i=m.group("i")) if "{i}" in t else t for t in rule.modelkit]
            for j, target in enumerate(targets):
                out[target] = _apply(rule.how, src, j, full)
            break
        else:
            unknown.append(full)
    return out, unknown


def _apply(how: str, src: Any, j: int, name: str) -> Any:
    """One modelkit tensor (or lazy source) from a Hugging Face one."""
    lazy = isinstance(src, _Source)
    shape = tuple(src.shape)
    if how == "copy":
        return src
    if not shape:
        raise CheckpointError(f"{name}: expected a tensor with dimensions, got a scalar")
    if how == "transpose":
        if len(shape) != 2:
            raise CheckpointError(f"{name}: expected a 2-d Conv1D weight, got shape {shape}")
        new = (shape[1], shape[0])
        fn: Callable[[Tensor], Tensor] = lambda t: t.t().contiguous()  # noqa: E731
    else:
        dim = -1
        if shape[dim] % 3:
            raise CheckpointError(f"{name}: c_attn's output size {shape[dim]} is not 3 x emb_dim")
        part = shape[dim] // 3
        if how == "split_qkv_t":
            if len(shape) != 2:
                raise CheckpointError(f"{name}: expected a 2-d Conv1D weight, got shape {shape}")
            new = (part, shape[0])
            fn = lambda t: t[:, j * part:(j + 1) * part].t().contiguous()  # noqa: E731
        else:
            new = (part,)
            fn = lambda t: t[j * part:(j + 1) * part].clone()  # noqa: E731
    return _derive(src, new, fn) if lazy else fn(src)


def load_hf_gpt2(folder: str | os.PathLike[str], *,
                 spec: ModelSpec | Mapping[str, Any] | str | os.PathLike[str] | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> GPTModel:
    """Load a Hugging Face GPT-2 folder (``GPT2LMHeadModel`` or ``GPT2Model`` weights) as a modelkit
    model, in eval mode.

    Weights come from ``model.safetensors`` (or a sharded ``model.safetensors.index.json``), else
    ``pytorch_model.bin`` through ``torch.load(weights_only=True)``. The spec is ``spec`` if given
    (e.g. ``configs/pretrained/gpt2.json``), else built from the folder's ``config.json``. Raises
    :class:`CheckpointError` for unknown tensor names, a config modelkit cannot reproduce, or
    weights that do not fit the spec (listed with both shapes); no model is returned then.
    """
    root = check_folder(folder)
    if spec is not None:
        resolved = load_spec(spec)
    else:
        cfg_path = root / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"cannot read {cfg_path}: no such file (or pass spec=)")
        resolved = spec_from_hf_config(_read_json(cfg_path), name=root.resolve().name or "gpt2", source=str(cfg_path))
    return load_mapped(root, resolved, _gpt2_to_modelkit, "GPT-2", device=device, dtype=dtype)


def _gpt2_to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    return map_hf_to_modelkit(sources, tie_embeddings=spec.tie_embeddings)


def check_folder(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a Path; raises :class:`CheckpointError` if it is not a folder."""
    root = Path(folder)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a folder (expected a Hugging Face model folder with config.json)")
    return root


def load_mapped(root: Path, resolved: ModelSpec,
                to_modelkit: Callable[[Mapping[str, Any], ModelSpec], tuple[dict[str, Any], list[str]]], label: str,
                *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> GPTModel:
    """The model ``resolved`` with the weights of the Hugging Face folder ``root``, renamed by
    ``to_modelkit`` (a family's key map), in eval mode. Raises :class:`CheckpointError` naming the
    tensors ``to_modelkit`` leaves unmatched ("not part of ``label``") or that do not fit the spec."""
    sources, where = _hf_sources(root)
    mapped, unknown = to_modelkit(sources, resolved)
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" ... and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise CheckpointError(f"{where}: tensors that are not part of {label} ({len(unknown)}): {shown}")
    if dtype is not None and not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating point dtype, got {dtype}")
    target = _resolve_device(device)
    described = f"{where} (names mapped to modelkit's)"
    check_spec_fits_tensors(resolved, {k: (s.shape, s.dtype) for k, s in mapped.items()}, described)
    float_dtypes = {s.dtype for s in mapped.values() if s.dtype is not None and s.dtype.is_floating_point}
    model = build_empty(resolved, dtype=dtype or (float_dtypes.pop() if len(float_dtypes) == 1 else None))
    _load_sources(model, mapped, described, dtype=dtype, device=target, checked=True)
    if target is not None:
        model.to(target)
    return model.eval()


# -- export -------------------------------------------------------------------------------------------

def modelkit_to_hf_state_dict(model: GPTModel) -> dict[str, Tensor]:
    """The ``GPT2LMHeadModel`` state dict (``transformer.``-prefixed; ``lm_head.weight`` only when the
    head is not tied) of a modelkit model that :func:`hf_config_from_spec` accepts."""
    spec = model.spec
    hf_config_from_spec(spec)  # refuses models without a GPT-2 equivalent
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    e = spec.emb_dim
    p = _PREFIX
    dev, dt = sd["tok_emb.weight"].device, sd["tok_emb.weight"].dtype
    out: dict[str, Tensor] = {p + "wte.weight": sd["tok_emb.weight"], p + "wpe.weight": sd["pos_emb.weight"]}
    for i in range(spec.n_layers):
        b, h = f"trf_blocks.{i}.", f"{p}h.{i}."
        att = b + "att."
        out[h + "ln_1.weight"], out[h + "ln_1.bias"] = sd[b + "norm1.scale"], sd[b + "norm1.shift"]
        out[h + "attn.c_attn.weight"] = torch.cat([sd[f"{att}{w}.weight"].t() for w in _QKV], dim=1)
        out[h + "attn.c_attn.bias"] = (torch.cat([sd[f"{att}{w}.bias"] for w in _QKV]) if spec.qkv_bias
                                       else torch.zeros(3 * e, device=dev, dtype=dt))  # no bias == zero bias
        out[h + "attn.c_proj.weight"] = sd[att + "out_proj.weight"].t()
        out[h + "attn.c_proj.bias"] = sd[att + "out_proj.bias"]
        out[h + "ln_2.weight"], out[h + "ln_2.bias"] = sd[b + "norm2.scale"], sd[b + "norm2.shift"]
        out[h + "mlp.c_fc.weight"], out[h + "mlp.c_fc.bias"] = sd[b + "ff.layers.0.weight"].t(), sd[b + "ff.layers.0.bias"]
        out[h + "mlp.c_proj.weight"] = sd[b + "ff.layers.2.weight"].t()
        out[h + "mlp.c_proj.bias"] = sd[b + "ff.layers.2.bias"]
    out[p + "ln_f.weight"], out[p + "ln_f.bias"] = sd["final_norm.scale"], sd["final_norm.shift"]
    if not spec.tie_embeddings:
        out["lm_head.weight"] = sd["out_head.weight"]
    return {k: v.cpu().contiguous() for k, v in out.items()}


def _replace_files_in(folder: Path, files: Mapping[str, Callable[[Path], None]]) -> None:
    """Write every file of ``files`` into ``folder`` beside its target, then rename them all into place
    (the renames come after every write has succeeded, so a failed write changes nothing)."""
    with contextlib.ExitStack() as stack:
        for name, write in files.items():
            write(stack.enter_context(atomic_file(folder / name, what="Hugging Face file", error=CheckpointError)))


def export_hf_gpt2(model: GPTModel, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 folder (``model.safetensors`` + ``config.json``) that
    ``transformers.GPT2LMHeadModel.from_pretrained(out_dir)`` opens. Returns the folder.

    Raises :class:`CheckpointError` (before writing anything) if a component has no GPT-2
    equivalent: positions other than learned, post-norm or parallel blocks, norms without a shift,
    an activation GPT-2 configs cannot name, plugin components. ``qkv_bias`` false is exported as
    zero biases (the same function).

    Written atomically: a new folder is built beside ``out_dir`` and renamed into place; into an
    existing folder (other files in it are kept), both files are first written beside their targets
    and then renamed over them. A failure (a full disk included) raises :class:`CheckpointError` with the path and the
    OS reason and leaves ``out_dir`` as it was, without temporary files.
    """
    dtype = model.tok_emb.weight.dtype
    return write_hf_folder(hf_config_from_spec(model.spec, dtype), modelkit_to_hf_state_dict(model), out_dir)


def write_hf_folder(config: Mapping[str, Any], tensors: Mapping[str, Tensor], out_dir: str | os.PathLike[str],
                    tokenizer_json: bytes | None = None) -> Path:
    """Write ``model.safetensors`` (``tensors``), ``config.json`` (``config``) and, if given,
    ``tokenizer.json`` (those bytes) into ``out_dir``, atomically as :func:`export_hf_gpt2`
    describes. Returns the folder."""
    from safetensors.torch import save_file

    files: dict[str, Callable[[Path], None]] = {
        "model.safetensors": lambda p: save_file(dict(tensors), str(p), metadata={"format": "pt"}),
        "config.json": lambda p: write_bytes(p, (json.dumps(config, indent=2) + "\n").encode("utf-8")),
    }
    if tokenizer_json is not None:
        files["tokenizer.json"] = lambda p: write_bytes(p, tokenizer_json)
    out = Path(out_dir)
    if out.exists():  # the folder stays (it may be the working folder, or hold other files): swap its files
        _replace_files_in(out, files)
    else:
        with atomic_folder(out, what="Hugging Face folder", error=CheckpointError) as tmp:
            for name, write in files.items():
                write(tmp / name)
    return out
