"""OLMo 2 parity with Hugging Face transformers: ``Olmo2ForCausalLM`` folders imported and exported.

Tiny randomly initialised ``transformers.Olmo2ForCausalLM``s (GQA; untied, and tied with attention
biases; every parameter perturbed, so the q/k norms and the post-sub-layer norms are not ones) are
saved with ``save_pretrained`` and checked through :mod:`hf_parity` (logits, greedy tokens, cache,
CLI round trip, runtime, meta counts, refusals); the rest are OLMo 2's own: each norm matters, the
q/k norms span the whole projections, export's choice of family, the OLMo-2-1B spec. No downloads.
Run with ``pytest -s`` to see the differences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hf_parity import (CONFIGS, FamilyParity, batch, check_config_refused, check_meta_count, check_tensor_refused,
                       hf_logits, max_diff, perturbed, save_tiny)
from modelkit import CheckpointError, build_model, load_spec
from modelkit.weights.hf_families import export_family_of, export_hf, load_hf
from modelkit.weights.hf_families.olmo2 import spec_from_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("modelkit_llama")
pytest.importorskip("modelkit_olmo")

BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
VARIANTS: dict[str, dict[str, Any]] = {
    "untied": dict(tie_word_embeddings=False),
    "biased tied": dict(attention_bias=True, tie_word_embeddings=True),
}


def make_hf(seed: int = 0, **kw: Any) -> Any:
    """A perturbed random ``Olmo2ForCausalLM`` (eval mode, float32)."""
    torch.manual_seed(seed)
    config = transformers.Olmo2Config(**{**BASE, **kw}, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return perturbed(transformers.Olmo2ForCausalLM(config), seed)


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    hf = make_hf(**VARIANTS[request.param])
    return request.param, hf, save_tiny(hf, tmp_path_factory.mktemp("olmo2"))


class TestParity(FamilyParity):
    architecture = "Olmo2ForCausalLM"

    def check_export(self, back: Any, hf: Any) -> None:
        assert back.config.rms_norm_eps == 1e-6 and back.config.num_key_value_heads == 2
        assert back.config.attention_bias == hf.config.attention_bias
        assert back.config.eos_token_id is None and back.config.pad_token_id is None  # not Olmo2Config's 50279, 1


def test_spec_is_registered_parts(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    spec = load_hf(folder).spec
    assert spec.block.type == "olmo.post_norm"
    att = spec.attention.params
    assert (att["num_kv_heads"], att["out_bias"], att["qk_norm"], att["qk_norm_eps"]) == (
        2, hf.config.attention_bias, "projection", 1e-6)
    assert att["sliding_window"] is None and att["softcap"] is None and att["query_scale"] is None
    assert spec.norm.params == {"eps": 1e-6} and spec.qkv_bias == hf.config.attention_bias
    assert spec.tie_embeddings == hf.config.tie_word_embeddings


@pytest.mark.parametrize("norms", ["q_norm", "k_norm", "norm1", "norm2"])
def test_each_norm_matters(hf_folder: tuple[str, Any, Path], norms: str) -> None:
    """Resetting one kind of norm weight to ones changes the logits: parity covers every norm."""
    _, hf, folder = hf_folder
    model = load_hf(folder)
    x = batch(hf.config.vocab_size, 10, seed=4)
    with torch.no_grad():
        for block in model.trf_blocks:
            owner = block.att if norms in ("q_norm", "k_norm") else block
            getattr(owner, norms).weight.fill_(1.0)
        assert max_diff(model(x), hf_logits(hf, x)) > 1e-2


def test_the_q_norm_spans_the_whole_projection(hf_folder: tuple[str, Any, Path]) -> None:
    """OLMo 2 normalises q over all heads at once: per-head norms (Qwen3's) give other logits."""
    _, hf, folder = hf_folder
    model = load_hf(folder)
    assert tuple(model.trf_blocks[0].att.q_norm.weight.shape) == (64,)
    assert tuple(model.trf_blocks[0].att.k_norm.weight.shape) == (32,)
    x = batch(hf.config.vocab_size, 10, seed=4)
    with torch.no_grad():
        for block in model.trf_blocks:
            block.att.qk_norm = "head"
            block.att.q_norm.weight.data = block.att.q_norm.weight.data[:16]
            block.att.k_norm.weight.data = block.att.k_norm.weight.data[:16]
        assert max_diff(model(x), hf_logits(hf, x)) > 1e-2


def test_rope_theta_read_from_either_field_form() -> None:
    new = spec_from_config(dict(BASE, model_type="olmo2"))
    old_form = {k: v for k, v in BASE.items() if k != "rope_parameters"}
    old = spec_from_config(dict(old_form, model_type="olmo2", rope_theta=500000, rope_scaling=None))
    assert new == old and new.positional.params["theta"] == 500000.0
    default = spec_from_config(dict(old_form, model_type="olmo2"))
    assert default.positional.params["theta"] == 10000.0


def test_olmo2_defaults_are_transformers() -> None:
    """Fields left out take ``Olmo2Config``'s defaults (rms_norm_eps 1e-5, 2048 positions, untied)."""
    minimal = {k: BASE[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads")}
    spec = spec_from_config(dict(minimal, model_type="olmo2"))
    ref = transformers.Olmo2Config(**minimal, eos_token_id=None)
    assert spec.norm.params["eps"] == ref.rms_norm_eps == spec.attention.params["qk_norm_eps"]
    assert spec.context_length == ref.max_position_embeddings
    assert spec.tie_embeddings == ref.tie_word_embeddings
    assert spec.attention.params["num_kv_heads"] == ref.num_key_value_heads


@pytest.mark.parametrize("change, field", [
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     "rope_parameters.rope_type 'linear'"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling.rope_type 'dynamic'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"head_dim": 32}, "head_dim 32"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    ({"model_type": "olmo"}, "model_type"),
])
def test_unsupported_or_malformed_configs_are_refused(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    check_config_refused(make_hf(), tmp_path, change, field)


@pytest.mark.parametrize("extra", ["model.layers.0.input_layernorm.weight",  # OLMo 2 has no pre-sub-layer norm
                                   "model.layers.1.mlp.up_proj.bias"])
def test_unknown_tensor_is_refused(tmp_path: Path, extra: str) -> None:
    check_tensor_refused(make_hf(), tmp_path, extra, "OLMo 2")


def test_export_picks_olmo2_only_for_its_parts() -> None:
    spec = spec_from_config(dict(BASE, model_type="olmo2"))
    assert export_family_of(spec).model_type == "olmo2"
    data = spec.model_dump()
    data["attention"]["qk_norm"] = "none"  # a Llama model arranged as OLMo 2: neither family states it
    with pytest.raises(CheckpointError, match="attention qk_norm 'none' \\(OLMo 2's is 'projection'\\)"):
        export_family_of(load_spec(data))
    data["block"] = "pre_norm"
    assert export_family_of(load_spec(data)).model_type == "llama"


@pytest.mark.parametrize("change, problem", [
    ({"attention": {"qk_norm_eps": 1e-3}}, "attention qk_norm_eps 0.001 differs from norm eps 1e-06"),
    ({"attention": {"qk_norm": "head"}}, "attention qk_norm 'head'"),
    ({"feedforward": {"bias": True}}, "feedforward bias true"),
    ({"attention": {"out_bias": True}}, "out_bias differs from qkv_bias"),
    ({"block": "post_norm"}, "block 'post_norm'"),
    ({"positional": {"scaling": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_context_length": 64}}, "positional scaling 'llama3'"),
])
def test_export_refuses_what_olmo2_cannot_state(tmp_path: Path, change: dict[str, Any], problem: str) -> None:
    data = spec_from_config(dict(BASE, model_type="olmo2")).model_dump()
    for slot, value in change.items():
        data[slot] = {**data[slot], **value} if isinstance(value, dict) else value
    with pytest.raises(CheckpointError, match="no OLMo 2 equivalent") as info:
        export_hf(build_model(data), tmp_path / "out")
    assert problem in str(info.value)
    assert not (tmp_path / "out").exists()


OLMO2_1B: dict[str, Any] = dict(
    model_type="olmo2", architectures=["Olmo2ForCausalLM"], vocab_size=100352, hidden_size=2048,
    intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
    max_position_embeddings=4096, rope_theta=500000, rope_scaling=None, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0, hidden_act="silu",
    eos_token_id=100257, pad_token_id=100277)


def test_olmo2_1b_spec_matches_its_hf_config() -> None:
    assert spec_from_config(OLMO2_1B, name="olmo-2-1b") == load_spec(CONFIGS / "olmo-2-1b.json")


def test_olmo2_1b_spec_counts_what_transformers_counts() -> None:
    config = transformers.Olmo2Config(**{k: v for k, v in OLMO2_1B.items() if k != "model_type"})
    check_meta_count("olmo-2-1b.json", transformers.Olmo2ForCausalLM, config, 1_484_916_736)
