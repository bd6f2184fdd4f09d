"""Phi-3 parity with Hugging Face transformers: ``Phi3ForCausalLM`` folders imported and exported.

Tiny randomly initialised ``transformers.Phi3ForCausalLM``s (every parameter perturbed, so norm
weights are not ones) are saved with ``save_pretrained`` and checked through :mod:`hf_parity`
(logits, greedy tokens, cache, CLI round trip, runtime, meta counts). Also: the fused
``qkv_proj`` / ``gate_up_proj`` split exactly and joined back bit for bit, partial rotary and the
sliding window matter, both RoPE field forms are read, unsupported or malformed configs are refused
naming the field, and how export chooses between Llama, Mistral and Phi-3. No downloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_parity import (CONFIGS, TOL, FamilyParity, batch, check_cli_roundtrip, check_config_refused, check_family,
                       check_logits, check_meta_count, check_tensor_refused, hf_logits, max_diff, perturbed, save_tiny)
from modelkit import CheckpointError, build_model, load_spec
from modelkit.cli import main as cli_main
from modelkit.weights.checkpoint import save_checkpoint
from modelkit.weights.hf_families import export_family_of, export_hf, load_hf
from modelkit.weights.hf_families.phi3 import spec_from_config, to_hf, to_modelkit

transformers = pytest.importorskip("transformers")
pytest.importorskip("modelkit_llama")

BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
VARIANTS: dict[str, dict[str, Any]] = {
    # GQA, half of each head rotated (as Phi-4-mini's 0.75), untied: only Phi-3 can state it on export
    "gqa-partial": dict(num_key_value_heads=2, partial_rotary_factor=0.5, tie_word_embeddings=False),
    # Phi-3-mini's shape: as many key/value heads as heads, whole heads rotated; tied, another theta
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


def make_hf(seed: int = 0, **kw: Any) -> Any:
    """A perturbed random ``Phi3ForCausalLM`` (eval mode, float32)."""
    torch.manual_seed(seed)
    return perturbed(transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**BASE, **kw})), seed)


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    hf = make_hf(**VARIANTS[request.param])
    return request.param, hf, save_tiny(hf, tmp_path_factory.mktemp(f"phi3-{request.param}"))


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


class TestParity(FamilyParity):
    architecture = "Phi3ForCausalLM"

    def test_import_hf_cli_then_export_hf_roundtrip(self, hf_folder: tuple[str, Any, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
        """Without partial rotary the model is Llama's parts and exports as Llama (the same logits);
        with it only Phi-3 can state the model."""
        name, hf, folder = hf_folder
        architecture = "Phi3ForCausalLM" if name == "gqa-partial" else "LlamaForCausalLM"
        back = check_cli_roundtrip(folder, hf, tmp_path, architecture, self.label(name))
        assert "wrote" in capsys.readouterr().out
        assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings


def test_spec_is_llama_parts_without_biases(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    spec = load_hf(folder).spec
    assert spec.attention.type == "llama.gqa" and spec.attention.params["num_kv_heads"] == hf.config.num_key_value_heads
    assert not spec.qkv_bias and not spec.attention.params["out_bias"] and not spec.feedforward.params["bias"]
    assert spec.tie_embeddings == hf.config.tie_word_embeddings
    assert spec.positional.params["rotary_fraction"] == hf.config.rope_parameters["partial_rotary_factor"]


def test_export_as_phi3_when_asked_joins_the_fused_tensors_bit_for_bit(hf_folder: tuple[str, Any, Path],
                                                                        tmp_path: Path) -> None:
    name, hf, folder = hf_folder
    ckpt = tmp_path / "phi3.safetensors"
    save_checkpoint(load_hf(folder), ckpt)
    out = tmp_path / "exported"
    assert cli_main(["export-hf", str(ckpt), str(out), "--model-type", "phi3"]) == 0
    assert _config(out)["model_type"] == "phi3"
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "Phi3ForCausalLM"
    x = batch(hf.config.vocab_size, 16, seed=3)
    assert max_diff(hf_logits(back, x), hf_logits(hf, x)) < TOL
    ours, theirs = back.state_dict(), hf.state_dict()
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key


def test_fused_split_is_exact_and_joins_back() -> None:
    """``qkv_proj`` rows: query (heads·d), then key, then value (kv_heads·d each); ``gate_up_proj``
    rows: gate, then up; both split exactly and joined back bit for bit."""
    hf = make_hf(**VARIANTS["gqa-partial"])
    model = build_model(spec_from_config({**hf.config.to_dict(), "model_type": "phi3"}))
    mapped, unknown = to_modelkit(hf.state_dict(), model.spec)
    assert unknown == []
    model.load_state_dict(mapped)
    qkv = hf.model.layers[1].self_attn.qkv_proj.weight.detach()
    att = model.trf_blocks[1].att
    assert qkv.shape == (64 + 2 * 32, 64)
    assert torch.equal(att.W_query.weight, qkv[:64])
    assert torch.equal(att.W_key.weight, qkv[64:96])
    assert torch.equal(att.W_value.weight, qkv[96:])
    gate_up = hf.model.layers[1].mlp.gate_up_proj.weight.detach()
    ff = model.trf_blocks[1].ff
    assert torch.equal(ff.gate_proj.weight, gate_up[:96]) and torch.equal(ff.up_proj.weight, gate_up[96:])
    exported = to_hf(model)
    assert set(exported) == set(hf.state_dict())
    for key, tensor in hf.state_dict().items():
        assert torch.equal(exported[key], tensor), key


def test_partial_rotary_matters() -> None:
    """Rotating whole heads instead of half changes the logits, so the parity above covers it."""
    hf = make_hf(**VARIANTS["gqa-partial"])
    model = build_model(spec_from_config({**hf.config.to_dict(), "model_type": "phi3"}))
    model.load_state_dict(to_modelkit(hf.state_dict(), model.spec)[0])
    x = batch(300, 10, seed=4)
    ref = hf_logits(hf, x)
    with torch.no_grad():
        assert max_diff(model(x), ref) < TOL
        model.pos_emb.rotary_dims = 16
        assert max_diff(model(x), ref) > 1e-2


def test_sliding_window_is_the_attention_window(tmp_path: Path) -> None:
    """``sliding_window`` 8 is ``llama.gqa``'s window on every layer, at parity (logits over 20 tokens,
    37 greedy tokens, the windowed cache); without it the logits differ, so parity covers it. The
    export is Mistral's (Llama's parts with a window), or Phi-3's with the window when asked."""
    hf = make_hf(num_key_value_heads=2, sliding_window=8)
    folder = tmp_path / "phi3"
    hf.save_pretrained(folder)
    model = check_family(folder, hf, "phi3 sliding window")
    assert model.spec.attention.params["sliding_window"] == 8 and model.spec.context_length == 64
    x = batch(300, 20, seed=6)
    with torch.no_grad():
        model.trf_blocks[0].att.sliding_window = None
        assert max_diff(model(x), hf_logits(hf, x)) > 1e-2
    model = load_hf(folder)
    assert export_family_of(model.spec).model_type == "mistral"
    for model_type, architecture in (("mistral", "MistralForCausalLM"), ("phi3", "Phi3ForCausalLM")):
        export_hf(model, tmp_path / model_type, model_type=model_type)
        assert _config(tmp_path / model_type)["sliding_window"] == 8
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / model_type).eval()
        assert type(back).__name__ == architecture
        assert max_diff(hf_logits(back, x), hf_logits(hf, x)) < TOL


def test_both_rope_field_forms_are_read(tmp_path: Path) -> None:
    """transformers 5's ``rope_parameters`` and the older top-level ``rope_theta`` /
    ``partial_rotary_factor`` / ``rope_scaling: null`` give the same spec and logits."""
    hf = make_hf(num_key_value_heads=2, partial_rotary_factor=0.5, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 500.0})
    hf.save_pretrained(tmp_path)
    new = _config(tmp_path)
    assert new["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=500.0, rope_scaling=None, partial_rotary_factor=0.5)
    assert spec_from_config(old) == spec_from_config(new)
    (tmp_path / "config.json").write_text(json.dumps(old))
    model = load_hf(tmp_path)
    assert model.spec.positional.params["theta"] == 500.0
    assert model.spec.positional.params["rotary_fraction"] == 0.5
    check_logits(model, hf, "phi3 old rope fields")


@pytest.mark.parametrize("change, field", [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                          "long_factor": [2.0] * 8, "original_max_position_embeddings": 32}},
     "rope_parameters.rope_type 'longrope'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}},
     "rope_scaling.rope_type 'su'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling.rope_type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"head_dim": 32}, "head_dim 32"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
    ({"partial_rotary_factor": 1.5, "rope_parameters": None}, "partial_rotary_factor 1.5 is not in (0, 1]"),
    ({"partial_rotary_factor": None, "rope_parameters": {"rope_type": "default", "partial_rotary_factor": "half"}},
     "partial_rotary_factor: expected a number, got a string"),
    ({"partial_rotary_factor": 0.25},
     "partial_rotary_factor 0.25 and rope_parameters.partial_rotary_factor 0.5 differ"),
    ({"partial_rotary_factor": 0.1, "rope_parameters": None}, "rotary_fraction"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"resid_pdrop": 2.0}, "resid_pdrop"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
])
def test_unsupported_or_malformed_configs_are_refused(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    check_config_refused(make_hf(**VARIANTS["gqa-partial"]), tmp_path, change, field)


@pytest.mark.parametrize("key, shape, message", [
    ("model.layers.0.self_attn.qkv_proj.weight", (3 * 64, 64),
     r"qkv_proj.weight: shape \(192, 64\) is not \(64 \+ 32 \+ 32"),
    ("model.layers.1.mlp.gate_up_proj.weight", (2 * 96 + 1, 64),
     r"gate_up_proj.weight: shape \(193, 64\) is not \(96 \+ 96"),
])
def test_malformed_fused_tensors_are_refused(tmp_path: Path, key: str, shape: tuple[int, ...], message: str) -> None:
    hf = make_hf(**VARIANTS["gqa-partial"])
    state = hf.state_dict()
    state[key] = torch.ones(shape)
    hf.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(CheckpointError, match=message):
        load_hf(tmp_path)


def test_unknown_tensor_is_refused(tmp_path: Path) -> None:
    check_tensor_refused(make_hf(**VARIANTS["gqa-partial"]), tmp_path, "model.layers.0.self_attn.qkv_proj.bias",
                         "Phi-3", torch.ones(128))


def test_export_chooses_llama_unless_phi3_is_asked_or_needed(tmp_path: Path) -> None:
    whole = spec_from_config({**BASE, "model_type": "phi3", "num_key_value_heads": 2})
    assert export_family_of(whole).model_type == "llama"
    assert export_family_of(whole, "phi3").model_type == "phi3"
    partial = spec_from_config({**BASE, "model_type": "phi3", "partial_rotary_factor": 0.5})
    assert export_family_of(partial).model_type == "phi3"
    for label, model_type in (("Llama", "llama"), ("Mistral", "mistral")):
        with pytest.raises(CheckpointError, match=rf"no {label} equivalent(.|\n)*rotary_fraction 0.5"):
            export_family_of(partial, model_type)
    with pytest.raises(CheckpointError, match=r"model_type 'phi4' is not supported \(supported: .*phi3"):
        export_family_of(whole, "phi4")
    biased = whole.model_copy(update={"qkv_bias": True})
    with pytest.raises(CheckpointError, match=r"no Phi-3 equivalent(.|\n)*attention biases"):
        export_hf(build_model(biased), tmp_path / "out", model_type="phi3")
    assert not (tmp_path / "out").exists()


PHI3_MINI_4K: dict[str, Any] = dict(
    model_type="phi3", architectures=["Phi3ForCausalLM"], vocab_size=32064, hidden_size=3072,
    intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    max_position_embeddings=4096, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
    rope_theta=10000.0, rope_scaling=None, sliding_window=2047, hidden_act="silu", tie_word_embeddings=False,
    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, attention_bias=False,
    bos_token_id=1, eos_token_id=32000, pad_token_id=32000)


def test_phi3_mini_4k_spec_matches_its_hf_config() -> None:
    assert spec_from_config(PHI3_MINI_4K, name="phi-3-mini-4k") == load_spec(CONFIGS / "phi-3-mini-4k.json")


def test_phi3_mini_4k_spec_counts_what_transformers_counts() -> None:
    config = transformers.Phi3Config(**{k: v for k, v in PHI3_MINI_4K.items() if k != "model_type"})
    check_meta_count("phi-3-mini-4k.json", transformers.Phi3ForCausalLM, config, 3_821_079_552)
