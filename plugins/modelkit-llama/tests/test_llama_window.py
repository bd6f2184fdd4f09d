"""llama.gqa's sliding window, soft-capping and query scale against hand computations, and a windowed
model's KV cache: bounded by the window, exact past it, unchanged by the runtime."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from modelkit import SpecError, build_model, load_spec
from modelkit.components.base import LayerContext, ModelDims, NoPositional
from modelkit.components.kernels import attention_kernel_names
from modelkit.generation import generate
from modelkit_llama.attention import GroupedQueryAttention

pytestmark = pytest.mark.usefixtures("modelkit_one_thread")

DIMS = ModelDims(vocab_size=64, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                 qkv_bias=False)


def hand_gqa(att: GroupedQueryAttention, x: torch.Tensor, window: int | None, softcap: float | None,
             scale: float | None) -> torch.Tensor:
    """The attention by hand: projections, key/value heads shared by query groups, scores scaled and
    soft-capped, then -inf outside ``i - window < j <= i``, softmax, values, output projection."""
    b, s, _ = x.shape
    h, h_kv, d = att.num_heads, att.num_kv_heads, att.head_dim
    q = F.linear(x, att.W_query.weight).view(b, s, h, d).transpose(1, 2)
    k = F.linear(x, att.W_key.weight).view(b, s, h_kv, d).transpose(1, 2).repeat_interleave(h // h_kv, dim=1)
    v = F.linear(x, att.W_value.weight).view(b, s, h_kv, d).transpose(1, 2).repeat_interleave(h // h_kv, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(d))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    hidden = torch.tensor([[j > i or (window is not None and j <= i - window) for j in range(s)] for i in range(s)])
    out = torch.softmax(scores.masked_fill(hidden, -math.inf), dim=-1) @ v
    return F.linear(out.transpose(1, 2).reshape(b, s, h * d), att.out_proj.weight)


@pytest.mark.parametrize("backend", attention_kernel_names())
@pytest.mark.parametrize("params", [
    dict(sliding_window=3), dict(sliding_window=1), dict(softcap=0.5), dict(query_scale=0.05),
    dict(sliding_window=4, window_pattern=[True, False], softcap=2.0, query_scale=0.3),
    dict(sliding_window=2, window_pattern=[False, True]),
], ids=str)
def test_gqa_options_equal_the_hand_computation_on_each_layer(backend: str, params: dict[str, Any]) -> None:
    torch.manual_seed(0)
    att = GroupedQueryAttention(DIMS, num_kv_heads=2, backend=backend, **params).eval()
    with torch.no_grad():
        att.W_query.weight.mul_(4)  # large scores, so the soft-cap bites
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    pattern = params.get("window_pattern", [True])
    for layer in range(4):
        window = params.get("sliding_window") if pattern[layer % len(pattern)] else None
        expected = hand_gqa(att, x, window, params.get("softcap"), params.get("query_scale"))
        with torch.no_grad():
            ours = att(x, LayerContext(torch.arange(9), NoPositional(), layer=layer))
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    if pattern[0]:  # no context: layer 0
        with torch.no_grad():
            torch.testing.assert_close(att(x), hand_gqa(att, x, params.get("sliding_window"), params.get("softcap"),
                                                        params.get("query_scale")), rtol=0, atol=1e-5)


def test_the_options_change_the_output() -> None:
    torch.manual_seed(0)
    att = GroupedQueryAttention(DIMS, num_kv_heads=2).eval()
    with torch.no_grad():
        att.W_query.weight.mul_(4)
    x = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = att(x)
        for name, value in (("sliding_window", 3), ("softcap", 0.5), ("query_scale", 0.05)):
            setattr(att, name, value)
            assert (att(x) - plain).abs().max() > 1e-3, name
            setattr(att, name, None)


def spec(attention: dict[str, Any], context_length: int = 64) -> dict[str, Any]:
    return {"name": "windowed", "vocab_size": 64, "context_length": context_length, "emb_dim": 32, "n_heads": 4,
            "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False, "positional": "llama.rope",
            "norm": "llama.rmsnorm", "feedforward": "llama.swiglu", "block": "pre_norm",
            "attention": {"type": "llama.gqa", "num_kv_heads": 2, **attention}}


@pytest.mark.parametrize(("attention", "field"), [
    ({"window_pattern": [True, False]}, "window_pattern is set but sliding_window is not"),
    ({"sliding_window": 0}, "attention.sliding_window"),
    ({"sliding_window": 4.5}, "attention.sliding_window"),
    ({"sliding_window": 4, "window_pattern": []}, "attention.window_pattern"),
    ({"sliding_window": 4, "window_pattern": [1, 0]}, "attention.window_pattern"),
    ({"softcap": 0}, "attention.softcap"),
    ({"query_scale": -1.0}, "attention.query_scale"),
])
def test_bad_options_are_spec_errors_naming_the_field(attention: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=field):
        load_spec(spec(attention))


def test_defaults_are_resolved_into_the_spec_and_build_the_same_weights() -> None:
    resolved = load_spec(spec({})).attention.params
    assert (resolved["sliding_window"], resolved["window_pattern"], resolved["softcap"],
            resolved["query_scale"]) == (None, [True], None, None)
    torch.manual_seed(123)
    a = build_model(spec({}))
    torch.manual_seed(123)
    b = build_model(spec({"sliding_window": 5}))
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("backend", attention_kernel_names())
@pytest.mark.parametrize("pattern", [[True], [True, False]], ids=str)
def test_a_windowed_cache_never_holds_more_than_the_window_and_stays_exact(backend: str, pattern: list[bool]) -> None:
    window = 5
    torch.manual_seed(0)
    model = build_model(spec({"sliding_window": window, "window_pattern": pattern, "backend": backend})).eval()
    x = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        pieces = [model(x[:, :7], cache=cache), model(x[:, 7:10], cache=cache)]
        for i in range(10, 40):
            pieces.append(model(x[:, i:i + 1], cache=cache))
            for layer, layer_cache in enumerate(cache.layers):
                held = layer_cache.k.shape[-2]
                assert held == (window if pattern[layer % len(pattern)] else 64), (layer, held)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    # The window matters: full attention gives other logits past it.
    model.trf_blocks[0].att.sliding_window = None
    with torch.no_grad():
        assert (model(x)[:, window:] - full[:, window:]).abs().max() > 1e-3


def test_generation_past_the_window_equals_the_uncached_loop_and_the_runtime() -> None:
    from modelkit.runtime import optimize_for_inference
    from modelkit.runtime.native import native_unsupported_reason

    torch.manual_seed(0)
    model = build_model(spec({"sliding_window": 4, "window_pattern": [True, False], "softcap": 3.0,
                              "query_scale": 0.4})).eval()
    prompt = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    cached = generate(model, prompt, max_new_tokens=30)
    assert torch.equal(cached, generate(model, prompt, max_new_tokens=30, use_cache=False))
    fast = optimize_for_inference(copy.deepcopy(model))
    x = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-4)
    assert torch.equal(generate(fast, prompt, max_new_tokens=30), cached)
    assert native_unsupported_reason(fast) is not None  # the native step is GPT-2's only: it declines


def test_a_pattern_without_a_window_is_refused_when_built_directly_too() -> None:
    with pytest.raises(ValueError, match="window_pattern is set but sliding_window is not"):
        GroupedQueryAttention(DIMS, window_pattern=(True, False))
