"""Phi (Phi-2) parity with Hugging Face transformers: ``PhiForCausalLM`` folders imported and exported.

Tiny randomly initialised ``transformers.PhiForCausalLM``s (every parameter perturbed, so biases,
the head's bias included, are nonzero and norm weights are not ones) are saved with
``save_pretrained`` and checked through :mod:`hf_parity` (logits, greedy tokens, cache, CLI round
trip, runtime, meta counts). Also: partial rotary, the shared norm and the head's bias matter, both
RoPE field forms are read, unsupported or malformed configs are refused naming the field, and
export picks Phi. No downloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_parity import (CONFIGS, TOL, FamilyParity, batch, check_config_refused, check_logits, check_meta_count,
                       check_tensor_refused, hf_logits, max_diff, perturbed, save_tiny)
from modelkit import CheckpointError, build_model, load_spec
from modelkit.weights.hf_families import export_family_of, export_hf, load_hf
from modelkit.weights.hf_families.phi import spec_from_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("modelkit_llama")

BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
VARIANTS: dict[str, dict[str, Any]] = {
    # Phi-2's shape: as many key/value heads as heads, int(16 * 0.4) = 6 of 16 dims rotated, tanh GELU, untied
    "phi2-like": dict(partial_rotary_factor=0.4, hidden_act="gelu_new", tie_word_embeddings=False),
    # GQA, PhiConfig's default rotary fraction (0.5), exact GELU, tied weight (the head's bias stays its own)
    "gqa-tied": dict(num_key_value_heads=2, hidden_act="gelu", tie_word_embeddings=True, layer_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


def make_hf(seed: int = 0, **kw: Any) -> Any:
    """A perturbed random ``PhiForCausalLM`` (eval mode, float32)."""
    torch.manual_seed(seed)
    return perturbed(transformers.PhiForCausalLM(transformers.PhiConfig(**{**BASE, **kw})), seed)


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    hf = make_hf(**VARIANTS[request.param])
    return request.param, hf, save_tiny(hf, tmp_path_factory.mktemp(f"phi-{request.param}"))


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


class TestParity(FamilyParity):
    architecture = "PhiForCausalLM"

    def check_export(self, back: Any, hf: Any) -> None:
        """The export holds transformers' own tensors, bit for bit (the head's bias included)."""
        assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
        for key, tensor in hf.state_dict().items():
            assert torch.equal(back.state_dict()[key], tensor), key


def test_spec_is_registered_parts(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    model = load_hf(folder)
    spec = model.spec
    assert spec.block.type == "parallel" and spec.block.params == {"shared_norm": True}
    assert spec.head_bias and spec.qkv_bias and spec.attention.params["out_bias"]
    assert spec.tie_embeddings == hf.config.tie_word_embeddings
    assert spec.positional.params["rotary_fraction"] == hf.config.rope_parameters["partial_rotary_factor"]
    assert torch.equal(model.out_head.bias, hf.lm_head.bias)


def test_partial_rotary_and_head_bias_matter(hf_folder: tuple[str, Any, Path]) -> None:
    """Rotating whole heads, or dropping the head's bias, changes the logits: parity covers both."""
    name, hf, folder = hf_folder
    x = batch(hf.config.vocab_size, 10, seed=4)
    ref = hf_logits(hf, x)
    model = load_hf(folder)
    model.pos_emb.rotary_dims = 16
    with torch.no_grad():
        assert max_diff(model(x), ref) > 1e-2
    model = load_hf(folder)
    with torch.no_grad():
        model.out_head.bias.zero_()
        assert max_diff(model(x), ref) > 1e-2


def test_export_writes_a_zero_head_bias_for_a_head_without_one(tmp_path: Path) -> None:
    data = spec_from_config({**BASE, "model_type": "phi"}).model_dump()
    data["head_bias"] = False
    model = build_model(data)
    export_hf(model, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "PhiForCausalLM"
    assert torch.equal(back.lm_head.bias, torch.zeros(300))
    x = batch(300, 12, seed=5)
    with torch.no_grad():
        assert max_diff(hf_logits(back, x), model(x)) < TOL


def test_export_picks_phi_and_not_gpt_neox() -> None:
    spec = spec_from_config({**BASE, "model_type": "phi"})
    assert export_family_of(spec).model_type == "phi"
    with pytest.raises(CheckpointError, match="no GPT-NeoX equivalent(.|\n)*shared_norm false"):
        export_family_of(spec, "gpt_neox")
    two_norms = spec.model_copy(update={"block": spec.block.model_copy(update={"params": {"shared_norm": False}})})
    with pytest.raises(CheckpointError, match="no Phi equivalent(.|\n)*shared_norm true"):
        export_family_of(two_norms, "phi")


def test_both_rope_field_forms_are_read(tmp_path: Path) -> None:
    """transformers 5's ``rope_parameters`` and the older top-level ``rope_theta`` /
    ``partial_rotary_factor`` / ``rope_scaling: null`` (as Phi-2's own config.json) give the same spec
    and logits; without any factor, Phi's default 0.5."""
    hf = make_hf(partial_rotary_factor=0.4, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    hf.save_pretrained(tmp_path)
    new = _config(tmp_path)
    assert new["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.4}
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=500.0, rope_scaling=None, partial_rotary_factor=0.4)
    assert spec_from_config(old) == spec_from_config(new)
    (tmp_path / "config.json").write_text(json.dumps(old))
    check_logits(load_hf(tmp_path), hf, "phi old rope fields")
    bare = {k: v for k, v in old.items() if k != "partial_rotary_factor"}
    assert spec_from_config(bare).positional.params["rotary_fraction"] == 0.5


@pytest.mark.parametrize("change, field", [
    ({"qk_layernorm": True}, "qk_layernorm true"),
    ({"qk_layernorm": "no"}, "qk_layernorm"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     "rope_parameters.rope_type 'linear'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type 'dynamic'"),
    ({"hidden_act": "gelu_fast"}, "hidden_act 'gelu_fast'"),
    ({"head_dim": 32}, "head_dim 32"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
    ({"partial_rotary_factor": 0.25},
     "partial_rotary_factor 0.25 and rope_parameters.partial_rotary_factor 0.4 differ"),
    ({"partial_rotary_factor": 0, "rope_parameters": None}, "partial_rotary_factor 0 is not in (0, 1]"),
    ({"layer_norm_eps": -1.0}, "layer_norm_eps"),
    ({"resid_pdrop": "0.1"}, "resid_pdrop"),
])
def test_unsupported_or_malformed_configs_are_refused(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    check_config_refused(make_hf(**VARIANTS["phi2-like"]), tmp_path, change, field)


@pytest.mark.parametrize("extra", ["model.layers.0.self_attn.q_layernorm.weight",
                                   "model.layers.1.post_attention_layernorm.bias"])
def test_unknown_tensor_is_refused(tmp_path: Path, extra: str) -> None:
    check_tensor_refused(make_hf(**VARIANTS["phi2-like"]), tmp_path, extra, "Phi", torch.ones(16))


PHI_2: dict[str, Any] = dict(
    model_type="phi", architectures=["PhiForCausalLM"], vocab_size=51200, hidden_size=2560,
    intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    max_position_embeddings=2048, partial_rotary_factor=0.4, rope_theta=10000.0, rope_scaling=None,
    layer_norm_eps=1e-5, hidden_act="gelu_new", qk_layernorm=False, tie_word_embeddings=False,
    resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, bos_token_id=50256, eos_token_id=50256)


def test_phi_2_spec_matches_its_hf_config() -> None:
    assert spec_from_config(PHI_2, name="phi-2") == load_spec(CONFIGS / "phi-2.json")


def test_phi_2_spec_counts_what_transformers_counts() -> None:
    config = transformers.PhiConfig(**{k: v for k, v in PHI_2.items() if k != "model_type"})
    check_meta_count("phi-2.json", transformers.PhiForCausalLM, config, 2_779_683_840)
