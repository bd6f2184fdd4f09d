"""Each gemma component against an independent computation (hand formulas), and the spec/registry
surface: entry points, defaults, parameters refused by name."""

from __future__ import annotations

import math

import pytest
import torch

from modelkit import SpecError, build_model, get_registry, load_spec
from modelkit.components.base import LayerContext, ModelDims, NoPositional
from modelkit_gemma.block import SandwichNormBlock
from modelkit_gemma.feedforward import GatedFeedForward
from modelkit_gemma.norm import GemmaRMSNorm

pytestmark = pytest.mark.usefixtures("modelkit_one_thread")

DIMS = ModelDims(vocab_size=64, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                 qkv_bias=False)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize(("kind", "name", "cls"), [
    ("norm", "gemma.rmsnorm", GemmaRMSNorm), ("feedforward", "gemma.geglu", GatedFeedForward),
    ("block", "gemma.sandwich", SandwichNormBlock),
])
def test_registered_through_its_entry_point(kind: str, name: str, cls: type) -> None:
    entry = get_registry(kind).get(name)
    assert entry.cls is cls
    assert entry.distribution == "modelkit-gemma"


def test_rmsnorm_scales_by_one_plus_weight() -> None:
    norm = GemmaRMSNorm(DIMS, eps=1e-6)
    assert torch.equal(norm.weight, torch.zeros(32))  # zeros: a fresh norm scales by one
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=gen(1)))
    x = torch.randn(2, 5, 32, generator=gen(0), dtype=torch.float64).float()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight)
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)
    llama_style = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert (norm(x) - llama_style).abs().max() > 0.1  # the +1 matters


def test_rmsnorm_scales_in_float32_before_casting() -> None:
    """bfloat16 input: the product (1 + w)·x̂ is rounded once, after the float32 maths (Gemma), not
    x̂ rounded then scaled (Llama): on some element the two differ."""
    norm = GemmaRMSNorm(DIMS)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=gen(2)) * 3)
    x = torch.randn(4, 8, 32, generator=gen(3)).bfloat16()
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)
    ours = norm(x)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, (normed * (1 + norm.weight)).bfloat16())
    assert not torch.equal(ours, normed.bfloat16() * (1 + norm.weight).bfloat16())


def test_geglu_is_the_tanh_gelu_gate_by_default() -> None:
    model = build_model({"vocab_size": 64, "context_length": 8, "emb_dim": 32, "n_heads": 4, "n_layers": 1,
                         "feedforward": {"type": "gemma.geglu", "hidden_dim": 48}})
    ff = model.trf_blocks[0].ff
    assert isinstance(ff, GatedFeedForward) and ff.gate_proj.weight.shape == (48, 32) and ff.gate_proj.bias is None
    x = torch.randn(2, 5, 32, generator=gen(4))
    expected = ff.down_proj(gelu_tanh(ff.gate_proj(x)) * ff.up_proj(x))
    torch.testing.assert_close(ff(x), expected, rtol=1e-5, atol=1e-6)


def test_geglu_activation_is_a_sub_component() -> None:
    ff = GatedFeedForward(DIMS, hidden_mult=2, activation=torch.nn.SiLU())
    x = torch.randn(2, 3, 32, generator=gen(5))
    expected = ff.down_proj(torch.nn.functional.silu(ff.gate_proj(x)) * ff.up_proj(x))
    torch.testing.assert_close(ff(x), expected)
    assert ff.hidden_dim == 64
    spec = load_spec({"vocab_size": 64, "context_length": 8, "emb_dim": 32, "n_heads": 4, "n_layers": 1,
                      "feedforward": {"type": "gemma.geglu", "activation": "gelu_exact"}})
    assert spec.feedforward.params["activation"].type == "gelu_exact"


def test_sandwich_block_normalises_before_and_after_each_sublayer() -> None:
    model = build_model({"vocab_size": 64, "context_length": 8, "emb_dim": 32, "n_heads": 4, "n_layers": 1,
                         "drop_rate": 0.0, "norm": "gemma.rmsnorm", "block": "gemma.sandwich"})
    block = model.trf_blocks[0]
    with torch.no_grad():
        for name in ("norm1", "post_norm1", "norm2", "post_norm2"):
            getattr(block, name).weight.copy_(torch.randn(32, generator=gen(len(name))))
    x = torch.randn(2, 6, 32, generator=gen(6))
    ctx = LayerContext(torch.arange(6), NoPositional())
    with torch.no_grad():
        h = x + block.post_norm1(block.att(block.norm1(x), ctx))
        expected = h + block.post_norm2(block.ff(block.norm2(h)))
        torch.testing.assert_close(block(x, ctx), expected)
        update = block.att(block.norm1(x), ctx)
        assert (block.post_norm1(update) - update).abs().max() > 1e-3  # the post-norm changes the update
    assert [n for n, _ in block.named_children()] == ["att", "ff", "norm1", "post_norm1", "norm2", "post_norm2",
                                                      "drop_shortcut"]


@pytest.mark.parametrize(("component", "field"), [
    ({"type": "gemma.rmsnorm", "eps": 0}, "norm.eps"),
    ({"type": "gemma.geglu", "hidden_dim": 0}, "feedforward.hidden_dim"),
    ({"type": "gemma.geglu", "activation": "tanhh"}, "feedforward.activation"),
])
def test_bad_parameters_are_refused_naming_the_field(component: dict[str, object], field: str) -> None:
    slot = "norm" if component["type"] == "gemma.rmsnorm" else "feedforward"
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        load_spec({"vocab_size": 64, "context_length": 8, "emb_dim": 32, "n_heads": 4, "n_layers": 1,
                   slot: component})
