"""The OLMo 2 block: registered through its entry point, against a hand computation, and through
modelkit's conformance kit. (tests/test_hf_olmo2.py holds whole OLMo 2 models to transformers.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from modelkit import build_model, get_registry
from modelkit.components.build import SpecBlockParts
from modelkit.runtime import step_of
from modelkit.testing import check_component, tiny_dims, tiny_spec
from modelkit.spec import load_spec
from modelkit_olmo.block import SublayerPostNormBlock

pytestmark = pytest.mark.usefixtures("modelkit_one_thread")

LLAMA_PARTS: dict[str, Any] = {
    "norm": {"type": "llama.rmsnorm", "eps": 1e-6}, "feedforward": "llama.swiglu", "positional": "llama.rope",
    "attention": {"type": "llama.gqa", "num_kv_heads": 2, "qk_norm": "projection"},
}


def test_registered_through_its_entry_point() -> None:
    entry = get_registry("block").get("olmo.post_norm")
    assert entry.cls is SublayerPostNormBlock
    assert entry.distribution == "modelkit-olmo" and entry.origin.startswith("modelkit-olmo==")


def _block(spec: dict[str, Any], seed: int = 0) -> SublayerPostNormBlock:
    """The spec's block, built after ``torch.manual_seed(seed)``, its norm weights perturbed, in eval mode."""
    resolved = load_spec(spec)
    torch.manual_seed(seed)
    block = SublayerPostNormBlock(resolved.dims, SpecBlockParts(resolved, resolved.dims))
    with torch.no_grad():
        for p in (*block.norm1.parameters(), *block.norm2.parameters()):
            p.normal_()
    return block.eval()


@pytest.mark.parametrize("slots", [{}, LLAMA_PARTS], ids=["builtin-parts", "llama-parts"])
def test_block_normalises_each_sublayer_output_inside_the_residual(slots: dict[str, Any]) -> None:
    block = _block(tiny_spec("block", "olmo.post_norm", tiny_dims(drop_rate=0.0), **slots))
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = x + block.norm1(block.att(x))
        expected = h + block.norm2(block.ff(h))
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(step_of(block)(x), expected, rtol=0, atol=0)
        pre = x + block.att(block.norm1(x))  # the pre-norm wiring of the same parts differs
        assert (block(x) - (pre + block.ff(block.norm2(pre)))).abs().max() > 1e-2


def test_the_residual_stream_is_not_normalised() -> None:
    """With zeroed norm parameters every sub-layer output vanishes: the block is the identity."""
    block = _block(tiny_spec("block", "olmo.post_norm", tiny_dims(drop_rate=0.0)))
    with torch.no_grad():
        for p in (*block.norm1.parameters(), *block.norm2.parameters()):
            p.zero_()
        x = 100 * torch.randn(1, 4, 32)
        assert torch.equal(block(x), x)


def test_seeded_build_draws_what_pre_norm_draws() -> None:
    """Same slots, built in the same order: a seeded model has pre_norm's weights."""
    base = tiny_spec("block", "olmo.post_norm", **LLAMA_PARTS)
    torch.manual_seed(123)
    olmo = build_model(base)
    torch.manual_seed(123)
    pre = build_model({**base, "block": "pre_norm"})
    assert olmo.state_dict().keys() == pre.state_dict().keys()
    assert all(torch.equal(t, pre.state_dict()[n]) for n, t in olmo.state_dict().items())


def test_block_conforms() -> None:
    assert check_component("block", "olmo.post_norm").ok
