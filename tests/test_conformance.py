"""modelkit.testing.check_component: every built-in conforms, and each property catches a real defect.

The broken components below are small, realistic mistakes (a missing mask, state kept outside the
state dict, a cache that is never written, ...). Each must fail exactly the property it breaks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelkit import get_registry, register
from modelkit.components.attention import MultiHeadAttention
from modelkit.components.base import Activation, FeedForward, LayerContext, ModelDims, NoPositional, Norm, Positional
from modelkit.components.kernels import attention_kernel_names
from modelkit.runtime.steps import register_step
from modelkit.testing import CHECKS, builtin_components, check_component, tiny_dims, tiny_spec



# -- every built-in (a new built-in is covered automatically) ------------------------------------------


@pytest.mark.parametrize(("kind", "name"), builtin_components(), ids=lambda v: str(v))
def test_builtin_component_conforms(kind: str, name: str) -> None:
    report = check_component(kind, name)
    assert report.ok
    expected = {"construct"} | {n for n, (_, kinds) in CHECKS.items() if kind in kinds}
    assert {r.name for r in report.results} == expected


@pytest.mark.parametrize("backend", attention_kernel_names())
def test_mha_conforms_with_every_kernel(backend: str) -> None:
    check_component("attention", {"type": "mha", "backend": backend})


def test_builtin_components_lists_only_core_components() -> None:
    found = builtin_components()
    for kind, name in found:
        entry = get_registry(kind).get(name)
        assert entry.is_builtin and entry.cls.__module__.startswith("modelkit.components.")
    assert ("norm", "layernorm") in found and ("attention", "mha") in found
    assert all("." not in name for _, name in found)


def test_tiny_spec_puts_an_activation_into_the_feedforward() -> None:
    spec = tiny_spec("activation", "relu", tiny_dims(emb_dim=64))
    assert spec["feedforward"] == {"type": "mlp", "activation": "relu"}
    assert spec["emb_dim"] == 64 and "activation" not in spec


# -- broken components: each property catches its defect ------------------------------------------------


class NonCausalAttention(MultiHeadAttention):
    """Forgets the causal mask: every token sees the whole sequence."""

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        ctx = ctx or LayerContext(torch.arange(s), NoPositional())
        q, k = ctx.positional.rotate(q, k, ctx.positions)
        if ctx.cache is not None:
            k, v = ctx.cache.update(k, v)
        bias = ctx.positional.attention_bias(ctx.positions, torch.arange(k.shape[-2]))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # no causal mask
        return self.out_proj(out.transpose(1, 2).reshape(b, s, self.d_out))


class CacheIgnoringAttention(MultiHeadAttention):
    """Never writes to the KV cache: a decoded token attends only to itself."""

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        if ctx is not None:
            ctx = LayerContext(ctx.positions, ctx.positional, None)
        return super().forward(x, ctx)


class HookIgnoringAttention(MultiHeadAttention):
    """Applies no positional hooks (passes no context to the shared path)."""

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> Tensor:
        cache = ctx.cache if ctx is not None else None
        plain = LayerContext(ctx.positions, NoPositional(), cache) if ctx is not None else None
        return super().forward(x, plain)


class GainOutsideStateDict(Norm):
    """Keeps its random gain as a plain tensor attribute: not saved, not loaded."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.gain = torch.rand(dims.emb_dim) + 0.5

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.gain


class TableComputedAtInit(Positional):
    """Precomputes its embedding table into a non-persistent buffer: garbage after to_empty()."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        pos = torch.arange(dims.context_length, dtype=torch.float32)[:, None]
        freq = torch.arange(dims.emb_dim, dtype=torch.float32)[None, :] + 1
        self.register_buffer("table", torch.sin(pos / freq), persistent=False)

    def embedding(self, positions: Tensor) -> Tensor:
        return self.table[positions]


class DropoutInEval(Activation):
    """Applies dropout whatever the mode."""

    def __init__(self, dims: ModelDims | None = None) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(F.relu(x), 0.5, training=True)


class HalfWidthFeedForward(FeedForward):
    """Returns emb_dim/2 features."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.proj = nn.Linear(dims.emb_dim, dims.emb_dim // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class PeekingNorm(Norm):
    """Normalises over the sequence as well: early tokens see statistics of later ones."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(dim=(1, 2), keepdim=True)) / (x.std(dim=(1, 2), keepdim=True) + 1e-5)


class StepWithOtherActivation(FeedForward):
    """Its runtime step (registered below) uses ReLU where its forward uses GELU."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dims.emb_dim, 2 * dims.emb_dim), nn.Linear(2 * dims.emb_dim, dims.emb_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))



@register_step(StepWithOtherActivation)
def _relu_step(ff: StepWithOtherActivation) -> Callable[[Tensor], Tensor]:
    """A runtime step registered for the class (as a plugin's runtime module would) that is wrong."""
    return lambda x: ff.down(F.relu(ff.up(x)))


BROKEN: dict[str, tuple[str, type, set[str]]] = {
    # name: (kind, class, the properties it must fail)
    "broken.noncausal": ("attention", NonCausalAttention, {"causality", "kv_cache"}),
    "broken.nocache": ("attention", CacheIgnoringAttention, {"kv_cache"}),
    "broken.nohooks": ("attention", HookIgnoringAttention, {"positional_hooks"}),
    "broken.gain": ("norm", GainOutsideStateDict, {"state_dict_round_trip", "meta_device"}),
    "broken.table": ("positional", TableComputedAtInit, {"meta_device"}),
    "broken.dropout": ("activation", DropoutInEval, {"eval_determinism", "kv_cache"}),
    "broken.halfwidth": ("feedforward", HalfWidthFeedForward, {"shapes", "causality", "kv_cache", "inference_step"}),
    "broken.peeking": ("norm", PeekingNorm, {"causality", "kv_cache"}),
    "broken.step": ("feedforward", StepWithOtherActivation, {"inference_step"}),
}


@pytest.fixture
def broken_registered() -> Iterator[None]:
    for name, (kind, cls, _) in BROKEN.items():
        register(kind, name)(cls)
    yield
    for name, (kind, _, _) in BROKEN.items():
        get_registry(kind).unregister(name)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_check_component_catches_a_broken_component(broken_registered: None, name: str) -> None:
    kind, _, expected = BROKEN[name]
    report = check_component(kind, name, raise_on_failure=False)
    assert {r.name for r in report.failures} == expected, str(report)
    assert not report.ok


def test_a_failure_raises_assertion_error_naming_the_property(broken_registered: None) -> None:
    with pytest.raises(AssertionError) as info:
        check_component("attention", "broken.noncausal")
    text = str(info.value)
    assert "FAIL causality" in text and "not causal" in text
    assert "ok   shapes" in text


def test_shape_errors_are_explained(broken_registered: None) -> None:
    report = check_component("feedforward", "broken.halfwidth", raise_on_failure=False, checks=["shapes"])
    assert [(r.name, r.passed) for r in report.results] == [("construct", True), ("shapes", False)]
    assert report.failures[0].message.startswith("forward returned shape (2, 8, 16) for input (2, 8, 32)")


def test_unknown_reference_fails_construct_with_the_spec_error() -> None:
    report = check_component("norm", "nosuch.norm", raise_on_failure=False)
    assert report.failures[0].name == "construct"
    assert "unknown norm 'nosuch.norm'" in report.failures[0].message
    assert all(r.message == "not run: it cannot be constructed" for r in report.failures[1:])
    assert len(report.failures) == 1 + len([n for n, (_, kinds) in CHECKS.items() if "norm" in kinds])


def test_invalid_parameters_fail_construct() -> None:
    report = check_component("norm", {"type": "layernorm", "eps": -1}, raise_on_failure=False)
    assert report.failures[0].name == "construct" and "eps" in report.failures[0].message


def test_unknown_check_or_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown conformance checks"):
        check_component("norm", "layernorm", checks=["speed"])
    with pytest.raises(ValueError, match="unknown component kind"):
        check_component("normalisation", "layernorm")


def test_dims_are_honoured() -> None:
    dims = tiny_dims(emb_dim=48, n_heads=3)
    report = check_component("attention", "mha", dims=dims, checks=["shapes"])
    assert [r.name for r in report.results] == ["construct", "shapes"]
    bad = check_component("attention", "mha", dims=tiny_dims(emb_dim=30, n_heads=4), raise_on_failure=False)
    assert bad.failures[0].name == "construct" and "not divisible" in bad.failures[0].message
