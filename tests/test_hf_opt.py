"""OPT parity with Hugging Face transformers: ``OPTForCausalLM`` folders imported and exported.

Tiny randomly initialised ``transformers.OPTForCausalLM``s (every parameter perturbed, so biases are
nonzero and norm weights are not ones) are saved with ``save_pretrained`` and loaded with
the shared checks of ``tests/hf_parity.py`` (logits, greedy tokens, cache, ``import-hf`` / ``export-hf``,
the runtime); the rest are OPT's own: the position offset, ``decoder.*`` names, export's choice of
family, refusals, the OPT-125M spec. No downloads. Run with ``pytest -s`` to see the max abs logit
differences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_parity import CONFIGS, TOL, FamilyParity, check_config_refused, check_meta_count, check_tensor_refused, \
    hf_logits, perturbed, save_tiny
from modelkit import CheckpointError, build_model, load_spec
from modelkit.cli import main as cli_main
from modelkit.introspect import count_parameters
from modelkit.weights.hf_families import export_family_of, export_hf, load_hf
from modelkit.weights.hf_families.opt import spec_from_config

transformers = pytest.importorskip("transformers")

BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
VARIANTS: dict[str, dict[str, Any]] = {"tied": dict(tie_word_embeddings=True), "untied": dict(tie_word_embeddings=False)}


def make_hf(kw: dict[str, Any], seed: int = 0) -> Any:
    """A perturbed random ``OPTForCausalLM`` (eval mode, float32)."""
    torch.manual_seed(seed)
    config = transformers.OPTConfig(**BASE, **kw)
    return perturbed(transformers.OPTForCausalLM(config), seed)


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    hf = make_hf(VARIANTS[request.param])
    return request.param, hf, save_tiny(hf, tmp_path_factory.mktemp(f"opt-{request.param}"))


def test_saved_folder_has_the_offset_position_table(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    assert json.loads((folder / "config.json").read_text())["model_type"] == "opt"
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.decoder.embed_positions.weight").get_shape() == [64 + 2, 64]
    assert "model.decoder.layers.1.self_attn.out_proj.bias" in keys
    assert ("lm_head.weight" in keys) == (not hf.config.tie_word_embeddings)


class TestParity(FamilyParity):
    architecture = "OPTForCausalLM"


def test_spec_has_the_offset_table(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    model = load_hf(folder)
    assert model.spec.positional.params == {"offset": 2}
    assert model.spec.tie_embeddings == hf.config.tie_word_embeddings
    assert torch.equal(model.pos_emb.weight, hf.model.decoder.embed_positions.weight)


def test_the_offset_matters(hf_folder: tuple[str, Any, Path]) -> None:
    """Reading positions from row 0 (offset 0) changes the logits, so the parity above covers the offset."""
    name, hf, folder = hf_folder
    model = load_hf(folder)
    x = torch.randint(0, hf.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    model.pos_emb.offset = 0
    with torch.no_grad():
        assert (model(x) - hf_logits(hf, x)).abs().max().item() > 1e-2


def test_opt_decoder_model_names_are_read(tmp_path: Path) -> None:
    """``OPTModel`` folders (names ``decoder.*``, as the original facebook/opt checkpoints) load too."""
    hf = make_hf(VARIANTS["tied"])
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    hf.save_pretrained(tmp_path, state_dict=sd)
    model = load_hf(tmp_path)
    x = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model(x) - hf_logits(hf, x)).abs().max().item() < TOL


def test_export_picks_opt_by_the_offset() -> None:
    spec = spec_from_config(dict(BASE, model_type="opt"))
    assert export_family_of(spec).model_type == "opt"
    data = spec.model_dump()
    data["positional"] = {"type": "learned", "offset": 0}
    assert export_family_of(load_spec(data)).model_type == "gpt2"  # GPT-2 with relu


def test_export_refuses_what_opt_cannot_state(tmp_path: Path) -> None:
    data = spec_from_config(dict(BASE, model_type="opt")).model_dump()
    data["positional"]["offset"] = 3
    with pytest.raises(CheckpointError) as info:
        export_hf(build_model(data), tmp_path / "out")
    assert "positional offset 3 (GPT-2's wpe has no offset: 0)" in str(info.value)
    assert "no OPT equivalent; these parts differ:\n  positional {'type': 'learned', 'offset': 3}" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, field", [
    ({"do_layer_norm_before": False}, "do_layer_norm_before false"),
    ({"word_embed_proj_dim": 32}, "word_embed_proj_dim 32"),
    ({"enable_bias": False}, "enable_bias false"),
    ({"layer_norm_elementwise_affine": False}, "layer_norm_elementwise_affine false"),
    ({"activation_function": "gelu"}, "activation_function 'gelu'"),
    ({"_remove_final_layer_norm": True}, "_remove_final_layer_norm True"),
    ({"do_layer_norm_before": "yes"}, "do_layer_norm_before"),
    ({"ffn_dim": 0}, "ffn_dim"),
])
def test_unsupported_or_malformed_configs_are_refused(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    check_config_refused(make_hf(VARIANTS["tied"]), tmp_path, change, field)


@pytest.mark.parametrize("extra", ["model.decoder.project_in.weight", "model.decoder.layers.0.fc3.bias",
                                   "lm_head.bias"])
def test_unknown_tensor_is_refused(tmp_path: Path, extra: str) -> None:
    check_tensor_refused(make_hf(VARIANTS["untied"]), tmp_path, extra, "OPT")


OPT_125M: dict[str, Any] = dict(
    model_type="opt", architectures=["OPTForCausalLM"], vocab_size=50272, hidden_size=768, ffn_dim=3072,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768,
    do_layer_norm_before=True, _remove_final_layer_norm=False, activation_function="relu", dropout=0.1,
    attention_dropout=0.0, enable_bias=True, layer_norm_elementwise_affine=True, tie_word_embeddings=True,
    pad_token_id=1, bos_token_id=2, eos_token_id=2)


def test_opt_125m_spec_counts_its_parameters() -> None:
    model = build_model(CONFIGS / "opt-125m.json", device="meta")
    assert model.pos_emb.weight.shape == (2048 + 2, 768)
    assert count_parameters(model).total == 125_239_296


def test_opt_125m_spec_matches_its_hf_config() -> None:
    assert spec_from_config(OPT_125M, name="opt-125m") == load_spec(CONFIGS / "opt-125m.json")


def test_opt_125m_spec_counts_what_transformers_counts() -> None:
    config = transformers.OPTConfig(**{k: v for k, v in OPT_125M.items() if k != "model_type"})
    check_meta_count("opt-125m.json", transformers.OPTForCausalLM, config, 125_239_296)


def test_info_reports_the_opt_125m_total(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["info", str(CONFIGS / "opt-125m.json")]) == 0
    assert "125,239,296" in capsys.readouterr().out
