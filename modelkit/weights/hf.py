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
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .checkpoint import _Source, _load_sources, _resolve_device, _torch_load, build_empty
from ..errors import CheckpointError, SpecError
from ..files import atomic_file, atomic_folder, write_bytes
from ..spec import ModelSpec, load_spec

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


_RULES = tuple((rule, _compile(rule)) for rule in GPT2_KEY_MAP)


# -- config.json <-> spec ---------------------------------------------------------------------------

def spec_from_hf_config(config: Mapping[str, Any], name: str = "gpt2") -> ModelSpec:
    """The modelkit spec of a Hugging Face GPT-2 ``config.json``: its sizes, ``qkv_bias`` true,
    ``drop_rate`` 0 and ``tie_embeddings`` from ``tie_word_embeddings`` (default true).

    Raises :class:`CheckpointError` for a config that is not GPT-2 or uses a feature modelkit's
    GPT-2 parts cannot reproduce (an unknown activation, unscaled or layer-scaled attention,
    cross-attention).
    """
    problems = []
    model_type = config.get("model_type", "gpt2")
    if model_type != "gpt2":
        problems.append(f"model_type is {model_type!r}, not 'gpt2'")
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions") if k not in config]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    act = config.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        problems.append(f"activation_function {act!r} has no modelkit equivalent "
                        f"(supported: {', '.join(HF_ACTIVATIONS)})")
    if not config.get("scale_attn_weights", True):
        problems.append("scale_attn_weights false (modelkit attention always scales by 1/sqrt(head_dim))")
    if config.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx true is not supported")
    if config.get("add_cross_attention", False):
        problems.append("add_cross_attention true (an encoder-decoder GPT-2) is not supported")
    if problems:
        raise CheckpointError("cannot build a modelkit spec from this GPT-2 config: " + "; ".join(problems))
    feedforward: dict[str, Any] = {"type": "mlp", "activation": HF_ACTIVATIONS[act]}
    if config.get("n_inner") is not None:
        feedforward["hidden_dim"] = config["n_inner"]
    data = {
        "name": name, "vocab_size": config["vocab_size"], "context_length": config["n_positions"],
        "emb_dim": config["n_embd"], "n_heads": config["n_head"], "n_layers": config["n_layer"],
        "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        "positional": "learned", "norm": {"type": "layernorm", "eps": config.get("layer_norm_epsilon", 1e-5)},
        "attention": {"type": "mha"}, "feedforward": feedforward, "block": "pre_norm",
    }
    try:
        return load_spec(data)
    except SpecError as exc:
        raise CheckpointError(f"the GPT-2 config does not make a valid spec:\n{exc}") from None


def hf_config_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of a ``GPT2LMHeadModel`` equivalent to ``spec``.

    Raises :class:`CheckpointError` naming every component with no GPT-2 equivalent.
    """
    problems = []
    if spec.positional.type != "learned":
        problems.append(f"positional '{spec.positional.type}' (GPT-2 has learned absolute positions: 'learned')")
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

def _hf_sources(folder: Path) -> tuple[dict[str, _Source], str]:
    """Lazy tensors of the folder's weights by their Hugging Face names, and a description."""
    from safetensors import safe_open

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    binary = folder / "pytorch_model.bin"
    sources: dict[str, _Source] = {}
    if single.is_file() or index.is_file():
        if single.is_file():
            files = [single]
        else:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            files = [folder / f for f in sorted(set(weight_map.values()))]
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:
                raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from None
            for name in handle.keys():
                sl = handle.get_slice(name)
                dtype = _safetensors_dtype(sl.get_dtype())
                sources[name] = _Source(tuple(sl.get_shape()), dtype, lambda h=handle, n=name: h.get_tensor(n))
        return sources, str(single if single.is_file() else index)
    if binary.is_file():
        obj = _torch_load(binary)
        if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise CheckpointError(f"{binary} does not hold a state dict")
        return {k: _Source(tuple(v.shape), v.dtype, lambda v=v: v) for k, v in obj.items()}, str(binary)
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _safetensors_dtype(code: str) -> torch.dtype | None:
    from .checkpoint import _ST_DTYPES

    return _ST_DTYPES.get(code)


def _derive(source: _Source, shape: tuple[int, ...], fn: Callable[[Tensor], Tensor]) -> _Source:
    return _Source(shape, source.dtype, lambda: fn(source.get()))


def map_hf_to_modelkit(sources: Mapping[str, Any], *, tie_embeddings: bool = True) -> tuple[dict[str, Any], list[str]]:
    """Rename and reshape Hugging Face GPT-2 tensors to modelkit names with :data:`GPT2_KEY_MAP`.

    ``sources`` maps HF names (with or without the ``transformer.`` prefix) to tensors (or the
    loader's lazy sources). Returns the modelkit-named items and the HF names no rule matched.
    ``lm_head.weight`` is dropped when ``tie_embeddings`` (GPT-2 ties it to ``wte``).
    """
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for full, src in sources.items():
        key = full.removeprefix(_PREFIX)
        if _IGNORED.match(key) or (key == "lm_head.weight" and tie_embeddings):
            continue
        for rule, pattern in _RULES:
            m = pattern.match(key)
            if m is None:
                continue
            names = [n.format(i=m.group("i")) if "{i}" in n else n for n in rule.modelkit]
            for j, name in enumerate(names):
                out[name] = _apply(rule.how, src, j, full)
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
    root = Path(folder)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a folder (expected a Hugging Face model folder with config.json)")
    if spec is not None:
        resolved = load_spec(spec)
    else:
        cfg_path = root / "config.json"
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CheckpointError(f"cannot read {cfg_path}: {exc.strerror or exc} (or pass spec=)") from None
        except ValueError as exc:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from None
        resolved = spec_from_hf_config(config, name=root.resolve().name or "gpt2")
    sources, where = _hf_sources(root)
    mapped, unknown = map_hf_to_modelkit(sources, tie_embeddings=resolved.tie_embeddings)
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" ... and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise CheckpointError(f"{where}: tensors that are not part of GPT-2 ({len(unknown)}): {shown}")
    if dtype is not None and not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating point dtype, got {dtype}")
    target = _resolve_device(device)
    float_dtypes = {s.dtype for s in mapped.values() if s.dtype is not None and s.dtype.is_floating_point}
    model = build_empty(resolved, dtype=dtype or (float_dtypes.pop() if len(float_dtypes) == 1 else None))
    _load_sources(model, mapped, f"{where} (names mapped to modelkit's)", dtype=dtype, device=target)
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
    from safetensors.torch import save_file

    dtype = model.tok_emb.weight.dtype
    config = hf_config_from_spec(model.spec, dtype)
    tensors = modelkit_to_hf_state_dict(model)
    files: dict[str, Callable[[Path], None]] = {
        "model.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        "config.json": lambda p: write_bytes(p, (json.dumps(config, indent=2) + "\n").encode("utf-8")),
    }
    out = Path(out_dir)
    if out.exists():  # the folder stays (it may be the working folder, or hold other files): swap its files
        _replace_files_in(out, files)
    else:
        with atomic_folder(out, what="Hugging Face folder", error=CheckpointError) as tmp:
            for name, write in files.items():
                write(tmp / name)
    return out
