"""GPT-2 (``model_type: "gpt2"``): the family entry for :mod:`modelkit.weights.hf`, which holds its
key map (:data:`~modelkit.weights.hf.GPT2_KEY_MAP`), config reading and export."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import HFFamily
from ..hf import hf_config_from_spec, map_hf_to_modelkit, modelkit_to_hf_state_dict, spec_from_hf_config
from ...spec import ModelSpec


def _to_modelkit(sources: Mapping[str, Any], spec: ModelSpec) -> tuple[dict[str, Any], list[str]]:
    return map_hf_to_modelkit(sources, tie_embeddings=spec.tie_embeddings)


GPT2 = HFFamily(model_type="gpt2", label="GPT-2", spec_from_config=spec_from_hf_config, to_modelkit=_to_modelkit,
                config_from_spec=hf_config_from_spec, to_hf=modelkit_to_hf_state_dict)
