"""Gemma 2 parity with Hugging Face transformers: ``Gemma2ForCausalLM`` folders imported and exported.

Tiny randomly initialised ``transformers.Gemma2ForCausalLM``s (GQA 4/2, ``head_dim`` 32 on a
64-wide model, three layers with a sliding window of 6 positions on the even ones, small soft-caps
so they bite, a ``query_pre_attn_scalar`` other than the head size, every parameter perturbed) are
saved with ``save_pretrained`` and checked through :mod:`hf_parity`: logits, 30 greedy tokens (well
past the window) with and without the KV cache, cached == uncached, the CLI round trip, the runtime.
Also: each Gemma 2 part matters, the windowed layers' caches hold at most the window, the
Gemma-2-2B spec's count, both RoPE field forms, refused config fields, export refusals. No downloads.
Run with ``pytest -s`` to see the differences.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hf_parity
from modelkit import CheckpointError, build_model, load_spec
from modelkit.generation import generate
from modelkit.weights.hf_families import export_family_of, export_hf, load_hf
from modelkit.weights.hf_families.gemma2 import shortest_period, spec_from_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("modelkit_llama")
pytest.importorskip("modelkit_gemma")

WINDOW = 6
BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=WINDOW,
                            query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=4.0)
VARIANTS: dict[str, dict[str, Any]] = {
    "tied": {},
    "untied-exact-gelu": dict(tie_word_embeddings=False, attention_bias=True, hidden_activation="gelu",
                              layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
}


def make_hf(seed: int = 0, **kw: Any) -> Any:
    """A perturbed random ``Gemma2ForCausalLM`` (eval mode, eager attention, float32)."""
    torch.manual_seed(seed)
    config = transformers.Gemma2Config(**{**BASE, **kw}, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                       attn_implementation="eager")
    return hf_parity.perturbed(transformers.Gemma2ForCausalLM(config), seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Any, Path]]:
    """The variant's transformers model and its saved folder, each made once."""
    made: dict[str, tuple[Any, Path]] = {}

    def get(name: str) -> tuple[Any, Path]:
        if name not in made:
            hf = make_hf(**VARIANTS[name])
            made[name] = hf, hf_parity.save_tiny(hf, tmp_path_factory.mktemp(f"gemma2-{name}"))
        return made[name]

    return get


@pytest.fixture(scope="module", params=list(VARIANTS))
def gemma2(request: pytest.FixtureRequest, saved: Callable[[str], tuple[Any, Path]]) -> tuple[str, Any, Path]:
    return request.param, *saved(request.param)


@pytest.fixture(scope="module")
def tied(saved: Callable[[str], tuple[Any, Path]]) -> tuple[Any, Path]:
    return saved("tied")


def test_spec_is_gemma_parts_with_sandwich_blocks_caps_and_windows(gemma2: tuple[str, Any, Path]) -> None:
    name, hf, folder = gemma2
    spec = load_hf(folder).spec
    att = spec.attention.params
    assert (spec.norm.type, spec.feedforward.type, spec.block.type) == ("gemma.rmsnorm", "gemma.geglu",
                                                                         "gemma.sandwich")
    assert att["softcap"] == 3.0 and att["query_scale"] == 24 ** -0.5 and spec.final_logit_softcap == 4.0
    assert att["sliding_window"] == WINDOW and att["num_kv_heads"] == 2 and spec.head_dim == 32
    pattern = {"tied": [True, False], "untied-exact-gelu": [False, True, True]}[name]
    assert att["window_pattern"] == pattern
    activation = {"tied": "gelu", "untied-exact-gelu": "gelu_exact"}[name]
    assert spec.feedforward.params["activation"].type == activation
    assert spec.tie_embeddings == hf.config.tie_word_embeddings and spec.qkv_bias == hf.config.attention_bias


def test_logits_greedy_tokens_past_the_window_and_cache_match_transformers(gemma2: tuple[str, Any, Path]) -> None:
    name, hf, folder = gemma2
    hf_parity.check_family(folder, hf, f"gemma2 {name}")


def test_import_hf_cli_then_export_hf_roundtrip(gemma2: tuple[str, Any, Path], tmp_path: Path) -> None:
    name, hf, folder = gemma2
    back = hf_parity.check_cli_roundtrip(folder, hf, tmp_path, "Gemma2ForCausalLM", f"gemma2 {name}")
    assert back.config.layer_types == hf.config.layer_types and back.config.sliding_window == WINDOW
    assert back.config.query_pre_attn_scalar == 24 and back.config.hidden_activation == hf.config.hidden_activation


def test_optimize_for_inference_and_int8(gemma2: tuple[str, Any, Path]) -> None:
    name, hf, folder = gemma2
    hf_parity.check_runtime(load_hf(folder), hf, f"gemma2 {name}")


def _logit_diff(model: nn.Module, hf: Any) -> float:
    x = hf_parity.batch(300, 20)
    with torch.no_grad():
        return hf_parity.max_diff(model(x), hf_parity.hf_logits(hf, x))


@pytest.mark.parametrize("attention, model_level", [
    ({"softcap": None}, {}), ({"query_scale": None}, {}), ({"sliding_window": None, "window_pattern": [True]}, {}),
    ({}, {"final_logit_softcap": None}),
], ids=["attention-softcap", "query-pre-attn-scalar", "sliding-window", "final-softcap"])
def test_each_gemma2_part_matters(tied: tuple[Any, Path], attention: dict[str, Any],
                                  model_level: dict[str, Any]) -> None:
    """The same weights under a spec without one Gemma 2 part give other logits than transformers',
    by more than the parity tolerance: the parity above covers each part."""
    hf, folder = tied
    data = load_hf(folder).spec.to_dict()
    data["attention"].update(attention)
    assert _logit_diff(load_hf(folder, spec={**data, **model_level}), hf) > 2 * hf_parity.TOL


def test_the_post_norms_matter(tied: tuple[Any, Path]) -> None:
    hf, folder = tied
    model = load_hf(folder)
    for block in model.trf_blocks:
        block.post_norm1 = block.post_norm2 = nn.Identity()
    assert _logit_diff(model, hf) > 2 * hf_parity.TOL


def test_windowed_layers_cache_at_most_the_window(tied: tuple[Any, Path]) -> None:
    hf, folder = tied
    model = load_hf(folder)
    caches = []
    new_cache = model.new_cache
    model.new_cache = lambda: caches.append(new_cache()) or caches[-1]  # type: ignore[method-assign]
    prompt = hf_parity.batch(300, 7, seed=1)
    out = generate(model, prompt, max_new_tokens=30)
    held = [layer.k.shape[-2] for layer in caches[0].layers]
    assert held == [WINDOW, model.spec.context_length, WINDOW]  # layers 0 and 2 slide; layer 1 keeps every position
    assert caches[0].length == 7 + 30 - 1  # the last token is never fed back
    assert torch.equal(out, generate(model, prompt, max_new_tokens=30, use_cache=False))


GEMMA_2_2B: dict[str, Any] = dict(
    model_type="gemma2", architectures=["Gemma2ForCausalLM"], vocab_size=256000, hidden_size=2304,
    intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
    sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, attention_bias=False,
    bos_token_id=2, eos_token_id=1, pad_token_id=0)


def test_gemma_2_2b_spec_matches_its_hf_config_and_counts_what_transformers_counts() -> None:
    assert spec_from_config(GEMMA_2_2B, name="gemma-2-2b") == load_spec(hf_parity.CONFIGS / "gemma-2-2b.json")
    config = transformers.Gemma2Config(**{k: v for k, v in GEMMA_2_2B.items() if k not in ("model_type", "hidden_act")})
    hf_parity.check_meta_count("gemma-2-2b.json", transformers.Gemma2ForCausalLM, config, 2_614_341_888)


def test_both_rope_field_forms_read_the_same() -> None:
    new = spec_from_config(dict(BASE, model_type="gemma2",
                                rope_parameters={"rope_type": "default", "rope_theta": 500.0}))
    old = spec_from_config(dict({k: v for k, v in BASE.items() if k != "rope_parameters"}, model_type="gemma2",
                                rope_theta=500.0, rope_scaling=None))
    assert new == old and new.positional.params["theta"] == 500.0


def test_missing_fields_take_gemma2_config_defaults() -> None:
    sizes = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8)
    spec = spec_from_config(dict(sizes, model_type="gemma2"))
    ref = transformers.Gemma2Config(**sizes)
    att = spec.attention.params
    assert att["num_kv_heads"] == ref.num_key_value_heads and spec.head_dim == ref.head_dim
    assert att["sliding_window"] == ref.sliding_window and att["softcap"] == ref.attn_logit_softcapping
    assert att["query_scale"] == ref.query_pre_attn_scalar ** -0.5
    assert [att["window_pattern"][i % 2] for i in range(4)] == [t == "sliding_attention" for t in ref.layer_types]
    assert spec.final_logit_softcap == ref.final_logit_softcapping and spec.tie_embeddings == ref.tie_word_embeddings
    assert spec.context_length == ref.max_position_embeddings and spec.norm.params["eps"] == ref.rms_norm_eps


def test_null_soft_caps_and_no_sliding_layer_read_as_none(tmp_path: Path) -> None:
    hf = make_hf(seed=1, attn_logit_softcapping=None, final_logit_softcapping=None, layer_types=["full_attention"] * 3)
    model = load_hf(hf_parity.save_tiny(hf, tmp_path / "plain"))
    att = model.spec.attention.params
    assert att["softcap"] is None and att["sliding_window"] is None and model.spec.final_logit_softcap is None
    hf_parity.check_logits(model, hf, "gemma2 no caps, no window")
    back = hf_parity.check_cli_roundtrip(tmp_path / "plain", hf, tmp_path, "Gemma2ForCausalLM", "gemma2 plain")
    assert back.config.layer_types == ["full_attention"] * 3


def test_shortest_period() -> None:
    assert shortest_period([True, False, True]) == [True, False]
    assert shortest_period([True, True]) == [True]
    assert shortest_period([False, True, True]) == [False, True, True]


@pytest.mark.parametrize("change, field", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters.rope_type 'yarn'"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type 'linear'"),
    ({"hidden_activation": "gelu_new"}, "hidden_activation 'gelu_new'"),
    ({"hidden_activation": None}, "hidden_activation is null"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types has 2 entries"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
     "layer_types ['chunked_attention']"),
    ({"sliding_window": None}, "sliding_window is null"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"query_pre_attn_scalar": "24"}, "query_pre_attn_scalar"),
    ({"attn_logit_softcapping": 0}, "attn_logit_softcapping"),
    ({"final_logit_softcapping": -1.0}, "final_logit_softcapping"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_unsupported_or_malformed_configs_are_refused(tied: tuple[Any, Path], tmp_path: Path,
                                                      change: dict[str, Any], field: str) -> None:
    hf, folder = tied
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_hf(tmp_path)
    assert field in str(info.value)
    assert "config.json" in str(info.value)


def test_a_tensor_of_another_block_layout_is_refused(tmp_path: Path) -> None:
    hf = make_hf()
    sd = hf.state_dict()
    sd["model.layers.0.post_mlp_layernorm.weight"] = torch.ones(64)
    hf.save_pretrained(tmp_path, state_dict=sd)
    with pytest.raises(CheckpointError, match=r"not part of Gemma 2 \(1\): model.layers.0.post_mlp_layernorm.weight"):
        load_hf(tmp_path)


@pytest.mark.parametrize("change, problem", [
    ({"query_scale": 0.3}, "attention query_scale 0.3"),
    ({"out_bias": True}, "attention out_bias differs from qkv_bias"),
], ids=str)
def test_export_refuses_attention_gemma2_cannot_state(tmp_path: Path, change: dict[str, Any], problem: str) -> None:
    data = spec_from_config(dict(BASE, model_type="gemma2")).to_dict()
    data["attention"].update(change)
    with pytest.raises(CheckpointError, match="no Gemma 2 equivalent") as info:
        export_hf(build_model(load_spec(data)), tmp_path / "out")
    assert problem in str(info.value) and not (tmp_path / "out").exists()


def test_export_refuses_other_blocks_and_picks_gemma2_for_sandwich_blocks() -> None:
    spec = spec_from_config(dict(BASE, model_type="gemma2"))
    assert export_family_of(spec).model_type == "gemma2"
    pre_norm = load_spec({**spec.to_dict(), "block": "pre_norm"})
    with pytest.raises(CheckpointError, match=r"block 'pre_norm' \(Gemma 2 blocks are gemma.sandwich\)"):
        export_family_of(pre_norm)
