"""Qwen2 parity with Hugging Face transformers: ``Qwen2ForCausalLM`` folders imported and exported.

Tiny randomly initialised ``transformers.Qwen2ForCausalLM``s (every parameter perturbed, so the
q/k/v biases are nonzero and norm weights are not ones) are saved with ``save_pretrained`` and loaded
with the shared checks of ``tests/hf_parity.py`` (logits, greedy tokens, cache, ``import-hf`` /
``export-hf``, the runtime); the rest are Qwen2's own: the biases, export's choice of family,
refusals, the Qwen2.5-0.5B spec. No downloads. Run with ``pytest -s`` to see the max abs logit
differences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import hf_parity
from hf_parity import CONFIGS, FamilyParity, check_config_refused, check_meta_count, check_tensor_refused, perturbed, \
    save_tiny
from modelkit import CheckpointError, build_model, load_spec
from modelkit.introspect import count_parameters
from modelkit.weights.hf_families import export_family_of, export_hf, load_hf
from modelkit.weights.hf_families.qwen2 import spec_from_config

transformers = pytest.importorskip("transformers")

BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
VARIANTS: dict[str, dict[str, Any]] = {
    "tied": dict(tie_word_embeddings=True),
    "untied": dict(tie_word_embeddings=False, rms_norm_eps=1e-5),
}


def make_hf(kw: dict[str, Any], seed: int = 0) -> Any:
    """A perturbed random ``Qwen2ForCausalLM`` (eval mode, eager attention, float32)."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**BASE, **kw, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return perturbed(transformers.Qwen2ForCausalLM(config), seed)


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    hf = make_hf(VARIANTS[request.param])
    return request.param, hf, save_tiny(hf, tmp_path_factory.mktemp(f"qwen2-{request.param}"))


def test_saved_folder_has_qkv_biases_and_no_o_proj_bias(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2"
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.bias").abs().min() > 0
    assert {f"model.layers.1.self_attn.{p}_proj.bias" for p in "qkv"} <= keys
    assert "model.layers.0.self_attn.o_proj.bias" not in keys
    assert ("lm_head.weight" in keys) == (not hf.config.tie_word_embeddings)


class TestParity(FamilyParity):
    architecture = "Qwen2ForCausalLM"


def test_spec_has_qkv_biases_and_no_out_bias(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    model = load_hf(folder)
    assert model.spec.qkv_bias and model.spec.attention.params["out_bias"] is False
    assert model.spec.tie_embeddings == hf.config.tie_word_embeddings


def test_qkv_biases_matter(hf_folder: tuple[str, Any, Path]) -> None:
    """Dropping the q/k/v biases changes transformers' logits, so the parity above covers them."""
    name, hf, folder = hf_folder
    model = load_hf(folder)
    x = torch.randint(0, hf.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for block in model.trf_blocks:
            block.att.W_key.bias.zero_()
        assert (model(x) - hf(x).logits).abs().max().item() > 1e-2


def test_export_picks_the_family_by_attention_biases() -> None:
    spec = spec_from_config(dict(BASE, model_type="qwen2"))
    assert export_family_of(spec).model_type == "qwen2"
    no_bias = spec.model_copy(update={"qkv_bias": False})
    assert export_family_of(no_bias).model_type == "llama"


def test_export_refuses_what_qwen2_cannot_state(tmp_path: Path) -> None:
    data = spec_from_config(dict(BASE, model_type="qwen2")).model_dump()
    data["feedforward"]["bias"] = True  # neither Llama (out_bias false) nor Qwen2 (no MLP bias)
    with pytest.raises(CheckpointError, match="no Qwen2 equivalent(.|\n)*feedforward bias true"):
        export_hf(build_model(data), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, field", [
    ({"layer_types": ["full_attention", "sliding_attention"]},
     "layer_types has 'sliding_attention' layers but use_sliding_window false"),
    ({"use_sliding_window": True, "sliding_window": None, "layer_types": ["sliding_attention"] * 2},
     "sliding_window null"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types ['chunked_attention']"),
    ({"layer_types": ["full_attention"]}, "layer_types has 1 entries for num_hidden_layers 2"),
    ({"use_sliding_window": True, "sliding_window": 0}, "sliding_window"),
    ({"max_window_layers": -1}, "max_window_layers"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_parameters.rope_type 'yarn'"),
    ({"rope_parameters": None, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type 'linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
     "rope_parameters.rope_type 'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
    ({"use_sliding_window": "no"}, "use_sliding_window"),
])
def test_unsupported_or_malformed_configs_are_refused(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    check_config_refused(make_hf(VARIANTS["untied"]), tmp_path, change, field)


@pytest.mark.parametrize("extra", ["model.layers.0.self_attn.o_proj.bias", "model.layers.1.mlp.up_proj.bias",
                                   "model.layers.0.self_attn.q_norm.weight"])
def test_unknown_tensor_is_refused(tmp_path: Path, extra: str) -> None:
    check_tensor_refused(make_hf(VARIANTS["untied"]), tmp_path, extra, "Qwen2")


QWEN25_05B: dict[str, Any] = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896,
    intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0,
    hidden_act="silu", use_sliding_window=False, sliding_window=32768, max_window_layers=21, rope_scaling=None)


def test_qwen2_5_0_5b_spec_counts_its_parameters() -> None:
    model = build_model(CONFIGS / "qwen2.5-0.5b.json", device="meta")
    assert count_parameters(model).total == 494_032_768


def test_qwen2_5_0_5b_spec_matches_its_hf_config() -> None:
    assert spec_from_config(QWEN25_05B, name="qwen2.5-0.5b") == load_spec(CONFIGS / "qwen2.5-0.5b.json")


def test_qwen2_5_0_5b_spec_counts_what_transformers_counts() -> None:
    config = transformers.Qwen2Config(**{k: v for k, v in QWEN25_05B.items() if k != "model_type"})
    check_meta_count("qwen2.5-0.5b.json", transformers.Qwen2ForCausalLM, config, 494_032_768)


SLIDING: dict[str, dict[str, Any]] = {
    "upper layers": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "alternating": dict(use_sliding_window=True, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("name", list(SLIDING))
def test_sliding_window_layers_match_transformers(name: str, tmp_path: Path) -> None:
    """use_sliding_window: the layers Qwen2Config makes sliding (max_window_layers and up, or layer_types)
    slide llama.gqa's window there, at parity; the export states the same layers."""
    kw = SLIDING[name]
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**BASE, **kw, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                      attn_implementation="eager")
    hf = hf_parity.perturbed(transformers.Qwen2ForCausalLM(config))
    folder = hf_parity.save_tiny(hf, tmp_path / "hf")
    model = hf_parity.check_family(folder, hf, f"qwen2 sliding {name}")
    sliding = [t == "sliding_attention" for t in hf.config.layer_types]
    assert sliding == ([False, True] if name == "upper layers" else [True, False])
    params = model.spec.attention.params
    assert params["sliding_window"] == kw["sliding_window"] and params["window_pattern"] == sliding
    cache = model.new_cache()
    with torch.no_grad():
        model(hf_parity.batch(300, 12), cache=cache)
    assert [layer.k.shape[-2] for layer in cache.layers] == [kw["sliding_window"] if s else 256 for s in sliding]
    back = hf_parity.check_cli_roundtrip(folder, hf, tmp_path, "Qwen2ForCausalLM", f"qwen2 sliding {name}")
    assert back.config.layer_types == hf.config.layer_types and back.config.sliding_window == kw["sliding_window"]
