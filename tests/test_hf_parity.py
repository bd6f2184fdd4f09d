"""GPT-2 parity with Hugging Face transformers (the independent reference), import and export.

Randomly initialised ``transformers.GPT2LMHeadModel``s (every parameter perturbed, so biases and
layer-norm shifts are not zeros and a swapped key would show) are saved with ``save_pretrained`` and
loaded into modelkit and checked with the shared checks of ``tests/hf_parity.py`` (logits, greedy
tokens, cache, ``import-hf`` / ``export-hf``, the runtime); the rest are GPT-2's own (the key map,
old file layouts, the four sizes, export of the book's models). modelkit models are exported and
opened with ``from_pretrained``. No downloads. Run with ``pytest -s`` to see the max abs logit
differences.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_parity import (
    CONFIGS,
    TOL,
    batch,
    check_cache,
    check_cli_roundtrip,
    check_greedy,
    check_logits,
    check_runtime,
    max_diff,
    perturbed,
    save_tiny,
)
from modelkit import CheckpointError, build_model, load_spec
from modelkit.weights.checkpoint import read_checkpoint, save_checkpoint
from modelkit.cli import main as cli_main
from modelkit.generation import generate
from modelkit.weights.hf import export_hf_gpt2, load_hf_gpt2, spec_from_hf_config

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
import book_reference  # noqa: E402

# The size, and a second one exercising exact GELU, a custom eps, n_inner and an untied head.
SIZES: dict[str, dict[str, Any]] = {
    "2L-4H-64": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=64),
    "3L-2H-48-untied": dict(n_layer=3, n_head=2, n_embd=48, vocab_size=500, n_positions=40, n_inner=100,
                            activation_function="gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False),
}


def hf_config(**kw: Any) -> Any:
    return transformers.GPT2Config(bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)


def make_hf(kw: dict[str, Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return perturbed(transformers.GPT2LMHeadModel(hf_config(**kw)), seed)


@pytest.fixture(scope="module", params=list(SIZES))
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    model = make_hf(SIZES[request.param])
    return request.param, model, save_tiny(model, tmp_path_factory.mktemp(request.param))


def prompts(vocab: int, n: int = 7, batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# -- import ------------------------------------------------------------------------------------------

def test_import_logits_match_transformers(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    check_logits(load_hf_gpt2(folder), hf, f"gpt2 {name}", length=hf.config.n_positions)  # the whole window


def test_greedy_generation_matches_transformers(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    model = load_hf_gpt2(folder)
    check_greedy(model, hf, f"gpt2 {name}")  # modelkit.generation, with the KV cache and without
    x = batch(hf.config.vocab_size, 7, seed=1)  # check_greedy's prompts
    book = book_reference.generate_text_simple(model, x, 30, model.spec.context_length)  # the book's loop
    assert torch.equal(book, generate(model, x, max_new_tokens=30))


def test_kv_cache_logits_equal_no_cache(hf_folder: tuple[str, Any, Path]) -> None:
    _, hf, folder = hf_folder
    check_cache(load_hf_gpt2(folder), hf.config.vocab_size)


def test_optimize_for_inference_and_int8(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    check_runtime(load_hf_gpt2(folder), hf, f"gpt2 {name}")


def test_key_map_places_every_hf_tensor(hf_folder: tuple[str, Any, Path]) -> None:
    _, hf, folder = hf_folder
    model = load_hf_gpt2(folder)
    e = hf.config.n_embd
    for i, (h, blk) in enumerate(zip(hf.transformer.h, model.trf_blocks)):
        att = blk.att
        for j, lin in enumerate((att.W_query, att.W_key, att.W_value)):
            assert torch.equal(lin.weight, h.attn.c_attn.weight[:, j * e:(j + 1) * e].T), (i, j)
            assert torch.equal(lin.bias, h.attn.c_attn.bias[j * e:(j + 1) * e]), (i, j)
        assert torch.equal(att.out_proj.weight, h.attn.c_proj.weight.T)
        assert torch.equal(att.out_proj.bias, h.attn.c_proj.bias)
        assert torch.equal(blk.norm1.scale, h.ln_1.weight) and torch.equal(blk.norm1.shift, h.ln_1.bias)
        assert torch.equal(blk.norm2.scale, h.ln_2.weight) and torch.equal(blk.norm2.shift, h.ln_2.bias)
        assert torch.equal(blk.ff.layers[0].weight, h.mlp.c_fc.weight.T)
        assert torch.equal(blk.ff.layers[0].bias, h.mlp.c_fc.bias)
        assert torch.equal(blk.ff.layers[2].weight, h.mlp.c_proj.weight.T)
        assert torch.equal(blk.ff.layers[2].bias, h.mlp.c_proj.bias)
    assert torch.equal(model.tok_emb.weight, hf.transformer.wte.weight)
    assert torch.equal(model.pos_emb.weight, hf.transformer.wpe.weight)
    assert torch.equal(model.final_norm.scale, hf.transformer.ln_f.weight)
    assert torch.equal(model.final_norm.shift, hf.transformer.ln_f.bias)
    assert torch.equal(model.out_head.weight, hf.lm_head.weight)
    assert (model.out_head.weight is model.tok_emb.weight) == hf.config.tie_word_embeddings


def test_spec_comes_from_config_json(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    spec = load_hf_gpt2(folder).spec
    c = hf.config
    assert (spec.vocab_size, spec.context_length, spec.emb_dim, spec.n_heads, spec.n_layers) == \
        (c.vocab_size, c.n_positions, c.n_embd, c.n_head, c.n_layer)
    assert spec.qkv_bias and spec.drop_rate == 0.0 and spec.tie_embeddings == c.tie_word_embeddings
    assert spec.norm.params["eps"] == c.layer_norm_epsilon
    assert spec.feedforward.params["activation"].type == {"gelu_new": "gelu", "gelu": "gelu_exact"}[
        c.activation_function]


def test_pytorch_model_bin_with_old_buffers_equals_safetensors(hf_folder: tuple[str, Any, Path],
                                                               tmp_path: Path) -> None:
    _, hf, folder = hf_folder
    sd = dict(hf.state_dict())
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):  # what checkpoints of transformers < 4.3x carried
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    sd["lm_head.weight"] = hf.lm_head.weight.detach().clone()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    from_bin, from_st = load_hf_gpt2(tmp_path), load_hf_gpt2(folder)
    assert from_bin.state_dict().keys() == from_st.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(from_bin.state_dict().values(), from_st.state_dict().values()))


def test_gpt2model_keys_without_prefix_load(tmp_path: Path) -> None:
    hf = make_hf(SIZES["2L-4H-64"], seed=4)
    hf.transformer.save_pretrained(tmp_path)  # a GPT2Model: keys "h.0...", "wte.weight", no lm_head
    model = load_hf_gpt2(tmp_path)
    x = prompts(1000)
    with torch.no_grad():
        assert max_diff(model(x), hf(x).logits) < TOL


def test_sharded_safetensors_load(tmp_path: Path) -> None:
    hf = make_hf(SIZES["2L-4H-64"], seed=5)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    x = prompts(1000)
    with torch.no_grad():
        assert max_diff(load_hf_gpt2(tmp_path)(x), hf(x).logits) < TOL


def test_a_pretrained_config_can_replace_config_json(hf_folder: tuple[str, Any, Path], tmp_path: Path) -> None:
    _, hf, folder = hf_folder
    spec = spec_from_hf_config(json.loads((folder / "config.json").read_text()), name="explicit")
    (tmp_path / "spec.json").write_text(spec.to_json())
    assert load_hf_gpt2(folder, spec=tmp_path / "spec.json").spec.name == "explicit"
    wrong = spec.to_dict() | {"n_layers": spec.n_layers + 1}
    with pytest.raises(CheckpointError, match=rf"(?s)missing from the checkpoint.*trf_blocks.{spec.n_layers}.att"):
        load_hf_gpt2(folder, spec=wrong)


# -- the four pretrained sizes -------------------------------------------------------------------------

@pytest.mark.parametrize("name,n_embd,n_layer,n_head", [
    ("gpt2", 768, 12, 12), ("gpt2-medium", 1024, 24, 16), ("gpt2-large", 1280, 36, 20), ("gpt2-xl", 1600, 48, 25)])
def test_pretrained_configs_match_transformers(name: str, n_embd: int, n_layer: int, n_head: int) -> None:
    cfg = transformers.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head)  # HF defaults otherwise
    spec = load_spec(CONFIGS / f"{name}.json")
    assert spec == spec_from_hf_config(cfg.to_dict(), name=name)
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(cfg)
    hf_names = {k for k in hf.state_dict() if not k.startswith("lm_head")}
    ours = build_model(spec, device="meta")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert len(hf_names) == len(ours.state_dict()) - 1 - 4 * n_layer  # c_attn weight+bias: 6 tensors; head tied


# -- export ------------------------------------------------------------------------------------------

def modelkit_model(cfg: dict[str, Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return perturbed(build_model(cfg), seed)


EXPORTABLE = {
    "gpt2-like": {"vocab_size": 1000, "context_length": 64, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
                  "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": True},
    "book-default (no qkv bias, untied, relu)": {
        "vocab_size": 300, "context_length": 24, "emb_dim": 32, "n_heads": 2, "n_layers": 3, "drop_rate": 0.1,
        "qkv_bias": False, "feedforward": {"type": "mlp", "hidden_dim": 40, "activation": "relu"}},
}


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_export_opens_in_transformers_with_the_same_logits(name: str, tmp_path: Path) -> None:
    model = modelkit_model(EXPORTABLE[name])
    export_hf_gpt2(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = prompts(model.spec.vocab_size, n=model.spec.context_length)
    with torch.no_grad():
        diff = max_diff(hf(x).logits, model(x))
    print(f"\n[parity] export {name}: max abs logit difference {diff:.3e}")
    assert diff < TOL
    # and back: the folder imports to the same weights
    back = load_hf_gpt2(tmp_path)
    with torch.no_grad():
        assert max_diff(back(x), model(x)) < TOL


def test_export_refuses_models_without_a_gpt2_equivalent(tmp_path: Path) -> None:
    cfg = EXPORTABLE["gpt2-like"] | {"block": "post_norm", "positional": "sinusoidal",
                                     "norm": {"type": "layernorm", "bias": False}}
    with pytest.raises(CheckpointError) as err:
        export_hf_gpt2(build_model(cfg), tmp_path / "out")
    text = str(err.value)
    assert "has no GPT-2 equivalent" in text
    assert "positional 'sinusoidal'" in text and "block 'post_norm'" in text and "'bias': False" in text
    assert not (tmp_path / "out").exists()  # nothing written


def test_unsupported_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="activation_function 'gelu_fast' has no modelkit equivalent"):
        spec_from_hf_config(hf_config(activation_function="gelu_fast").to_dict())
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        spec_from_hf_config({"model_type": "llama", "vocab_size": 10})
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        (tmp_path / "config.json").write_text(hf_config().to_json_string())
        load_hf_gpt2(tmp_path)


def test_unknown_tensors_are_listed(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    hf = make_hf(SIZES["2L-4H-64"], seed=6)
    hf.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["transformer.h.0.attn.q_attn.weight"] = torch.zeros(64, 64)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"not part of GPT-2 \(1\): transformer.h.0.attn.q_attn.weight"):
        load_hf_gpt2(tmp_path)


# -- CLI ---------------------------------------------------------------------------------------------

def test_cli_import_then_export_round_trip(hf_folder: tuple[str, Any, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    name, hf, folder = hf_folder
    check_cli_roundtrip(folder, hf, tmp_path, "GPT2LMHeadModel", "gpt2")
    assert "wrote" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "gpt2.safetensors").user_metadata == {"source": f"hf:{folder}"}


def test_cli_import_with_dtype(hf_folder: tuple[str, Any, Path], tmp_path: Path) -> None:
    _, _, folder = hf_folder
    assert cli_main(["import-hf", str(folder), str(tmp_path / "bf16.safetensors"), "--dtype", "bfloat16"]) == 0
    assert read_checkpoint(tmp_path / "bf16.safetensors").dtypes == ["BF16"]


def test_cli_export_refusal_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_checkpoint(build_model(EXPORTABLE["gpt2-like"] | {"block": "parallel"}), tmp_path / "p.safetensors")
    assert cli_main(["export-hf", str(tmp_path / "p.safetensors"), str(tmp_path / "out")]) == 2
    assert "block 'parallel' (GPT-2 blocks are pre_norm)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_import_of_a_non_hf_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["import-hf", str(tmp_path), str(tmp_path / "x.safetensors")]) == 2
    assert "config.json" in capsys.readouterr().err
