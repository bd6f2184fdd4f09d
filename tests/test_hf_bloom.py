"""BLOOM parity with Hugging Face transformers: ``BloomForCausalLM`` folders imported and exported.

Tiny randomly initialised ``transformers.BloomForCausalLM``s (every parameter perturbed, so biases
are nonzero and norm weights are not ones; 4 heads tied, and 6 heads untied for ALiBi's slopes of a
head count that is not a power of two) are saved with ``save_pretrained`` and checked through
:mod:`hf_parity` (logits, greedy tokens, cache, ``import-hf``/``export-hf``, the runtime); no
downloads. Also: ALiBi's slopes and bias against transformers', the embedding LayerNorm, the exact
split of the interleaved ``query_key_value``, the config fields refused, the specs export refuses,
and BLOOM-560M's parameter count. Run with ``pytest -s`` to see the differences printed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hf_parity import (CONFIGS, TOL, batch, check_cli_roundtrip, check_family, check_meta_count, check_runtime,
                       hf_logits, max_diff, perturbed, save_tiny)
from modelkit import CheckpointError, build_model, load_spec
from modelkit.cli import main as cli_main
from modelkit.weights.hf_families import export_family_of, export_hf, load_hf
from modelkit.weights.hf_families.base import join_qkv, split_qkv
from modelkit.weights.hf_families.bloom import DEFAULT_CONTEXT_LENGTH, config_from_spec, spec_from_config, to_hf

transformers = pytest.importorskip("transformers")
pytest.importorskip("modelkit_llama")
from modelkit_llama.positional import ALiBi, alibi_slopes  # noqa: E402
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor  # noqa: E402

BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, n_layer=2, n_head=4, hidden_dropout=0.0,
                            attention_dropout=0.0)
VARIANTS: dict[str, dict[str, Any]] = {"4-heads-tied": {},
                                       "6-heads-untied": dict(hidden_size=48, n_head=6, tie_word_embeddings=False)}


def make_hf(seed: int = 0, **kw: Any) -> Any:
    """A perturbed random ``BloomForCausalLM`` (eval mode, float32)."""
    torch.manual_seed(seed)
    return perturbed(transformers.BloomForCausalLM(transformers.BloomConfig(**{**BASE, **kw})), seed)


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    hf = make_hf(**VARIANTS[request.param])
    return request.param, hf, save_tiny(hf, tmp_path_factory.mktemp(f"bloom-{request.param}"))


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The 4-head tied model alone (the tests whose messages name its sizes)."""
    hf = make_hf()
    return hf, save_tiny(hf, tmp_path_factory.mktemp("bloom-tied"))


def _edit_config(folder: Path, out: Path, change: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    """A copy of ``folder``'s model in ``out`` whose ``config.json`` has ``change`` applied, ``drop`` removed."""
    out.mkdir(exist_ok=True)
    (out / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    for field in drop:
        del config[field]
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_spec_is_registered_parts(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    spec = load_hf(folder).spec
    assert spec.positional.type == "llama.alibi"
    assert spec.embedding_norm is not None and spec.embedding_norm.model_dump() == {
        "type": "layernorm", "eps": 1e-5, "bias": True}
    assert spec.norm == spec.embedding_norm
    assert spec.feedforward.params["activation"].type == "gelu"
    assert spec.feedforward.params["hidden_dim"] == 4 * hf.config.hidden_size
    assert spec.block.type == "pre_norm" and spec.qkv_bias and spec.attention.params["out_bias"]
    assert spec.tie_embeddings == hf.config.tie_word_embeddings
    assert spec.context_length == DEFAULT_CONTEXT_LENGTH == 2048  # BLOOM's training length: no field states one


def test_logits_greedy_and_cache_match_transformers(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    check_family(folder, hf, f"bloom {name}")


def test_import_hf_cli_then_export_hf_roundtrip(hf_folder: tuple[str, Any, Path], tmp_path: Path) -> None:
    name, hf, folder = hf_folder
    back = check_cli_roundtrip(folder, hf, tmp_path, "BloomForCausalLM", f"bloom {name}")
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert back.config.n_head == hf.config.n_head
    for key, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_optimize_for_inference_and_int8(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    check_runtime(load_hf(folder), hf, f"bloom {name}")


def test_long_context_parity(hf_folder: tuple[str, Any, Path]) -> None:
    """512 tokens: ALiBi's bias grows with the distance, so the slopes' last bits would show here."""
    name, hf, folder = hf_folder
    x = batch(hf.config.vocab_size, 512, seed=7, size=1)
    with torch.no_grad():
        diff = max_diff(load_hf(folder)(x), hf_logits(hf, x))
    print(f"\n[bloom {name}] 512 tokens: max |logit diff| {diff:.2e}")
    assert diff < TOL


# -- ALiBi ----------------------------------------------------------------------------------------

def _paper_slopes(n: int) -> list[float]:
    """The ALiBi reference code's slopes (Press et al.; Megatron-DeepSpeed, BLOOM's training code)."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _paper_slopes(2 * closest)[0::2][:n - closest]


@pytest.mark.parametrize("n_heads", [1, 2, 4, 6, 8, 12, 16, 20, 32, 48, 64, 96, 112])
def test_alibi_slopes_are_blooms(n_heads: int) -> None:
    """Exactly the reference code's float32 slopes; transformers' float32 ``pow`` is within 3e-6 of them."""
    ours = torch.tensor(alibi_slopes(n_heads), dtype=torch.float32)
    assert torch.equal(ours, torch.tensor(_paper_slopes(n_heads), dtype=torch.float32))
    theirs = _get_alibi_slopes(n_heads, torch.device("cpu"))
    torch.testing.assert_close(ours, theirs, rtol=3e-6, atol=0)
    if n_heads <= 8 and n_heads & (n_heads - 1) == 0:  # exact powers of two: both exact
        assert torch.equal(ours, theirs)


def test_alibi_bias_is_blooms_up_to_a_constant_per_query() -> None:
    """transformers adds slope·j for key j; llama.alibi adds slope·(j − i): the same softmax row."""
    n_heads, s = 6, 9
    dims = load_spec(dict(vocab_size=10, context_length=16, emb_dim=48, n_heads=n_heads, n_layers=1)).dims
    pos = torch.arange(s)
    ours = ALiBi(dims).attention_bias(pos, pos)  # (h, s, s)
    theirs = build_alibi_tensor(torch.ones(1, s, dtype=torch.long), n_heads, torch.float32)  # (h, 1, s)
    slopes = torch.tensor(alibi_slopes(n_heads))
    torch.testing.assert_close(ours - theirs, -slopes[:, None, None] * pos[None, :, None].float().expand(-1, -1, s),
                               rtol=0, atol=1e-5)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    scores = torch.randn(n_heads, s, s)
    torch.testing.assert_close((scores + ours).masked_fill(~causal, -torch.inf).softmax(-1),
                               (scores + theirs).masked_fill(~causal, -torch.inf).softmax(-1), rtol=0, atol=1e-6)


# -- the embedding LayerNorm and the fused query_key_value ----------------------------------------

def test_the_embedding_layernorm_matters(hf_folder: tuple[str, Any, Path]) -> None:
    """Without ``emb_norm`` the logits move far off: the parity above covers the embedding LayerNorm."""
    name, hf, folder = hf_folder
    model = load_hf(folder)
    assert torch.equal(model.emb_norm.scale, hf.transformer.word_embeddings_layernorm.weight)
    assert torch.equal(model.emb_norm.shift, hf.transformer.word_embeddings_layernorm.bias)
    x = batch(hf.config.vocab_size, 10, seed=4, size=1)
    model.emb_norm = nn.Identity()
    with torch.no_grad():
        assert max_diff(model(x), hf_logits(hf, x)) > 1e-2


def test_qkv_split_is_exact_and_joins_back(hf_folder: tuple[str, Any, Path]) -> None:
    name, hf, folder = hf_folder
    model = load_hf(folder)
    heads, hidden = hf.config.n_head, hf.config.hidden_size
    fused_layer = hf.transformer.h[1].self_attention.query_key_value
    ours = model.trf_blocks[1].att
    for p in ("weight", "bias"):
        parts = [getattr(getattr(ours, n), p) for n in ("W_query", "W_key", "W_value")]
        fused = getattr(fused_layer, p).detach()
        view = fused.reshape(heads, 3, hidden // heads, *fused.shape[1:])  # BloomAttention._reshape's layout
        for j, part in enumerate(parts):
            assert torch.equal(part, view[:, j].reshape(hidden, *fused.shape[1:]))
            assert torch.equal(split_qkv(fused, heads, j), part)
        assert torch.equal(join_qkv(*parts, heads), fused)
    exported = to_hf(model)
    expected = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight" or not hf.config.tie_word_embeddings}
    assert set(exported) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(exported[key], tensor), key


def test_bloom_model_names_are_read(tmp_path: Path) -> None:
    """``BloomModel`` files (no ``transformer.`` prefix, as the original bigscience checkpoints) load."""
    hf = make_hf()
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert "h.0.self_attention.query_key_value.weight" in sd
    hf.save_pretrained(tmp_path, state_dict=sd)
    x = batch(300, 12, seed=6)
    with torch.no_grad():
        assert max_diff(load_hf(tmp_path)(x), hf_logits(hf, x)) < TOL


# -- config fields ----------------------------------------------------------------------------------

def test_aliases_and_seq_length_are_read(hf_folder: tuple[str, Any, Path], tmp_path: Path) -> None:
    """Older configs' ``n_embed``, ``num_hidden_layers``, ``num_attention_heads`` read as ``hidden_size``,
    ``n_layer``, ``n_head``; ``seq_length`` is the context length; training-only fields are not refused."""
    name, hf, folder = hf_folder
    c = hf.config
    change = dict(n_embed=c.hidden_size, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, seq_length=96,
                  hidden_dropout=0.1, attention_dropout=0.1, pretraining_tp=4, offset_alibi=100, n_inner=None)
    model = load_hf(_edit_config(folder, tmp_path / "old", change, drop=("hidden_size", "n_layer", "n_head")))
    assert (model.spec.emb_dim, model.spec.n_layers, model.spec.n_heads) == (c.hidden_size, 2, c.n_head)
    assert model.spec.context_length == 96 and model.spec.drop_rate == 0.0
    x = batch(300, 9, seed=5)
    with torch.no_grad():
        assert max_diff(model(x), hf_logits(hf, x)) < TOL
    assert config_from_spec(model.spec)["seq_length"] == 96  # export keeps it


def test_pretraining_tp_changes_the_maths_only_with_slow_but_exact(tied_folder: tuple[Any, Path],
                                                                   tmp_path: Path) -> None:
    """Why only the pair is refused: transformers' tensor-parallel slices drop two biases."""
    hf, folder = tied_folder
    x = batch(300, 9, seed=8)
    ref = hf_logits(hf, x)
    tp = transformers.BloomForCausalLM.from_pretrained(folder, pretraining_tp=2).eval()
    slow = transformers.BloomForCausalLM.from_pretrained(folder, pretraining_tp=2, slow_but_exact=True).eval()
    assert max_diff(hf_logits(tp, x), ref) == 0.0
    assert max_diff(hf_logits(slow, x), ref) > 1e-2
    with torch.no_grad():
        assert max_diff(load_hf(_edit_config(folder, tmp_path / "tp", {"pretraining_tp": 2}))(x), ref) < TOL


@pytest.mark.parametrize("change, field", [
    ({"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm true"),
    ({"pretraining_tp": 2, "slow_but_exact": True}, "pretraining_tp 2 with slow_but_exact true"),
    ({"n_embed": 32}, "hidden_size 64 and n_embed 32 differ"),
    ({"num_attention_heads": 8}, "n_head 4 and num_attention_heads 8 differ"),
    ({"num_hidden_layers": 3}, "n_layer 2 and num_hidden_layers 3 differ"),
    ({"n_head": 5}, "hidden_size 64 is not divisible by n_head 5"),
    ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon"),
    ({"hidden_dropout": 1.5}, "hidden_dropout"),
    ({"seq_length": 0}, "seq_length"),
    ({"n_layer": True}, "n_layer"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
])
def test_unsupported_or_malformed_configs_are_refused(tied_folder: tuple[Any, Path], tmp_path: Path,
                                                      change: dict[str, Any], field: str) -> None:
    hf, folder = tied_folder
    with pytest.raises(CheckpointError) as info:
        load_hf(_edit_config(folder, tmp_path / "bad", change))
    assert field in str(info.value)
    assert "config.json" in str(info.value)


def test_spec_from_config_refuses_another_model_type() -> None:
    with pytest.raises(CheckpointError, match="model_type is 'opt', not 'bloom'"):
        spec_from_config(dict(BASE, model_type="opt"))


@pytest.mark.parametrize("extra", ["transformer.h.0.mlp.fc3.bias", "transformer.word_embeddings.bias"])
def test_unknown_tensor_is_refused(tmp_path: Path, extra: str) -> None:
    hf = make_hf()
    sd = dict(hf.state_dict())
    sd[extra] = torch.ones(64)
    hf.save_pretrained(tmp_path, state_dict=sd)
    with pytest.raises(CheckpointError, match=rf"not part of BLOOM \(1\): {extra}"):
        load_hf(tmp_path)


def test_a_fused_qkv_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    hf = make_hf()
    sd = dict(hf.state_dict())
    sd["transformer.h.1.self_attention.query_key_value.bias"] = torch.ones(100)
    hf.save_pretrained(tmp_path, state_dict=sd)
    with pytest.raises(CheckpointError, match=r"h\.1\.self_attention\.query_key_value\.bias: shape \(100,\)"):
        load_hf(tmp_path)


# -- export -----------------------------------------------------------------------------------------

def _bloom_spec() -> dict[str, Any]:
    return spec_from_config(dict(BASE, model_type="bloom")).model_dump()


def test_export_picks_bloom() -> None:
    assert export_family_of(load_spec(_bloom_spec())).model_type == "bloom"


@pytest.mark.parametrize("change, part", [
    ({"embedding_norm": None}, "embedding_norm None"),
    ({"embedding_norm": {"type": "layernorm", "eps": 1e-6}}, "embedding_norm {'type': 'layernorm', 'eps': 1e-06"),
    ({"embedding_norm": {"type": "llama.rmsnorm"}}, "embedding_norm {'type': 'llama.rmsnorm'"),
    ({"positional": "llama.rope"}, "positional {'type': 'llama.rope'"),
    ({"feedforward": {"type": "mlp", "activation": "gelu_exact"}}, "feedforward"),
    ({"feedforward": {"type": "mlp", "hidden_dim": 100}}, "4 x emb_dim"),
    ({"qkv_bias": False}, "qkv_bias False"),
    ({"block": "post_norm"}, "block 'post_norm'"),
    ({"head_bias": True}, "head_bias true (a BLOOM config cannot state it)"),
    ({"embedding_scale": 2.0}, "embedding_scale 2.0"),
])
def test_export_refuses_specs_with_no_bloom_equivalent(change: dict[str, Any], part: str) -> None:
    with pytest.raises(CheckpointError) as info:
        config_from_spec(load_spec({**_bloom_spec(), **change}))
    assert "has no BLOOM equivalent; these parts differ:" in str(info.value)
    assert part in str(info.value)


def test_export_hf_writes_nothing_for_a_refused_spec(tmp_path: Path) -> None:
    model = build_model({**_bloom_spec(), "embedding_norm": None})
    with pytest.raises(CheckpointError, match="embedding_norm None"):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- BLOOM-560M -------------------------------------------------------------------------------------

BLOOM_560M: dict[str, Any] = dict(  # bigscience/bloom-560m's config.json (its Megatron-era fields included)
    model_type="bloom", architectures=["BloomForCausalLM"], apply_residual_connection_post_layernorm=False,
    attention_dropout=0.0, attention_softmax_in_fp32=True, bias_dropout_fusion=True, bos_token_id=1,
    eos_token_id=2, hidden_dropout=0.0, hidden_size=1024, initializer_range=0.02, layer_norm_epsilon=1e-05,
    masked_softmax_fusion=True, n_head=16, n_inner=None, n_layer=24, offset_alibi=100, pad_token_id=3,
    pretraining_tp=1, skip_bias_add=True, skip_bias_add_qkv=False, slow_but_exact=False, unk_token_id=0,
    use_cache=True, vocab_size=250880)


def test_bloom_560m_spec_matches_its_hf_config() -> None:
    assert spec_from_config(BLOOM_560M, name="bloom-560m") == load_spec(CONFIGS / "bloom-560m.json")


def test_bloom_560m_counts_what_transformers_counts(capsys: pytest.CaptureFixture[str]) -> None:
    config = transformers.BloomConfig(**{k: v for k, v in BLOOM_560M.items() if k != "model_type"})
    check_meta_count("bloom-560m.json", transformers.BloomForCausalLM, config, 559_214_592)
    assert cli_main(["info", str(CONFIGS / "bloom-560m.json")]) == 0
    assert "559,214,592" in capsys.readouterr().out
