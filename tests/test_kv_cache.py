"""KV-cache decoding gives the uncached results, for every built-in combination of components.

The reference is the book's ``generate_text_simple`` (tests/book_reference.py, verbatim), which
recomputes the whole (cropped) window at every step, and the model's own full forward pass for
logits. Combinations are read from the registries, so a new built-in is covered automatically;
third-party plugins installed in the same environment are left out.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

from book_reference import generate_text_simple
from modelkit import GPTModel, PluginError, get_registry
from modelkit.components.base import ModelDims, Positional
from modelkit.components.kernels import attention_kernel_names, get_attention_kernel
from modelkit.generation import generate

VOCAB, CONTEXT = 50, 32


def _builtin_names(kind: str) -> list[str]:
    """Names of modelkit's own components of ``kind`` (bare names, defined in modelkit)."""
    registry = get_registry(kind)
    names = []
    for name in registry.names():
        if "." in name:  # namespaced: third-party by the registry's rules
            continue
        try:
            entry = registry.get(name)
        except PluginError:
            continue
        if entry.distribution is None and entry.origin == "modelkit (built-in)":
            names.append(name)
    return names


def _builtin_attention() -> list[dict[str, Any]]:
    """Each built-in attention component, crossed with each built-in kernel if it takes a backend."""
    kernels = [k for k in attention_kernel_names() if get_attention_kernel(k).__module__.startswith("modelkit.")]
    refs: list[dict[str, Any]] = []
    for name in _builtin_names("attention"):
        if "backend" in get_registry("attention").get(name).params_model.model_fields:
            refs += [{"type": name, "backend": kernel} for kernel in kernels]
        else:
            refs.append({"type": name})
    return refs


COMBOS = [
    pytest.param(att, block, pos, id=f"{'-'.join(str(v) for v in att.values())}-{block}-{pos}")
    for att, block, pos in itertools.product(
        _builtin_attention(), _builtin_names("block"), _builtin_names("positional"))
]


def tiny_model(attention: dict[str, Any], block: str, positional: str, seed: int = 0,
               context_length: int = CONTEXT) -> GPTModel:
    torch.manual_seed(seed)
    spec = {"vocab_size": VOCAB, "context_length": context_length, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
            "drop_rate": 0.1, "attention": attention, "block": block, "positional": positional}
    return GPTModel(spec).eval()


def prompt(batch: int, length: int, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_combinations_cover_every_builtin() -> None:
    assert {"eager", "sdpa"} <= {a.get("backend") for a in _builtin_attention()}
    assert {"pre_norm", "post_norm", "parallel"} <= set(_builtin_names("block"))
    assert {"learned", "sinusoidal", "none"} <= set(_builtin_names("positional"))


@pytest.mark.parametrize(("attention", "block", "positional"), COMBOS)
def test_cached_greedy_tokens_equal_the_uncached_book_loop(attention: dict, block: str, positional: str) -> None:
    model = tiny_model(attention, block, positional)
    idx = prompt(1, 5)
    expected = generate_text_simple(model, idx, 20, CONTEXT)
    assert torch.equal(generate(model, idx, 20, use_cache=True), expected)
    assert torch.equal(generate(model, idx, 20, use_cache=False), expected)


@pytest.mark.parametrize(("attention", "block", "positional"), COMBOS)
def test_crossing_the_context_window_equals_the_uncached_book_loop(attention: dict, block: str,
                                                                    positional: str) -> None:
    # 28 prompt tokens + 20 new: the window (32) fills after 4 steps, then slides for 16.
    model = tiny_model(attention, block, positional)
    idx = prompt(1, 28)
    expected = generate_text_simple(model, idx, 20, CONTEXT)
    assert torch.equal(generate(model, idx, 20, use_cache=True), expected)


@pytest.mark.parametrize(("attention", "block", "positional"), COMBOS)
def test_batched_cached_generation_equals_the_book_loop(attention: dict, block: str, positional: str) -> None:
    model = tiny_model(attention, block, positional)
    idx = prompt(3, 24)
    expected = generate_text_simple(model, idx, 16, CONTEXT)
    out = generate(model, idx, 16, use_cache=True)
    assert out.shape == (3, 40)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(("attention", "block", "positional"), COMBOS)
def test_incremental_logits_equal_full_recomputation(attention: dict, block: str, positional: str) -> None:
    model = tiny_model(attention, block, positional)
    seq = prompt(2, 24)
    with torch.no_grad():
        full = model(seq)  # (2, 24, vocab): every position computed from scratch
        cache = model.new_cache()
        pieces = [model(seq[:, :6], cache=cache),       # prefill
                  model(seq[:, 6:10], cache=cache)]     # a chunk after a cached prefix
        pieces += [model(seq[:, i:i + 1], cache=cache) for i in range(10, 24)]  # one token at a time
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_a_window_smaller_than_context_length_slides_like_the_book() -> None:
    model = tiny_model({"type": "mha", "backend": "sdpa"}, "pre_norm", "learned")
    idx = prompt(2, 5)
    expected = generate_text_simple(model, idx, 25, 12)
    assert torch.equal(generate(model, idx, 25, context_size=12, use_cache=True), expected)


@pytest.mark.parametrize("prompt_length", [3, 7, 8, 11], ids=lambda n: f"prompt{n}")
def test_generating_far_past_the_window_stays_equal_to_the_book(prompt_length: int) -> None:
    model = tiny_model({"type": "mha", "backend": "eager"}, "pre_norm", "learned", context_length=8)
    idx = prompt(1, prompt_length)
    expected = generate_text_simple(model, idx, 30, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prompt11 is cropped, with a warning tested elsewhere
        assert torch.equal(generate(model, idx, 30, use_cache=True), expected)


class RotaryForTest(Positional):
    """A plugin-style rotary embedding (RoPE, Su et al. 2021): rotates q/k, adds nothing."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.half = dims.head_dim // 2

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        inv_freq = 10000.0 ** (-torch.arange(self.half, dtype=torch.float32) / self.half)
        angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()

        def rot(x: Tensor) -> Tensor:
            x1, x2 = x[..., :self.half], x[..., self.half:]
            return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

        return rot(q), rot(k)


class AlibiForTest(Positional):
    """A plugin-style ALiBi (Press et al. 2022): a per-head linear distance penalty on the scores."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / dims.n_heads) for h in range(dims.n_heads)])

    def attention_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        distance = (q_positions[:, None] - k_positions[None, :]).abs().to(torch.float32)
        return -self.slopes[:, None, None] * distance


@pytest.fixture(params=[("kvtest.rotary", RotaryForTest), ("kvtest.alibi", AlibiForTest)], ids=["rotary", "alibi"])
def plugin_positional(request: pytest.FixtureRequest) -> Any:
    name, cls = request.param
    registry = get_registry("positional")
    registry.register(name, cls)
    yield name
    registry.unregister(name)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_a_plugin_positional_takes_part_in_cached_generation(plugin_positional: str, backend: str) -> None:
    model = tiny_model({"type": "mha", "backend": backend}, "pre_norm", plugin_positional)
    idx = prompt(2, 26)
    expected = generate_text_simple(model, idx, 14, CONTEXT)
    assert torch.equal(generate(model, idx, 14, use_cache=True), expected)


@pytest.mark.parametrize("chunks", [[1] * 20, [5, 3, *[1] * 12], [9, 2, 6, 1, 1, 1], [2, 2, 2, 14]], ids=str)
def test_a_windowed_layer_cache_holds_the_last_window_and_returns_what_the_queries_see(chunks: list[int]) -> None:
    from modelkit.cache import KVCache

    window = 4
    keys = torch.randn(2, 3, sum(chunks), 8, generator=torch.Generator().manual_seed(0))
    values = keys * 2 + 1
    cache = KVCache(1, max_length=32)
    layer = cache.layers[0]
    start = 0
    for n in chunks:
        k, v = layer.update(keys[:, :, start:start + n], values[:, :, start:start + n], window=window)
        first = max(0, start - window + 1)  # the first position the first new query sees
        assert torch.equal(k, keys[:, :, first:start + n]) and torch.equal(v, values[:, :, first:start + n])
        assert layer.k is not None and layer.k.shape[-2] <= window and layer.v.shape[-2] <= window
        cache.advance(n)
        start += n
        held = min(start, window)
        assert torch.equal(layer.k[:, :, :held], keys[:, :, start - held:start])
    with pytest.raises(ValueError, match="KV cache is full"):  # the context_length check stays
        layer.update(keys[:, :, :13], values[:, :, :13], window=window)
