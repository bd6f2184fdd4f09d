"""OPT parity with Hugging Face transformers: ``OPTForCausalLM`` folders imported and exported.

Tiny randomly initialised ``transformers.OPTForCausalLM``s (every parameter perturbed, so biases are
nonzero and norm weights are not ones) are saved with ``save_pretrained`` and loaded with
:func:`modelkit.weights.hf_families.load_hf` / ``modelkit import-hf``; exported back with
``export-hf`` and opened with ``AutoModelForCausalLM.from_pretrained``. No downloads.
Run with ``pytest -s`` to see the max abs logit differences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from modelkit import CheckpointError, build_model, load_spec
from modelkit.cli import main as cli_main
from modelkit.generation import generate
from modelkit.introspect import count_parameters
from modelkit.weights.checkpoint import load_checkpoint
from modelkit.weights.hf_families import export_family_of, export_hf, load_hf
from modelkit.weights.hf_families.opt import spec_from_config

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).parent.parent / "configs" / "pretrained"
TOL = 1e-4
BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
VARIANTS: dict[str, dict[str, Any]] = {"tied": dict(tie_word_embeddings=True), "untied": dict(tie_word_embeddings=False)}


def make_hf(kw: dict[str, Any], seed: int = 0) -> Any:
    """A perturbed random ``OPTForCausalLM`` (eval mode, float32)."""
    torch.manual_seed(seed)
    config = transformers.OPTConfig(**BASE, **kw)
    model = transformers.OPTForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def hf_logits(hf: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' logits for an unpadded batch (an all-ones attention mask: positions 0..n-1)."""
    with torch.no_grad():
        return hf(x, attention_mask=torch.ones_like(x)).logits


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    hf = make_hf(VARIANTS[request.param])
    folder = tmp_path_factory.mktemp(f"opt-{request.param}")
    hf.save_pretrained(folder)
    return request.param, hf, folder


def test_saved_folder_has_the_offset_position_table(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    assert json.loads((folder / "config.json").read_text())["model_type"] == "opt"
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.decoder.embed_positions.weight").get_shape() == [64 + 2, 64]
    assert "model.decoder.layers.1.self_attn.out_proj.bias" in keys
    assert ("lm_head.weight" in keys) == (not hf.config.tie_word_embeddings)


def test_logits_match_transformers(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    model = load_hf(folder)
    assert model.spec.positional.params == {"offset": 2}
    assert model.spec.tie_embeddings == hf.config.tie_word_embeddings
    assert torch.equal(model.pos_emb.weight, hf.model.decoder.embed_positions.weight)
    x = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(hf, x)
    with torch.no_grad():
        ours = model(x)
    diff = (ours - ref).abs().max().item()
    print(f"\n[opt parity] {name}: max |logit diff| {diff:.2e}")
    assert ref.abs().max() > 0.1  # a real signal, not zeros
    assert diff < TOL


def test_the_offset_matters(hf_folder: tuple[str, Any, Path]) -> None:
    """Reading positions from row 0 (offset 0) changes the logits, so the parity above covers the offset."""
    name, hf, folder = hf_folder
    model = load_hf(folder)
    x = torch.randint(0, hf.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    model.pos_emb.offset = 0
    with torch.no_grad():
        assert (model(x) - hf_logits(hf, x)).abs().max().item() > 1e-2


def test_greedy_generation_and_cache_match_transformers(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    model = load_hf(folder)
    x = torch.randint(3, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=30,
                          min_new_tokens=30, pad_token_id=hf.config.pad_token_id)
    cached = generate(model, x, max_new_tokens=30)
    uncached = generate(model, x, max_new_tokens=30, use_cache=False)
    assert ref.shape == (2, 7 + 30)
    print(f"\n[opt parity] greedy {name}: 30 new tokens identical: {torch.equal(cached, ref)}")
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
    ckpt = tmp_path / "opt.safetensors"
    assert cli_main(["import-hf", str(folder), str(ckpt)]) == 0
    assert "wrote" in capsys.readouterr().out
    model = load_checkpoint(ckpt)
    x = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(hf, x)
    with torch.no_grad():
        assert (model(x) - ref).abs().max().item() < TOL
    out = tmp_path / "exported"
    assert cli_main(["export-hf", str(ckpt), str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "OPTForCausalLM"
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    diff = (hf_logits(back, x) - ref).abs().max().item()
    print(f"\n[opt parity] export {name}: max |logit diff| {diff:.2e}")
    assert diff < TOL


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
    hf = make_hf(VARIANTS["tied"])
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_hf(tmp_path)
    assert field in str(info.value)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("extra", ["model.decoder.project_in.weight", "model.decoder.layers.0.fc3.bias",
                                   "lm_head.bias"])
def test_unknown_tensor_is_refused(tmp_path: Path, extra: str) -> None:
    hf = make_hf(VARIANTS["untied"])
    sd = hf.state_dict()
    sd[extra] = torch.ones(64)
    hf.save_pretrained(tmp_path, state_dict=sd)
    with pytest.raises(CheckpointError, match=rf"not part of OPT \(1\): {extra}"):
        load_hf(tmp_path)


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
    with torch.device("meta"):
        ref = transformers.OPTForCausalLM(config)
    assert sum(p.numel() for p in ref.parameters()) == 125_239_296


def test_info_reports_the_opt_125m_total(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["info", str(CONFIGS / "opt-125m.json")]) == 0
    assert "125,239,296" in capsys.readouterr().out
