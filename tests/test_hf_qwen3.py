"""Qwen3 parity with Hugging Face transformers: ``Qwen3ForCausalLM`` folders imported and exported.

Tiny randomly initialised ``transformers.Qwen3ForCausalLM``s (GQA, a ``head_dim`` other than
``hidden_size / num_attention_heads`` as in the real models; tied, and untied with attention biases;
every parameter perturbed, so the per-head q/k norms are not ones) are saved with
``save_pretrained`` and checked through :mod:`hf_parity` (logits, greedy tokens, cache, CLI round
trip, runtime, meta counts, refusals); the rest are Qwen3's own: the norms matter, sliding windows,
defaults, export's choice of family, the Qwen3-0.6B spec. No downloads. Run with ``pytest -s`` to
see the differences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hf_parity import (CONFIGS, FamilyParity, batch, check_config_refused, check_family,
                       check_meta_count, check_tensor_refused, hf_logits, max_diff, perturbed, save_tiny)
from modelkit import CheckpointError, build_model, load_spec
from modelkit.weights.hf_families import export_family_of, export_hf, load_hf
from modelkit.weights.hf_families.qwen3 import spec_from_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("modelkit_llama")

# head_dim 32 with hidden 64 and 4 heads: the heads span 128 features, twice hidden_size.
BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
VARIANTS: dict[str, dict[str, Any]] = {
    "tied": dict(tie_word_embeddings=True),
    "untied biased": dict(tie_word_embeddings=False, rms_norm_eps=1e-5, attention_bias=True),
}


def make_hf(seed: int = 0, **kw: Any) -> Any:
    """A perturbed random ``Qwen3ForCausalLM`` (eval mode, float32)."""
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**{**BASE, **kw}, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return perturbed(transformers.Qwen3ForCausalLM(config), seed)


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    hf = make_hf(**VARIANTS[request.param])
    return request.param, hf, save_tiny(hf, tmp_path_factory.mktemp(f"qwen3-{request.param}"))


def test_spec_is_registered_parts(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    spec = load_hf(folder).spec
    eps = hf.config.rms_norm_eps
    assert spec.head_dim == 32 and spec.block.type == "pre_norm"
    att = spec.attention.params
    assert (att["num_kv_heads"], att["out_bias"], att["qk_norm"], att["qk_norm_eps"]) == (
        2, hf.config.attention_bias, "head", eps)
    assert att["sliding_window"] is None
    assert spec.norm.params == {"eps": eps} and spec.qkv_bias == hf.config.attention_bias
    assert spec.tie_embeddings == hf.config.tie_word_embeddings


class TestParity(FamilyParity):
    architecture = "Qwen3ForCausalLM"

    def check_export(self, back: Any, hf: Any) -> None:
        assert back.config.head_dim == 32 and back.config.attention_bias == hf.config.attention_bias
        assert back.config.layer_types == ["full_attention"] * 2


@pytest.mark.parametrize("norm", ["q_norm", "k_norm"])
def test_the_per_head_norms_matter(hf_folder: tuple[str, Any, Path], norm: str) -> None:
    """Resetting the q or k norm weights to ones changes the logits: parity covers them."""
    name, hf, folder = hf_folder
    model = load_hf(folder)
    assert tuple(getattr(model.trf_blocks[0].att, norm).weight.shape) == (32,)
    x = batch(hf.config.vocab_size, 10, seed=4)
    with torch.no_grad():
        for block in model.trf_blocks:
            getattr(block.att, norm).weight.fill_(1.0)
        assert max_diff(model(x), hf_logits(hf, x)) > 1e-2


def test_sliding_window_layers_at_parity_past_the_window(tmp_path: Path) -> None:
    """``use_sliding_window`` with ``max_window_layers`` 1: layer 1 sees the last 4 positions, layer 0
    all of them; logits, greedy tokens and the cache match transformers' well past the window."""
    hf = make_hf(seed=3, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    save_tiny(hf, tmp_path / "hf")
    model = check_family(tmp_path / "hf", hf, "qwen3 sliding")
    att = model.spec.attention.params
    assert (att["sliding_window"], att["window_pattern"]) == (4, [False, True])
    export_hf(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.layer_types == ["full_attention", "sliding_attention"]
    x = batch(hf.config.vocab_size, 16, seed=3)
    assert max_diff(hf_logits(back, x), hf_logits(hf, x)) < 1e-4
    model.trf_blocks[1].att.sliding_window = None  # attending to everything gives other logits
    with torch.no_grad():
        assert max_diff(model(x), hf_logits(hf, x)) > 1e-2


def test_rope_theta_read_from_either_field_form() -> None:
    new = spec_from_config(dict(BASE, model_type="qwen3"))
    old_form = {k: v for k, v in BASE.items() if k != "rope_parameters"}
    old = spec_from_config(dict(old_form, model_type="qwen3", rope_theta=1000000, rope_scaling=None))
    assert new == old and new.positional.params["theta"] == 1e6
    assert spec_from_config(dict(old_form, model_type="qwen3")).positional.params["theta"] == 10000.0


def test_qwen3_defaults_are_transformers() -> None:
    """Fields left out take ``Qwen3Config``'s defaults: head_dim 128 whatever the hidden size, 32 key/value
    heads (not num_attention_heads), eps 1e-6."""
    minimal = {k: BASE[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
    minimal["num_attention_heads"] = 64
    spec = spec_from_config(dict(minimal, model_type="qwen3"))
    ref = transformers.Qwen3Config(**minimal)
    assert spec.head_dim == ref.head_dim == 128
    assert spec.norm.params["eps"] == ref.rms_norm_eps == spec.attention.params["qk_norm_eps"]
    assert spec.context_length == ref.max_position_embeddings
    assert spec.tie_embeddings == ref.tie_word_embeddings
    assert spec.attention.params["num_kv_heads"] == ref.num_key_value_heads


def test_head_dim_equal_to_the_split_is_left_out_of_the_spec() -> None:
    spec = spec_from_config(dict(BASE, model_type="qwen3", head_dim=16))
    assert spec.head_dim is None and spec.dims.head_dim == 16


@pytest.mark.parametrize("change, field", [
    ({"layer_types": ["full_attention", "sliding_attention"]}, "use_sliding_window false gives them no window"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types ['chunked_attention']"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_parameters.rope_type 'yarn'"),
    ({"rope_parameters": None, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type 'linear'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"head_dim": None}, "head_dim"),
    ({"head_dim": 15}, "RoPE needs an even head size; head_dim = 15"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
])
def test_unsupported_or_malformed_configs_are_refused(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    check_config_refused(make_hf(), tmp_path, change, field)


def test_unknown_tensor_is_refused(tmp_path: Path) -> None:
    check_tensor_refused(make_hf(), tmp_path, "model.layers.1.mlp.up_proj.bias", "Qwen3", torch.ones(128))


def test_export_picks_qwen3_only_for_per_head_norms() -> None:
    spec = spec_from_config(dict(BASE, model_type="qwen3"))
    assert export_family_of(spec).model_type == "qwen3"
    data = spec.model_dump()
    data["attention"]["qk_norm"] = "none"  # without q/k norms it is a Llama model, its own head size included
    assert export_family_of(load_spec(data)).model_type == "llama"
    with pytest.raises(CheckpointError, match="attention qk_norm 'none' \\(Qwen3's is 'head'\\)"):
        export_family_of(load_spec(data), "qwen3")


@pytest.mark.parametrize("change, problem", [
    ({"attention": {"qk_norm_eps": 1e-3}}, "attention qk_norm_eps 0.001 differs from norm eps 1e-06"),
    ({"attention": {"qk_norm": "projection"}}, "attention qk_norm 'projection'"),
    ({"feedforward": {"bias": True}}, "feedforward bias true"),
    ({"attention": {"out_bias": True}}, "out_bias differs from qkv_bias"),
    ({"block": "post_norm"}, "block 'post_norm'"),
])
def test_export_refuses_what_qwen3_cannot_state(tmp_path: Path, change: dict[str, Any], problem: str) -> None:
    data = spec_from_config(dict(BASE, model_type="qwen3")).model_dump()
    for slot, value in change.items():
        data[slot] = {**data[slot], **value} if isinstance(value, dict) else value
    with pytest.raises(CheckpointError, match="no Qwen3 equivalent") as info:
        export_hf(build_model(data), tmp_path / "out")
    assert problem in str(info.value)
    assert not (tmp_path / "out").exists()


QWEN3_06B: dict[str, Any] = dict(
    model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024,
    intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=40960, rope_theta=1000000, rope_scaling=None, rms_norm_eps=1e-6,
    tie_word_embeddings=True, attention_bias=False, attention_dropout=0.0, hidden_act="silu",
    use_sliding_window=False, sliding_window=None, max_window_layers=28, bos_token_id=151643, eos_token_id=151645)


def test_qwen3_0_6b_spec_matches_its_hf_config() -> None:
    assert spec_from_config(QWEN3_06B, name="qwen3-0.6b") == load_spec(CONFIGS / "qwen3-0.6b.json")


def test_qwen3_0_6b_spec_counts_what_transformers_counts() -> None:
    config = transformers.Qwen3Config(**{k: v for k, v in QWEN3_06B.items() if k != "model_type"})
    check_meta_count("qwen3-0.6b.json", transformers.Qwen3ForCausalLM, config, 596_049_920)
