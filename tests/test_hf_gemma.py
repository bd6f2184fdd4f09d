"""Gemma parity with Hugging Face transformers: ``GemmaForCausalLM`` folders imported and exported.

Tiny randomly initialised ``transformers.GemmaForCausalLM``s (multi-query attention, 4 heads of 32
on a 64-wide model so ``head_dim`` is not ``hidden_size / heads``, every parameter perturbed so the
norm offsets are not zero) are saved with ``save_pretrained`` and checked through :mod:`hf_parity`:
logits, 30 greedy tokens with and without the KV cache, cached == uncached, the CLI round trip, the
runtime. Also: each Gemma-specific part matters, the Gemma-2B spec's count, both RoPE field forms,
refused config fields, export refusals. No downloads. Run with ``pytest -s`` to see the differences.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import hf_parity
from modelkit import CheckpointError, build_model, load_spec
from modelkit.weights.hf_families import export_family_of, export_hf, load_hf
from modelkit.weights.hf_families.gemma import spec_from_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("modelkit_llama")
pytest.importorskip("modelkit_gemma")

BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
VARIANTS: dict[str, dict[str, Any]] = {
    "tied": {},
    "untied-biased": dict(tie_word_embeddings=False, attention_bias=True, rms_norm_eps=1e-5, num_key_value_heads=2),
}


def make_hf(seed: int = 0, **kw: Any) -> Any:
    """A perturbed random ``GemmaForCausalLM`` (eval mode, float32)."""
    torch.manual_seed(seed)
    config = transformers.GemmaConfig(**{**BASE, **kw}, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return hf_parity.perturbed(transformers.GemmaForCausalLM(config), seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Any, Path]]:
    """The variant's transformers model and its saved folder, each made once."""
    made: dict[str, tuple[Any, Path]] = {}

    def get(name: str) -> tuple[Any, Path]:
        if name not in made:
            hf = make_hf(**VARIANTS[name])
            made[name] = hf, hf_parity.save_tiny(hf, tmp_path_factory.mktemp(f"gemma-{name}"))
        return made[name]

    return get


@pytest.fixture(scope="module", params=list(VARIANTS))
def gemma(request: pytest.FixtureRequest, saved: Callable[[str], tuple[Any, Path]]) -> tuple[str, Any, Path]:
    return request.param, *saved(request.param)


@pytest.fixture(scope="module")
def tied(saved: Callable[[str], tuple[Any, Path]]) -> tuple[Any, Path]:
    return saved("tied")


def test_spec_is_gemma_parts_with_mqa_and_its_own_head_size(gemma: tuple[str, Any, Path]) -> None:
    name, hf, folder = gemma
    spec = load_hf(folder).spec
    assert (spec.norm.type, spec.feedforward.type, spec.block.type) == ("gemma.rmsnorm", "gemma.geglu", "pre_norm")
    assert spec.feedforward.params["activation"].type == "gelu"  # the tanh approximation
    assert spec.head_dim == 32 != spec.emb_dim // spec.n_heads
    assert spec.embedding_scale == 8.0 and spec.final_logit_softcap is None
    assert spec.attention.params["num_kv_heads"] == hf.config.num_key_value_heads
    assert spec.tie_embeddings == hf.config.tie_word_embeddings
    assert spec.qkv_bias == spec.attention.params["out_bias"] == hf.config.attention_bias


def test_logits_greedy_tokens_and_cache_match_transformers(gemma: tuple[str, Any, Path]) -> None:
    name, hf, folder = gemma
    hf_parity.check_family(folder, hf, f"gemma {name}")


def test_import_hf_cli_then_export_hf_roundtrip(gemma: tuple[str, Any, Path], tmp_path: Path) -> None:
    name, hf, folder = gemma
    back = hf_parity.check_cli_roundtrip(folder, hf, tmp_path, "GemmaForCausalLM", f"gemma {name}")
    assert back.config.head_dim == 32 and back.config.hidden_act == "gelu_pytorch_tanh"
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings


def test_optimize_for_inference_and_int8(gemma: tuple[str, Any, Path]) -> None:
    name, hf, folder = gemma
    hf_parity.check_runtime(load_hf(folder), hf, f"gemma {name}")


@pytest.mark.parametrize("change", [
    {"norm": {"type": "llama.rmsnorm", "eps": 1e-6}},  # w instead of 1 + w
    {"embedding_scale": 1.0},
    {"feedforward": {"type": "gemma.geglu", "hidden_dim": 128, "activation": "gelu_exact"}},
], ids=["norm-plus-one", "embedding-scale", "tanh-gelu"])
def test_each_gemma_part_matters(tied: tuple[Any, Path], change: dict[str, Any]) -> None:
    """The same weights under a spec without one Gemma part give other logits than transformers',
    by more than the parity tolerance: the parity above covers each part."""
    hf, folder = tied
    spec = load_spec({**load_hf(folder).spec.to_dict(), **change})
    x = hf_parity.batch(300, 12)
    with torch.no_grad():
        assert hf_parity.max_diff(load_hf(folder, spec=spec)(x), hf_parity.hf_logits(hf, x)) > 2 * hf_parity.TOL


def test_legacy_gelu_is_the_tanh_gelu_as_transformers_reads_it(gemma: tuple[str, Any, Path], tmp_path: Path) -> None:
    name, hf, folder = gemma
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_act="gelu", hidden_activation=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    reread = transformers.GemmaForCausalLM.from_pretrained(tmp_path).eval()
    assert reread.config.hidden_act == "gelu_pytorch_tanh"
    hf_parity.check_logits(load_hf(tmp_path), reread, f"gemma {name} hidden_act gelu")


GEMMA_2B: dict[str, Any] = dict(
    model_type="gemma", architectures=["GemmaForCausalLM"], vocab_size=256000, hidden_size=2048,
    intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
    max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    hidden_act="gelu", hidden_activation=None, attention_bias=False, bos_token_id=2, eos_token_id=1, pad_token_id=0)


def test_gemma_2b_spec_matches_its_hf_config_and_counts_what_transformers_counts() -> None:
    assert spec_from_config(GEMMA_2B, name="gemma-2b") == load_spec(hf_parity.CONFIGS / "gemma-2b.json")
    config = transformers.GemmaConfig(**{k: v for k, v in GEMMA_2B.items() if k not in ("model_type",
                                                                                          "hidden_activation")})
    hf_parity.check_meta_count("gemma-2b.json", transformers.GemmaForCausalLM, config, 2_506_172_416)


def test_both_rope_field_forms_read_the_same() -> None:
    new = spec_from_config(dict(BASE, model_type="gemma",
                                rope_parameters={"rope_type": "default", "rope_theta": 500.0}))
    old = spec_from_config(dict({k: v for k, v in BASE.items() if k != "rope_parameters"}, model_type="gemma",
                                rope_theta=500.0, rope_scaling=None))
    assert new == old and new.positional.params["theta"] == 500.0


def test_missing_fields_take_gemma_config_defaults() -> None:
    sizes = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=16)
    spec = spec_from_config(dict(sizes, model_type="gemma"))
    ref = transformers.GemmaConfig(**sizes)
    assert spec.attention.params["num_kv_heads"] == ref.num_key_value_heads and spec.head_dim == ref.head_dim
    assert spec.context_length == ref.max_position_embeddings and spec.norm.params["eps"] == ref.rms_norm_eps
    assert spec.tie_embeddings == ref.tie_word_embeddings and spec.qkv_bias == ref.attention_bias
    assert spec.positional.params["theta"] == ref.rope_parameters["rope_theta"]


@pytest.mark.parametrize("change, field", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters.rope_type 'yarn'"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type 'linear'"),
    ({"rope_parameters": None, "rope_theta": "10000"}, "rope_theta"),
    ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new'"),
    ({"hidden_activation": "silu"}, "hidden_activation 'silu' differs from hidden_act"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3"),
    ({"head_dim": "32"}, "head_dim"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
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


def test_an_mlp_bias_tensor_is_refused(tmp_path: Path) -> None:
    hf = make_hf()
    sd = hf.state_dict()
    sd["model.layers.1.mlp.up_proj.bias"] = torch.ones(128)
    hf.save_pretrained(tmp_path, state_dict=sd)
    with pytest.raises(CheckpointError, match=r"not part of Gemma \(1\): model.layers.1.mlp.up_proj.bias"):
        load_hf(tmp_path)


@pytest.mark.parametrize("change, problem", [
    ({"attention": {"type": "llama.gqa", "num_kv_heads": 1, "softcap": 50.0}}, "attention softcap 50.0"),
    ({"attention": {"type": "llama.gqa", "num_kv_heads": 1, "sliding_window": 8}}, "attention sliding_window 8"),
    ({"attention": {"type": "llama.gqa", "num_kv_heads": 1, "query_scale": 0.1}}, "attention query_scale 0.1"),
    ({"embedding_scale": 2.0}, "embedding_scale 2.0"),
    ({"final_logit_softcap": 30.0}, "final_logit_softcap 30.0"),
    ({"feedforward": {"type": "gemma.geglu", "hidden_dim": 128, "activation": "gelu_exact"}},
     "feedforward activation 'gelu_exact'"),
    ({"feedforward": {"type": "gemma.geglu", "hidden_dim": 128, "bias": True}}, "feedforward bias true"),
    ({"positional": {"type": "llama.rope", "rotary_fraction": 0.5}}, "positional"),
    ({"head_bias": True}, "head_bias true"),
], ids=str)
def test_export_refuses_specs_with_no_gemma_equivalent(tmp_path: Path, change: dict[str, Any], problem: str) -> None:
    data = spec_from_config(dict(BASE, model_type="gemma")).to_dict()
    spec = load_spec({**data, **change})
    with pytest.raises(CheckpointError) as info:
        export_hf(build_model(spec), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    message = str(info.value)
    assert "no Gemma equivalent" in message and problem in message.split("no Gemma equivalent")[1].split("no ")[0]


def test_export_picks_gemma_for_gemma_parts_and_leaves_llama_specs_to_llama() -> None:
    assert export_family_of(spec_from_config(dict(BASE, model_type="gemma"))).model_type == "gemma"
    assert export_family_of(load_spec(hf_parity.CONFIGS / "llama-3.2-1b.json")).model_type == "llama"
