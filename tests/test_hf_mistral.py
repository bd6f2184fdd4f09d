"""Mistral parity with Hugging Face transformers: ``MistralForCausalLM`` folders imported and exported.

A tiny randomly initialised ``transformers.MistralForCausalLM`` (GQA 4/2, a sliding window of 6
positions, every parameter perturbed, eager attention as the reference) is saved with
``save_pretrained`` and checked through :mod:`hf_parity`: logits, 30 greedy tokens (well past the
window) with and without the KV cache, cached == uncached, the CLI round trip, the runtime. Also:
the windowed cache holds at most the window, the 7B spec's count, refused config fields.
No downloads. Run with ``pytest -s`` to see the differences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import hf_parity
from modelkit import CheckpointError, build_model, load_spec
from modelkit.generation import generate
from modelkit.weights.hf_families import export_family_of, export_hf, load_hf
from modelkit.weights.hf_families.mistral import spec_from_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("modelkit_llama")

WINDOW = 6
BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def make_hf(seed: int = 0, **kw: Any) -> Any:
    """A perturbed random ``MistralForCausalLM`` (eval mode, eager attention, float32)."""
    torch.manual_seed(seed)
    config = transformers.MistralConfig(**{**BASE, "sliding_window": WINDOW, **kw}, bos_token_id=None,
                                        eos_token_id=None, pad_token_id=None, attn_implementation="eager")
    return hf_parity.perturbed(transformers.MistralForCausalLM(config), seed)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    hf = make_hf()
    return hf, hf_parity.save_tiny(hf, tmp_path_factory.mktemp("mistral"))


def test_spec_is_llama_parts_with_the_window_and_no_biases(windowed: tuple[Any, Path]) -> None:
    hf, folder = windowed
    spec = load_hf(folder).spec
    assert spec.attention.type == "llama.gqa"
    assert spec.attention.params["sliding_window"] == WINDOW and spec.attention.params["window_pattern"] == [True]
    assert not spec.qkv_bias and not spec.attention.params["out_bias"] and not spec.feedforward.params["bias"]
    assert not spec.tie_embeddings and spec.context_length == 128


def test_logits_greedy_tokens_past_the_window_and_cache_match_transformers(windowed: tuple[Any, Path]) -> None:
    hf, folder = windowed
    hf_parity.check_family(folder, hf, "mistral window 6")


def test_the_window_matters(windowed: tuple[Any, Path]) -> None:
    """Without the window the logits past it differ from transformers': the parity above covers it."""
    hf, folder = windowed
    model = load_hf(folder)
    for block in model.trf_blocks:
        block.att.sliding_window = None
    x = hf_parity.batch(300, 20)
    with torch.no_grad():
        diff = hf_parity.max_diff(model(x)[:, WINDOW:], hf_parity.hf_logits(hf, x)[:, WINDOW:])
    assert diff > 1e-2


def test_the_windowed_cache_never_holds_more_than_the_window(windowed: tuple[Any, Path]) -> None:
    hf, folder = windowed
    model = load_hf(folder)
    caches = []
    new_cache = model.new_cache
    model.new_cache = lambda: caches.append(new_cache()) or caches[-1]  # type: ignore[method-assign]
    prompt = hf_parity.batch(300, 7, seed=1)
    out = generate(model, prompt, max_new_tokens=40)
    assert len(caches) == 1 and caches[0].length == 7 + 40 - 1  # the last token is never fed back
    for layer in caches[0].layers:
        assert layer.k is not None and layer.v is not None
        assert layer.k.shape[-2] == WINDOW and layer.v.shape[-2] == WINDOW
    assert torch.equal(out, generate(model, prompt, max_new_tokens=40, use_cache=False))


def test_full_attention_when_sliding_window_is_null(tmp_path: Path) -> None:
    hf = make_hf(seed=1, sliding_window=None, tie_word_embeddings=True)
    folder = hf_parity.save_tiny(hf, tmp_path / "full")
    model = load_hf(folder)
    assert model.spec.attention.params["sliding_window"] is None and model.spec.tie_embeddings
    hf_parity.check_logits(model, hf, "mistral full attention")
    hf_parity.check_cache(model, 300)
    assert export_family_of(model.spec).model_type == "llama"  # Llama states it first: no window, no biases


def test_import_hf_cli_then_export_hf_roundtrip(windowed: tuple[Any, Path], tmp_path: Path) -> None:
    hf, folder = windowed
    back = hf_parity.check_cli_roundtrip(folder, hf, tmp_path, "MistralForCausalLM", "mistral")
    assert back.config.sliding_window == WINDOW and not back.config.tie_word_embeddings


def test_optimize_for_inference_and_int8_keep_the_window(windowed: tuple[Any, Path]) -> None:
    hf, folder = windowed
    hf_parity.check_runtime(load_hf(folder), hf, "mistral")


MISTRAL_7B: dict[str, Any] = dict(
    model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=32000, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=4096,
    tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)


def test_mistral_7b_spec_matches_its_hf_config_and_counts_what_transformers_counts() -> None:
    assert spec_from_config(MISTRAL_7B, name="mistral-7b-v0.1") == load_spec(hf_parity.CONFIGS / "mistral-7b-v0.1.json")
    config = transformers.MistralConfig(**{k: v for k, v in MISTRAL_7B.items() if k != "model_type"})
    hf_parity.check_meta_count("mistral-7b-v0.1.json", transformers.MistralForCausalLM, config, 7_241_732_096)


def test_missing_fields_take_mistral_config_defaults() -> None:
    spec = spec_from_config(dict(model_type="mistral", vocab_size=300, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=8))
    ref = transformers.MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=8)
    assert spec.attention.params["sliding_window"] == ref.sliding_window
    assert spec.attention.params["num_kv_heads"] == ref.num_key_value_heads
    assert spec.context_length == ref.max_position_embeddings and spec.norm.params["eps"] == ref.rms_norm_eps
    assert spec.positional.params["theta"] == ref.rope_parameters["rope_theta"]


def test_old_top_level_rope_theta_reads_as_rope_parameters() -> None:
    new = spec_from_config(dict(BASE, model_type="mistral", rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 5000.0}))
    old = spec_from_config(dict({k: v for k, v in BASE.items() if k != "rope_parameters"}, model_type="mistral",
                                rope_theta=5000.0))
    assert new == old and new.positional.params["theta"] == 5000.0


@pytest.mark.parametrize("change, field", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters.rope_type 'yarn'"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type 'linear'"),
    ({"rope_parameters": None, "rope_theta": "10000"}, "rope_theta"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"sliding_window": "6"}, "sliding_window"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types ['full_attention']"),
    ({"vocab_size": -1}, "vocab_size"),
])
def test_unsupported_or_malformed_configs_are_refused(windowed: tuple[Any, Path], tmp_path: Path,
                                                      change: dict[str, Any], field: str) -> None:
    hf, folder = windowed
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_hf(tmp_path)
    assert field in str(info.value)
    assert "config.json" in str(info.value)


def test_a_bias_tensor_is_refused(tmp_path: Path) -> None:
    hf = make_hf()
    sd = hf.state_dict()
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.ones(64)
    hf.save_pretrained(tmp_path, state_dict=sd)
    with pytest.raises(CheckpointError, match=r"not part of Mistral \(1\): model.layers.0.self_attn.q_proj.bias"):
        load_hf(tmp_path)


@pytest.mark.parametrize("attention, expected", [
    ({"sliding_window": 4}, "mistral"),
    ({}, "llama"),
    ({"sliding_window": 4, "window_pattern": [True, False]}, None),
    ({"sliding_window": 4, "softcap": 30.0}, None),
    ({"query_scale": 0.1}, None),
], ids=str)
def test_export_states_a_window_as_mistral_and_refuses_what_no_family_has(tmp_path: Path, attention: dict[str, Any],
                                                                        expected: str | None) -> None:
    data = spec_from_config(dict(BASE, model_type="mistral", sliding_window=None)).model_dump()
    data["attention"].update(attention)
    spec = load_spec(data)
    if expected is not None:
        assert export_family_of(spec).model_type == expected
        return
    with pytest.raises(CheckpointError) as info:
        export_hf(build_model(spec), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    message = str(info.value)
    assert "no Llama equivalent" in message and "no Mistral equivalent" in message
    assert next(iter(k for k in attention if k != "sliding_window"), "sliding_window") in message
