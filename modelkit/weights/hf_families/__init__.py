"""Hugging Face model families: one module per ``config.json`` ``model_type``.

Each family module (:mod:`.gpt2`, :mod:`.llama`, :mod:`.qwen2`, :mod:`.opt`, :mod:`.gpt_neox`,
:mod:`.mistral`, :mod:`.bloom`, ...; :data:`FAMILIES` lists them) defines one :class:`~.base.HFFamily`:

- ``spec_from_config(config, name, source)``: the modelkit spec of the family's ``config.json``,
  made of registered parts (the spec never names the family); a field modelkit cannot honour is
  refused with :class:`~modelkit.errors.CheckpointError` naming it;
- ``to_modelkit(sources, spec)``: the folder's tensors renamed (and reshaped) to modelkit names
  through the family's explicit key map, and the names no rule matched;
- ``config_from_spec(spec, dtype)`` and ``to_hf(model)``: the reverse, for export.

:data:`FAMILIES` maps ``model_type`` to its family; :func:`family_for` picks one and refuses an
unknown ``model_type``. :func:`load_hf` and :func:`export_hf` are the entries that dispatch on it
(``modelkit import-hf`` / ``export-hf`` call :func:`import_hf` and :func:`export_hf`, which carry
the folder's ``tokenizer.json`` into the checkpoint and back: :func:`folder_tokenizer`). A new
family is a new module and one line here.

Layering: the family modules use :mod:`modelkit.weights.hf` (GPT-2 and the shared folder reading,
key-map and writing machinery); nothing there imports this package.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..hf import _read_json, check_folder, load_mapped, write_hf_folder
from ...errors import CheckpointError
from ...spec import ModelSpec, load_spec
from .base import HFFamily
from .bloom import BLOOM
from .gemma import GEMMA
from .gemma2 import GEMMA2
from .gpt2 import GPT2
from .gpt_neox import GPT_NEOX
from .llama import LLAMA
from .mistral import MISTRAL
from .olmo2 import OLMO2
from .opt import OPT
from .phi import PHI
from .phi3 import PHI3
from .qwen2 import QWEN2
from .qwen3 import QWEN3

if TYPE_CHECKING:
    from ...hf_tokenizer import HFTokenizer
    from ...model import GPTModel

FAMILIES: dict[str, HFFamily] = {family.model_type: family for family in (
    GPT2,
    LLAMA,
    QWEN2,
    OPT,
    GPT_NEOX,
    MISTRAL,
    BLOOM,
    PHI3,
    PHI,
    GEMMA,
    GEMMA2,
    OLMO2,
    QWEN3,
)}


def family_for(config: Any, source: str = "config.json") -> HFFamily:
    """The family of a parsed ``config.json`` by its ``model_type`` (missing: ``gpt2``, as GPT-2's
    own loader always read it). Raises :class:`CheckpointError` naming ``model_type`` and the
    supported ones for anything else."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{source}: a Hugging Face config must be a JSON object")
    model_type = config.get("model_type", "gpt2")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(sorted(FAMILIES))})")
    return family


def load_hf(folder: str | os.PathLike[str], *,
            spec: ModelSpec | Mapping[str, Any] | str | os.PathLike[str] | None = None,
            device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> GPTModel:
    """Load a Hugging Face model folder of any supported family as a modelkit model, in eval mode.

    The family is ``config.json``'s ``model_type`` (``gpt2``, ``llama``, ``qwen2``, ``opt``, ``gpt_neox``,
    ...; see :data:`FAMILIES`); without a ``config.json`` (only with ``spec=``) the folder is read as GPT-2, as
    :func:`~modelkit.weights.hf.load_hf_gpt2` does. Weights come from ``model.safetensors`` (or a
    sharded ``model.safetensors.index.json``), else ``pytorch_model.bin`` through
    ``torch.load(weights_only=True)``, renamed by the family's explicit key map. The spec is
    ``spec`` if given, else the family's spec of ``config.json``. Raises :class:`CheckpointError`
    for an unsupported ``model_type``, a config field modelkit cannot honour (named), unknown
    tensor names, or weights that do not fit the spec (listed with both shapes).
    """
    root = check_folder(folder)
    cfg_path = root / "config.json"
    config = _read_json(cfg_path) if cfg_path.exists() else None
    if config is None and spec is None:
        raise CheckpointError(f"cannot read {cfg_path}: no such file (or pass spec=)")
    family = family_for(config, str(cfg_path)) if config is not None else GPT2
    if spec is not None:
        resolved = load_spec(spec)
    else:
        resolved = family.spec_from_config(config, root.resolve().name or family.model_type, str(cfg_path))
    return load_mapped(root, resolved, family.to_modelkit, family.label, device=device, dtype=dtype)


def _eos_token_id(config: Any, source: str) -> int | None:
    """``config.json``'s ``eos_token_id``: an id, the first of a list of ids, or None when absent/null."""
    value = config.get("eos_token_id") if isinstance(config, Mapping) else None
    if isinstance(value, list) and value:
        value = value[0]
    if value is None or value == []:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointError(f"{source}: eos_token_id must be a token id (a whole number >= 0) or a list of "
                              f"them, got {value!r}")
    return value


def folder_tokenizer(folder: str | os.PathLike[str]) -> HFTokenizer | Literal["gpt2"] | None:
    """The tokenizer of a Hugging Face folder: its ``tokenizer.json`` (with ``config.json``'s
    ``eos_token_id`` as end-of-text id) when it has one; else ``"gpt2"`` for a GPT-2 folder (its
    ``model_type``, or no ``config.json``), the built-in tokenizer; else None (none is known).
    Raises :class:`CheckpointError` for a tokenizer.json that is not a readable tokenizer (too large,
    not JSON, not a regular file) or an end-of-text id it does not have."""
    from ...hf_tokenizer import HFTokenizer, TokenizerFileError

    root = check_folder(folder)
    cfg_path = root / "config.json"
    config = _read_json(cfg_path) if cfg_path.exists() else None
    file = root / "tokenizer.json"
    if not os.path.lexists(file):
        gpt2 = config is None or family_for(config, str(cfg_path)) is GPT2
        return "gpt2" if gpt2 else None
    eos = _eos_token_id(config, str(cfg_path))
    try:
        return HFTokenizer.from_file(file, eos)
    except TokenizerFileError as exc:
        raise CheckpointError(str(exc)) from None


def import_hf(folder: str | os.PathLike[str], output: str | os.PathLike[str], *,
              spec: ModelSpec | Mapping[str, Any] | str | os.PathLike[str] | None = None,
              dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> GPTModel:
    """Convert a Hugging Face folder into the modelkit checkpoint ``output`` and return the model.

    The model is :func:`load_hf`'s; the checkpoint records the folder's tokenizer
    (:func:`folder_tokenizer`; a ``tokenizer.json`` is stored in it), ``metadata`` (default
    ``{"source": "hf:FOLDER"}``) and the folder's ``model_type`` (:data:`HF_MODEL_TYPE_KEY`). The tokenizer is read first, so a bad one is refused before any
    weights; one with more tokens than the model's ``vocab_size`` is refused too
    (:class:`CheckpointError`), and nothing is written then.
    """
    from ..checkpoint import save_checkpoint

    tokenizer = folder_tokenizer(folder)
    model = load_hf(folder, spec=spec, dtype=dtype)
    extra = dict(metadata) if metadata is not None else {"source": f"hf:{folder}"}
    config = _read_json(Path(folder) / "config.json") if (Path(folder) / "config.json").exists() else None
    extra[HF_MODEL_TYPE_KEY] = family_for(config).model_type if config is not None else "gpt2"
    save_checkpoint(model, output, metadata=extra, tokenizer=tokenizer)
    return model


#: The checkpoint metadata key where :func:`import_hf` records the folder's ``model_type``, which
#: ``modelkit export-hf`` writes back by default (when that family can still state the model).
HF_MODEL_TYPE_KEY = "hf_model_type"


def default_export_type(spec: ModelSpec, metadata: Mapping[str, str]) -> str | None:
    """The ``model_type`` a checkpoint was imported from (``metadata[HF_MODEL_TYPE_KEY]``) if that family
    can state ``spec``, else None (the first family that can is chosen): a Phi-3 import exports as
    Phi-3, not as the Llama it is equivalent to."""
    recorded = metadata.get(HF_MODEL_TYPE_KEY)
    if recorded not in FAMILIES:
        return None
    try:
        export_family_of(spec, recorded)
    except CheckpointError:
        return None
    return recorded


def export_family_of(spec: ModelSpec, model_type: str | None = None) -> HFFamily:
    """The family whose ``config.json`` can state ``spec``: the first of :data:`FAMILIES` (GPT-2
    first, in registration order) that can, or only ``model_type``'s when it is given (a spec some
    families share, such as Llama's parts without biases, which Phi-3 can also state).

    Raises :class:`CheckpointError` for an unknown ``model_type`` (naming the supported ones) or
    listing, per family tried, the parts with no equivalent.
    """
    if model_type is not None and model_type not in FAMILIES:
        raise CheckpointError(f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})")
    refusals = []
    for family in FAMILIES.values() if model_type is None else (FAMILIES[model_type],):
        try:
            family.config_from_spec(spec, torch.float32)
        except CheckpointError as exc:
            refusals.append(str(exc))
            continue
        return family
    raise CheckpointError("\n".join(refusals))


def export_hf(model: GPTModel, out_dir: str | os.PathLike[str], *, model_type: str | None = None,
              tokenizer_json: bytes | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder (``model.safetensors`` + ``config.json``, and
    ``tokenizer.json`` holding ``tokenizer_json`` when given) of the family its parts make (see
    :data:`FAMILIES`; ``model_type``'s if given, see :func:`export_family_of`), which
    ``transformers.AutoModelForCausalLM.from_pretrained`` opens.
    Returns the folder. Raises :class:`CheckpointError`, before writing anything, if no family has an
    equivalent (naming, per family, the parts that differ). Written atomically, as
    :func:`~modelkit.weights.hf.export_hf_gpt2`.
    """
    family = export_family_of(model.spec, model_type)
    config = family.config_from_spec(model.spec, model.tok_emb.weight.dtype)
    return write_hf_folder(config, family.to_hf(model), out_dir, tokenizer_json)


__all__ = ["FAMILIES", "HFFamily", "export_family_of", "export_hf", "family_for", "folder_tokenizer", "import_hf",
           "load_hf"]
