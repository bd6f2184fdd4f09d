"""Hugging Face model families: one module per ``config.json`` ``model_type``.

Each family module (:mod:`.gpt2`, :mod:`.llama`, :mod:`.qwen2`, :mod:`.opt`, :mod:`.gpt_neox`,
:mod:`.olmo2`) defines one :class:`~.base.HFFamily`:

- ``spec_from_config(config, name, source)``: the modelkit spec of the family's ``config.json``,
  made of registered parts (the spec never names the family); a field modelkit cannot honour is
  refused with :class:`~modelkit.errors.CheckpointError` naming it;
- ``to_modelkit(sources, spec)``: the folder's tensors renamed (and reshaped) to modelkit names
  through the family's explicit key map, and the names no rule matched;
- ``config_from_spec(spec, dtype)`` and ``to_hf(model)``: the reverse, for export.

:data:`FAMILIES` maps ``model_type`` to its family; :func:`family_for` picks one and refuses an
unknown ``model_type``. :func:`load_hf` and :func:`export_hf` are the entries that dispatch on it
(``modelkit import-hf`` / ``export-hf`` call them). A new family is a new module and one line here.

Layering: the family modules use :mod:`modelkit.weights.hf` (GPT-2 and the shared folder reading,
key-map and writing machinery); nothing there imports this package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..hf import _read_json, check_folder, load_mapped, write_hf_folder
from ...errors import CheckpointError
from ...spec import ModelSpec, load_spec
from .base import HFFamily
from .gpt2 import GPT2
from .gpt_neox import GPT_NEOX
from .llama import LLAMA
from .olmo2 import OLMO2
from .opt import OPT
from .qwen2 import QWEN2

if TYPE_CHECKING:
    from pathlib import Path

    from ...model import GPTModel

FAMILIES: dict[str, HFFamily] = {family.model_type: family
                                 for family in (GPT2, LLAMA, QWEN2, OPT, GPT_NEOX, OLMO2)}


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
    ``olmo2``); without a ``config.json`` (only with ``spec=``) the folder is read as GPT-2, as
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


def export_family_of(spec: ModelSpec) -> HFFamily:
    """The family whose ``config.json`` can state ``spec`` (GPT-2 first).

    Raises :class:`CheckpointError` listing, per family, the parts with no equivalent.
    """
    refusals = []
    for family in FAMILIES.values():
        try:
            family.config_from_spec(spec, torch.float32)
        except CheckpointError as exc:
            refusals.append(str(exc))
            continue
        return family
    raise CheckpointError("\n".join(refusals))


def export_hf(model: GPTModel, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``model`` as a Hugging Face folder (``model.safetensors`` + ``config.json``) of the family
    its parts make (GPT-2, Llama, Qwen2, OPT, GPT-NeoX or OLMo 2), which ``transformers.AutoModelForCausalLM.from_pretrained`` opens.
    Returns the folder. Raises :class:`CheckpointError`, before writing anything, if no family has an
    equivalent (naming, per family, the parts that differ). Written atomically, as
    :func:`~modelkit.weights.hf.export_hf_gpt2`.
    """
    family = export_family_of(model.spec)
    config = family.config_from_spec(model.spec, model.tok_emb.weight.dtype)
    return write_hf_folder(config, family.to_hf(model), out_dir)


__all__ = ["FAMILIES", "HFFamily", "export_family_of", "export_hf", "family_for", "load_hf"]
