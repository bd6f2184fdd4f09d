"""Llama, Mistral and Qwen2 configs with a ``head_dim`` of their own (not ``hidden_size /
num_attention_heads``), which transformers' attention honours: the spec states it (``head_dim``), the
logits, greedy tokens and cache match transformers, and the export writes it back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hf_parity import check_cli_roundtrip, check_family, perturbed, save_tiny

transformers = pytest.importorskip("transformers")

BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_head_dim_of_its_own_matches_transformers(family: str, tmp_path: Path) -> None:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**BASE, **extra)
    hf = perturbed(getattr(transformers, model_cls)(config))
    assert hf.model.layers[0].self_attn.q_proj.weight.shape == (4 * 24, 64)
    folder = save_tiny(hf, tmp_path / "hf")
    model = check_family(folder, hf, f"{family} head_dim 24")
    assert model.spec.head_dim == 24 and model.trf_blocks[0].att.W_query.weight.shape == (96, 64)
    back = check_cli_roundtrip(folder, hf, tmp_path, model_cls, f"{family} head_dim 24")
    assert back.config.head_dim == 24
