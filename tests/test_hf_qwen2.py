"""Qwen2 parity with Hugging Face transformers: ``Qwen2ForCausalLM`` folders imported and exported.

Tiny randomly initialised ``transformers.Qwen2ForCausalLM``s (every parameter perturbed, so the
q/k/v biases are nonzero and norm weights are not ones) are saved with ``save_pretrained`` and loaded
with :func:`modelkit.weights.hf_families.load_hf` / ``modelkit import-hf``; exported back with
``export-hf`` and opened with ``AutoModelForCausalLM.from_pretrained``. No downloads.
Run with ``pytest -s`` to see the max abs logit differences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import hf_parity
from modelkit import CheckpointError, build_model, load_spec
from modelkit.cli import main as cli_main
from modelkit.generation import generate
from modelkit.introspect import count_parameters
from modelkit.weights.checkpoint import load_checkpoint
from modelkit.weights.hf_families import export_family_of, export_hf, load_hf
from modelkit.weights.hf_families.qwen2 import spec_from_config

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).parent.parent / "configs" / "pretrained"
TOL = 1e-4
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
    model = transformers.Qwen2ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    hf = make_hf(VARIANTS[request.param])
    folder = tmp_path_factory.mktemp(f"qwen2-{request.param}")
    hf.save_pretrained(folder)
    return request.param, hf, folder


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


def test_logits_match_transformers(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    model = load_hf(folder)
    assert model.spec.qkv_bias and model.spec.attention.params["out_bias"] is False
    assert model.spec.tie_embeddings == hf.config.tie_word_embeddings
    x = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(x).logits
        ours = model(x)
    diff = (ours - ref).abs().max().item()
    print(f"\n[qwen2 parity] {name}: max |logit diff| {diff:.2e}")
    assert ref.abs().max() > 0.1  # a real signal, not zeros
    assert diff < TOL


def test_qkv_biases_matter(hf_folder: tuple[str, Any, Path]) -> None:
    """Dropping the q/k/v biases changes transformers' logits, so the parity above covers them."""
    name, hf, folder = hf_folder
    model = load_hf(folder)
    x = torch.randint(0, hf.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for block in model.trf_blocks:
            block.att.W_key.bias.zero_()
        assert (model(x) - hf(x).logits).abs().max().item() > 1e-2


def test_greedy_generation_and_cache_match_transformers(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    model = load_hf(folder)
    x = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=30, pad_token_id=0)
    cached = generate(model, x, max_new_tokens=30)
    uncached = generate(model, x, max_new_tokens=30, use_cache=False)
    assert ref.shape == (2, 7 + 30)
    print(f"\n[qwen2 parity] greedy {name}: 30 new tokens identical: {torch.equal(cached, ref)}")
    assert torch.equal(cached, ref)
    assert torch.equal(uncached, ref)


def test_kv_cache_logits_equal_no_cache(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    model = load_hf(folder)
    x = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        steps = [model(x[:, :5], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_import_hf_cli_then_export_hf_roundtrip(hf_folder: tuple[str, Any, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    name, hf, folder = hf_folder
    ckpt = tmp_path / "qwen2.safetensors"
    assert cli_main(["import-hf", str(folder), str(ckpt)]) == 0
    assert "wrote" in capsys.readouterr().out
    model = load_checkpoint(ckpt)
    x = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(x).logits
        assert (model(x) - ref).abs().max().item() < TOL
    out = tmp_path / "exported"
    assert cli_main(["export-hf", str(ckpt), str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    with torch.no_grad():
        diff = (back(x).logits - ref).abs().max().item()
    print(f"\n[qwen2 parity] export {name}: max |logit diff| {diff:.2e}")
    assert diff < TOL


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
    ({"head_dim": 32}, "head_dim 32"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
    ({"use_sliding_window": "no"}, "use_sliding_window"),
])
def test_unsupported_or_malformed_configs_are_refused(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    hf = make_hf(VARIANTS["untied"])
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_hf(tmp_path)
    assert field in str(info.value)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("extra", ["model.layers.0.self_attn.o_proj.bias", "model.layers.1.mlp.up_proj.bias",
                                   "model.layers.0.self_attn.q_norm.weight"])
def test_unknown_tensor_is_refused(tmp_path: Path, extra: str) -> None:
    hf = make_hf(VARIANTS["untied"])
    sd = hf.state_dict()
    sd[extra] = torch.ones(64)
    hf.save_pretrained(tmp_path, state_dict=sd)
    with pytest.raises(CheckpointError, match=rf"not part of Qwen2 \(1\): {extra}"):
        load_hf(tmp_path)


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
    with torch.device("meta"):
        ref = transformers.Qwen2ForCausalLM(config)
    assert sum(p.numel() for p in ref.parameters()) == 494_032_768


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
