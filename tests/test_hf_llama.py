"""Llama parity with Hugging Face transformers: ``LlamaForCausalLM`` folders imported and exported.

Tiny randomly initialised ``transformers.LlamaForCausalLM``s (every parameter perturbed, so norm
weights are not ones and a swapped key would show) are saved with ``save_pretrained`` and checked
with the shared checks of ``tests/hf_parity.py`` (logits, greedy tokens, cache, ``import-hf`` /
``export-hf``, the runtime); the rest are Llama's own: RoPE fields and llama3 scaling, refusals,
the Llama-3.2-1B spec. No downloads. Run with ``pytest -s`` to see the max abs logit differences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hf_parity import CONFIGS, TOL, FamilyParity, check_config_refused, check_meta_count, check_tensor_refused, \
    perturbed, save_tiny
from modelkit import CheckpointError, SpecError, build_model, load_spec
from modelkit.introspect import count_parameters
from modelkit.weights.hf_families import export_hf, load_hf
from modelkit.weights.hf_families.llama import spec_from_config

transformers = pytest.importorskip("transformers")

BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
VARIANTS: dict[str, dict[str, Any]] = {
    "tied": dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "untied": dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                   rms_norm_eps=1e-5),
    "llama3-rope-biases": dict(tie_word_embeddings=False, rope_parameters=LLAMA3, attention_bias=True,
                               mlp_bias=True),
}


def make_hf(kw: dict[str, Any], seed: int = 0) -> Any:
    """A perturbed random ``LlamaForCausalLM`` (eval mode, eager attention, float32)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**BASE, **kw, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return perturbed(transformers.LlamaForCausalLM(config), seed)


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    hf = make_hf(VARIANTS[request.param])
    return request.param, hf, save_tiny(hf, tmp_path_factory.mktemp(f"llama-{request.param}"))


def test_saved_folder_is_what_we_expect(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    assert (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not hf.config.tie_word_embeddings)


class TestParity(FamilyParity):
    architecture = "LlamaForCausalLM"


def test_spec_is_registered_parts(hf_folder: tuple[str, Any, Path]) -> None:
    model = load_hf(hf_folder[2])
    book = load_spec(Path(__file__).parent.parent / "configs" / "tiny.json")
    assert model.spec.model_dump().keys() == book.model_dump().keys()  # registered parts, never a family flag


def test_export_api_of_a_built_llama_spec(tmp_path: Path) -> None:
    spec = load_spec(Path(__file__).parent.parent / "configs" / "llama-style.json")
    torch.manual_seed(0)
    small = spec.model_copy(update={"vocab_size": 100, "emb_dim": 64, "n_heads": 4, "n_layers": 1})
    model = build_model(small.model_dump()).eval()
    export_hf(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(x).logits - model(x)).abs().max().item() < TOL


def test_old_and_new_rope_fields_give_the_same_spec() -> None:
    new = dict(BASE, model_type="llama", rope_parameters=dict(LLAMA3))
    old = dict(BASE, model_type="llama", rope_theta=500000.0,
               rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"})
    assert spec_from_config(new) == spec_from_config(old)
    assert spec_from_config(new).positional.params["scaling"] == "llama3"
    plain = spec_from_config(dict(BASE, model_type="llama", rope_theta=123456.0))
    assert plain.positional.params["theta"] == 123456.0 and plain.positional.params["scaling"] == "none"


@pytest.mark.parametrize("change, field", [
    ({"model_type": "mamba"}, "model_type 'mamba'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters.rope_type 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type 'linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope_parameters.factor"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, "rope_theta"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
    ({"vocab_size": "300"}, "vocab_size"),
])
def test_unsupported_or_malformed_configs_are_refused(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    def edit(config: dict[str, Any]) -> None:
        if "rope_scaling" in change:  # the older form: top-level rope_theta and rope_scaling
            config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
        config.update(change)

    check_config_refused(make_hf(VARIANTS["untied"]), tmp_path, edit, field)


def test_unknown_tensor_is_refused(tmp_path: Path) -> None:
    check_tensor_refused(make_hf(VARIANTS["untied"]), tmp_path, "model.layers.0.self_attn.q_norm.weight", "Llama",
                         torch.ones(16))


def test_a_model_of_no_family_is_refused_by_export_hf(tmp_path: Path) -> None:
    spec = load_spec(Path(__file__).parent.parent / "configs" / "llama-style.json").model_dump()
    spec.update(vocab_size=50, emb_dim=32, n_heads=4, n_layers=1, block="parallel")
    with pytest.raises(CheckpointError, match="no GPT-2 equivalent(.|\n)*no Llama equivalent(.|\n)*block 'parallel'"):
        export_hf(build_model(spec), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llama_3_2_1b_spec_counts_its_parameters() -> None:
    model = build_model(CONFIGS / "llama-3.2-1b.json", device="meta")
    assert count_parameters(model).total == 1_235_814_400
    assert model.spec.positional.params["scaling"] == "llama3"


LLAMA_3_2_1B: dict[str, Any] = dict(
    model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
    tie_word_embeddings=True, rope_theta=500000.0, hidden_act="silu", attention_bias=False, mlp_bias=False,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192})


def test_llama_3_2_1b_spec_matches_its_hf_config() -> None:
    derived = spec_from_config(LLAMA_3_2_1B, name="llama-3.2-1b")
    assert derived == load_spec(CONFIGS / "llama-3.2-1b.json")


def test_llama_3_2_1b_spec_counts_what_transformers_counts() -> None:
    config = transformers.LlamaConfig(**{k: v for k, v in LLAMA_3_2_1B.items() if k != "model_type"})
    check_meta_count("llama-3.2-1b.json", transformers.LlamaForCausalLM, config, 1_235_814_400)


def test_rope_llama3_frequencies_equal_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = transformers.LlamaConfig(**BASE, rope_parameters=dict(LLAMA3))
    ref, scale = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    model = load_hf_spec_model(config)
    ours = model.pos_emb.inv_freq()
    assert scale == 1.0
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    assert not torch.equal(ours, load_hf_spec_model(transformers.LlamaConfig(**BASE, rope_theta=5e5)).pos_emb.inv_freq())


def load_hf_spec_model(config: Any) -> nn.Module:
    return build_model(spec_from_config(config.to_dict()), device="meta")


@pytest.mark.parametrize("rope, message", [
    ({"factor": 32.0}, "factor only apply with scaling 'llama3'"),
    ({"scaling": "llama3", "factor": 32.0}, "needs low_freq_factor, high_freq_factor, original_context_length"),
    ({"scaling": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_context_length": 64}, "high_freq_factor > low_freq_factor"),
])
def test_rope_scaling_parameters_are_never_silently_ignored(rope: dict[str, Any], message: str) -> None:
    spec = load_spec(Path(__file__).parent.parent / "configs" / "llama-style.json").model_dump()
    spec["positional"] = {"type": "llama.rope", **rope}
    with pytest.raises(SpecError, match=message):
        load_spec(spec)


def test_load_hf_reads_gpt2_folders_as_gpt2(tmp_path: Path) -> None:
    from modelkit.weights.hf import load_hf_gpt2
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50, n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    ours, ref = load_hf(tmp_path), load_hf_gpt2(tmp_path)
    assert ours.spec == ref.spec and ours.spec.positional.type == "learned"
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
