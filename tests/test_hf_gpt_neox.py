"""GPT-NeoX (Pythia) parity with Hugging Face transformers: ``GPTNeoXForCausalLM`` folders imported and exported.

Tiny randomly initialised ``transformers.GPTNeoXForCausalLM``s (rotary_pct 0.25, every parameter
perturbed, so biases are nonzero and norm weights are not ones) are saved with ``save_pretrained``
and checked with the shared checks of ``tests/hf_parity.py`` (logits, greedy tokens, cache,
``import-hf`` / ``export-hf``, the runtime); the rest are GPT-NeoX's own: the fused ``query_key_value``,
old config fields and buffers, refusals, the Pythia-160M spec. No downloads. Also unit tests of the
two parameters GPT-NeoX needs: ``parallel``'s ``shared_norm`` and ``llama.rope``'s
``rotary_fraction``. Run with ``pytest -s`` to see the max abs logit differences.
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
from modelkit.components.base import ModelDims
from modelkit.components.block import ParallelBlock
from modelkit.introspect import count_parameters
from modelkit.runtime import step_of
from modelkit.weights.hf_families import export_family_of, export_hf, load_hf
from modelkit.weights.hf_families.gpt_neox import join_qkv, spec_from_config, split_qkv

transformers = pytest.importorskip("transformers")
modelkit_llama = pytest.importorskip("modelkit_llama")
from modelkit_llama.positional import RoPE, rotate_half  # noqa: E402

BASE: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.25,
                            attention_dropout=0.0, hidden_dropout=0.0, tie_word_embeddings=False)


def make_hf(seed: int = 0, **kw: Any) -> Any:
    """A perturbed random ``GPTNeoXForCausalLM`` (eval mode, float32)."""
    torch.manual_seed(seed)
    return perturbed(transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**BASE, **kw})), seed)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    hf = make_hf()
    return "rotary 0.25", hf, save_tiny(hf, tmp_path_factory.mktemp("gpt-neox"))


def test_spec_is_registered_parts(hf_folder: tuple[str, Any, Path]) -> None:
    _, hf, folder = hf_folder
    spec = load_hf(folder).spec
    assert spec.positional.type == "llama.rope" and spec.positional.params["rotary_fraction"] == 0.25
    assert spec.block.type == "parallel" and spec.block.params == {"shared_norm": False}
    assert spec.feedforward.params["activation"].type == "gelu_exact"
    assert not spec.tie_embeddings and spec.qkv_bias


class TestParity(FamilyParity):
    architecture = "GPTNeoXForCausalLM"

    def check_export(self, back: Any, hf: Any) -> None:
        assert back.config.rope_parameters["partial_rotary_factor"] == 0.25
        for name, tensor in hf.state_dict().items():
            assert torch.equal(back.state_dict()[name], tensor), name


def test_qkv_split_is_exact_and_joins_back(hf_folder: tuple[str, Any, Path]) -> None:
    _, hf, folder = hf_folder
    model = load_hf(folder)
    att = hf.gpt_neox.layers[1].attention.query_key_value
    ours = model.trf_blocks[1].att
    for p in ("weight", "bias"):
        parts = [getattr(getattr(ours, n), p) for n in ("W_query", "W_key", "W_value")]
        fused = getattr(att, p).detach()
        view = fused.reshape(4, 3, 16, *fused.shape[1:])
        for j, part in enumerate(parts):
            assert torch.equal(part, view[:, j].reshape(64, *fused.shape[1:]))
            assert torch.equal(split_qkv(fused, 4, j), part)
        assert torch.equal(join_qkv(*parts, 4), fused)


def test_the_rotary_fraction_and_second_norm_matter(hf_folder: tuple[str, Any, Path]) -> None:
    """Full rotation, or the feed-forward reading norm1, changes the logits: parity covers both."""
    _, hf, folder = hf_folder
    x = torch.randint(0, hf.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    ref = hf_logits(hf, x)
    model = load_hf(folder)
    model.pos_emb.rotary_dims = 16
    with torch.no_grad():
        assert (model(x) - ref).abs().max().item() > 1e-2
    model = load_hf(folder)
    for block in model.trf_blocks:
        block.shared_norm = True
    with torch.no_grad():
        assert (model(x) - ref).abs().max().item() > 1e-2


def test_old_config_fields_and_buffers_are_read(hf_folder: tuple[str, Any, Path], tmp_path: Path) -> None:
    """A transformers 4 style config (``rotary_pct``, ``rotary_emb_base``) and the non-persistent
    buffers old files hold (``attention.bias``, ``masked_bias``, ``rotary_emb.inv_freq``) load."""
    _, hf, folder = hf_folder
    sd = dict(hf.state_dict())
    sd["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    sd["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    hf.save_pretrained(tmp_path, state_dict=sd)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rotary_pct=0.25, rotary_emb_base=10000, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_hf(tmp_path)
    x = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model(x) - hf_logits(hf, x)).abs().max().item() < TOL


def test_tied_head_and_lm_head_name(tmp_path: Path) -> None:
    """``tie_word_embeddings: true`` (no head tensor written) round-trips; a file naming the head
    ``lm_head.weight`` (transformers 5's module name) loads like ``embed_out.weight``."""
    x = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(6))
    hf = make_hf(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "tied")
    model = load_hf(tmp_path / "tied")
    assert model.spec.tie_embeddings
    with torch.no_grad():
        assert (model(x) - hf_logits(hf, x)).abs().max().item() < TOL
    export_hf(model, tmp_path / "tied-out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tied-out").eval()
    assert back.config.tie_word_embeddings
    assert (hf_logits(back, x) - hf_logits(hf, x)).abs().max().item() < TOL
    untied = make_hf()
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in untied.state_dict().items()}
    (tmp_path / "lm").mkdir()
    save_file(sd, str(tmp_path / "lm" / "model.safetensors"))
    untied.config.to_json_file(str(tmp_path / "lm" / "config.json"))
    assert "lm_head.weight" in sd
    with torch.no_grad():
        assert (load_hf(tmp_path / "lm")(x) - hf_logits(untied, x)).abs().max().item() < TOL


def test_export_picks_gpt_neox() -> None:
    spec = spec_from_config(dict(BASE, model_type="gpt_neox"))
    assert export_family_of(spec).model_type == "gpt_neox"


def test_gpt_neox_refuses_a_shared_norm_which_exports_as_phi(tmp_path: Path) -> None:
    data = spec_from_config(dict(BASE, model_type="gpt_neox")).model_dump()
    data["block"] = {"type": "parallel", "shared_norm": True}
    model = build_model(data)
    with pytest.raises(CheckpointError) as info:
        export_hf(model, tmp_path / "out", model_type="gpt_neox")
    assert "no GPT-NeoX equivalent; these parts differ:\n  block {'type': 'parallel', 'shared_norm': True}" \
        in str(info.value)
    assert not (tmp_path / "out").exists()
    assert export_family_of(model.spec).model_type == "phi"  # one norm per block, biases everywhere: Phi
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, field", [
    ({"use_parallel_residual": False}, "use_parallel_residual false"),
    ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type 'linear'"),
    ({"attention_bias": False}, "attention_bias false"),
    ({"rotary_pct": 0.5}, "rotary_pct 0.5 and rope_parameters.partial_rotary_factor 0.25 differ"),
    ({"rotary_emb_base": 500}, "rotary_emb_base 500"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.1}},
     "rotary_fraction"),
    ({"use_parallel_residual": "yes"}, "use_parallel_residual"),
    ({"intermediate_size": 0}, "intermediate_size"),
])
def test_unsupported_or_malformed_configs_are_refused(hf_folder: tuple[str, Any, Path], tmp_path: Path,
                                                      change: dict[str, Any], field: str) -> None:
    check_config_refused(hf_folder[1], tmp_path, change, field)


@pytest.mark.parametrize("extra", ["gpt_neox.emb_dropout.weight", "gpt_neox.layers.0.mlp.fc3.bias", "embed_out.bias"])
def test_unknown_tensor_is_refused(hf_folder: tuple[str, Any, Path], tmp_path: Path, extra: str) -> None:
    check_tensor_refused(hf_folder[1], tmp_path, extra, "GPT-NeoX")


# -- the parameters: parallel shared_norm, llama.rope rotary_fraction -------------------------------

def _parallel_spec(**block: Any) -> dict[str, Any]:
    return dict(name="p", vocab_size=50, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                block={"type": "parallel", **block})


def test_shared_norm_default_is_todays_block() -> None:
    torch.manual_seed(123)
    a = build_model(_parallel_spec())
    torch.manual_seed(123)
    b = build_model(_parallel_spec(shared_norm=True))
    assert a.spec.block.params.get("shared_norm", True) is True
    assert list(a.state_dict()) == list(b.state_dict())
    assert not any(".norm2." in k for k in a.state_dict()) and not hasattr(a.trf_blocks[0], "norm2")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_shared_norm_false_adds_norm2_for_the_feedforward() -> None:
    torch.manual_seed(0)
    model = build_model(_parallel_spec(shared_norm=False)).eval()
    block = model.trf_blocks[0]
    assert isinstance(block, ParallelBlock) and not block.shared_norm
    names = [k for k in model.state_dict() if k.startswith("trf_blocks.0.")]
    assert names.index("trf_blocks.0.norm1.scale") < names.index("trf_blocks.0.norm2.scale")
    with torch.no_grad():
        block.norm2.scale.mul_(3.0)
        x = torch.randn(2, 5, 32)
        want = x + block.att(block.norm1(x), None) + block.ff(block.norm2(x))
        assert torch.equal(block(x), want)
        assert torch.equal(step_of(block)(x), block(x))
    shared = build_model(_parallel_spec())
    assert count_parameters(model).total - count_parameters(shared).total == 2 * 2 * 32


def _rope(fraction: float | None, head_dim: int = 16) -> RoPE:
    dims = ModelDims(vocab_size=10, context_length=8, emb_dim=4 * head_dim, n_heads=4, n_layers=1, drop_rate=0.0,
                     qkv_bias=False)
    return RoPE(dims) if fraction is None else RoPE(dims, rotary_fraction=fraction)


def test_rotary_fraction_default_is_unchanged() -> None:
    rope, full = _rope(None), _rope(1.0)
    assert rope.rotary_dims == 16
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 4, 6, 16)
    pos = torch.arange(3, 9)
    angles = pos.float()[:, None] * (1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16))[None, :]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    rq, rk = rope.rotate(q, k, pos)
    assert torch.equal(rq, q * cos + rotate_half(q) * sin) and torch.equal(rk, k * cos + rotate_half(k) * sin)
    assert all(torch.equal(a, b) for a, b in zip(full.rotate(q, k, pos), (rq, rk)))


def test_rotary_fraction_rotates_the_first_dims_and_passes_the_rest() -> None:
    rope = _rope(0.25)
    assert rope.rotary_dims == 4
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 4, 6, 16)
    pos = torch.arange(6)
    rq, rk = rope.rotate(q, k, pos)
    assert torch.equal(rq[..., 4:], q[..., 4:]) and torch.equal(rk[..., 4:], k[..., 4:])
    # the rotated dims: HF GPT-NeoX's rotary_ndims = int(head_dim * rotary_pct), inv_freq over them
    inv = 1.0 / 10000.0 ** (torch.arange(0, 4, 2).float() / 4)
    angles = torch.cat([pos.float()[:, None] * inv[None, :]] * 2, -1)
    torch.testing.assert_close(rq[..., :4], q[..., :4] * angles.cos() + rotate_half(q[..., :4]) * angles.sin(),
                               rtol=0, atol=0)
    assert not torch.equal(rq[..., :4], q[..., :4])


def test_rotary_fraction_must_leave_an_even_number_of_dims() -> None:
    assert _rope(0.3).rotary_dims == 4  # int(16 * 0.3), as HF's rotary_ndims
    with pytest.raises(ValueError, match="rotary_fraction 0.1"):
        _rope(0.1)  # int(1.6) = 1: odd


# -- Pythia-160M ----------------------------------------------------------------------------------

PYTHIA_160M: dict[str, Any] = dict(
    model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], vocab_size=50304, hidden_size=768,
    num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu", rotary_pct=0.25,
    rotary_emb_base=10000, max_position_embeddings=2048, layer_norm_eps=1e-5, use_parallel_residual=True,
    tie_word_embeddings=False, initializer_range=0.02, use_cache=True, bos_token_id=0, eos_token_id=0,
    attention_dropout=0.0, hidden_dropout=0.0, classifier_dropout=0.1)


def test_pythia_160m_spec_counts_its_parameters() -> None:
    model = build_model(CONFIGS / "pythia-160m.json", device="meta")
    assert count_parameters(model).total == 162_322_944


def test_pythia_160m_spec_matches_its_hf_config() -> None:
    assert spec_from_config(PYTHIA_160M, name="pythia-160m") == load_spec(CONFIGS / "pythia-160m.json")


def test_pythia_160m_spec_counts_what_transformers_counts() -> None:
    config = transformers.GPTNeoXConfig(**{k: v for k, v in PYTHIA_160M.items() if k != "model_type"})
    check_meta_count("pythia-160m.json", transformers.GPTNeoXForCausalLM, config, 162_322_944)


def test_info_reports_the_pythia_160m_total(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["info", str(CONFIGS / "pythia-160m.json")]) == 0
    assert "162,322,944" in capsys.readouterr().out
