"""modelkit.runtime.steps: inference steps compute what the modules compute, and give way to the modules
whenever a step could differ (hooks, training mode, overridden forward, autocast, moved weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from conftest import skip_without_bf16_kernel

from modelkit import GPTModel, generate
from modelkit.components.norm import LayerNorm
from modelkit.components.base import FeedForward, ModelDims
from modelkit.runtime.onednn import OneDNNLinear, onednn_linear_available
from modelkit.runtime.optimize import optimize_for_inference
from modelkit.runtime.stacking import linears_step
from modelkit.runtime.steps import identity_step, register_step, step_of
from modelkit.testing import tiny_model_spec

pytestmark = pytest.mark.speed

ONEDNN = onednn_linear_available()


def tiny(seed: int = 0, **overrides: object) -> GPTModel:
    """A tiny model in eval mode whose parameters all differ (the two norms of a block too)."""
    torch.manual_seed(seed)
    model = GPTModel(tiny_model_spec(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def ids(n: int = 12, seed: int = 1) -> Tensor:
    return torch.randint(0, 50257, (2, n), generator=torch.Generator().manual_seed(seed))


def cached(forward, model: GPTModel, tokens: Tensor) -> Tensor:
    """Logits from a prefill of 5 tokens, then one token at a time."""
    cache = model.new_cache()
    pieces = [forward(tokens[:, :5], cache=cache)]
    pieces += [forward(tokens[:, i:i + 1], cache=cache) for i in range(5, tokens.shape[1])]
    return torch.cat(pieces, dim=1)


def test_the_model_step_is_a_function_with_bit_identical_logits() -> None:
    model = tiny()
    step = step_of(model)
    assert step is not model and not isinstance(step, nn.Module)
    x = ids()
    with torch.inference_mode():
        assert torch.equal(step(x), model(x))
        assert torch.equal(step(x, last_only=True), model(x, last_only=True))
        assert torch.equal(cached(step, model, x), cached(model, model, x))


def test_optimised_model_step_reads_q_k_v_in_one_matmul_with_the_same_logits(monkeypatch) -> None:
    if not ONEDNN:
        return
    model = optimize_for_inference(tiny())
    calls = [0]
    op = torch.ops.mkldnn._linear_pointwise

    def counting(*args: object) -> Tensor:
        calls[0] += 1
        return op(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting)
    step = step_of(model)  # built after the patch, so its calls are counted
    x = ids()
    n_layers = len(model.trf_blocks)
    with torch.inference_mode():
        want = model(x)  # the modules' forward: the first of q/k/v computes all three
        assert calls[0] == 4 * n_layers + 1  # per layer: stacked q/k/v, out_proj, up with GELU, down; the head
        calls[0] = 0
        got = step(x)
    assert calls[0] == 4 * n_layers + 1
    assert torch.equal(got, want)


def test_training_mode_and_global_hooks_and_autocast_run_the_modules() -> None:
    model = tiny()
    model.train()
    assert step_of(model) is model
    model.eval()
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert step_of(model) is model
    finally:
        handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert step_of(model) is model
    assert step_of(model) is not model


def test_a_hooked_part_is_called_as_a_module_and_its_hook_fires_during_generate() -> None:
    model = tiny()
    seen: list[tuple[int, ...]] = []
    handle = model.trf_blocks[1].ff.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    prompt = ids(6)[:1]
    out = generate(model, prompt, 4)
    assert seen == [(1, 6, 32), (1, 1, 32), (1, 1, 32), (1, 1, 32)]  # the prefill, then 3 steps
    handle.remove()
    seen.clear()
    assert torch.equal(generate(model, prompt, 4), out) and not seen  # the next call builds a new step


def test_a_subclass_that_overrides_forward_is_not_given_its_parents_step() -> None:
    class ShiftedNorm(LayerNorm):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) + 1.0

    model = tiny()
    norm = model.trf_blocks[0].norm1
    shifted = ShiftedNorm.__new__(ShiftedNorm)
    shifted.__dict__.update(norm.__dict__)
    model.trf_blocks[0].norm1 = shifted
    assert step_of(shifted) is shifted
    x = ids()
    with torch.inference_mode():
        assert torch.equal(step_of(model)(x), model(x))
        assert not torch.equal(model(x), tiny()(x))  # the override matters


def test_sequential_identity_dropout_linear_and_embedding_steps() -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 16), nn.Identity(), nn.GELU(), nn.Linear(16, 8), nn.Dropout(0.0))
    emb = nn.Embedding(20, 8, padding_idx=3)
    x = torch.randn(2, 3, 8)
    with torch.inference_mode():
        assert torch.equal(step_of(seq)(x), seq(x))
        assert torch.equal(step_of(emb)(torch.tensor([[1, 3, 5]])), emb(torch.tensor([[1, 3, 5]])))
    assert step_of(nn.Identity()) is identity_step
    model = tiny(drop_rate=0.5)
    assert step_of(model.drop_emb) is identity_step  # eval mode
    model.drop_emb.train()
    assert step_of(model.drop_emb) is model.drop_emb


def test_a_released_stack_falls_back_to_the_layers_with_their_new_weights() -> None:
    if not ONEDNN:
        return
    model = optimize_for_inference(tiny())
    att = model.trf_blocks[0].att
    layers = (att.W_query, att.W_key, att.W_value)
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        att.W_key.weight.data = torch.randn(32, 32)  # moved out of the stacked matrix
        want = [F.linear(x, m.weight, m.bias) for m in layers]
    group = att.W_query.group
    with torch.inference_mode():
        got = linears_step(layers)(x)
        assert group.weight is None  # released for good
        assert all(torch.allclose(m(x), w, atol=1e-5) for m, w in zip(layers, want))  # the modules too
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)


def test_an_input_of_another_dtype_gets_forwards_answer() -> None:
    if not ONEDNN:
        return
    torch.manual_seed(0)
    layer = OneDNNLinear.from_linear(nn.Linear(16, 8))
    step = step_of(layer)
    assert step is not layer
    with torch.inference_mode():
        x = torch.randn(2, 16)
        assert torch.equal(step(x), layer(x))
        for call in (layer, step):  # float64 into float32 weights: F.linear's error, from both
            with pytest.raises(RuntimeError, match="dtype"):
                call(x.double())


@pytest.mark.parametrize("options", [{"dtype": "bfloat16"}, {"quantize": "int8"}, {"linear_kernel": "aten"},
                                     {"dtype": "bfloat16", "quantize": "int8"}])
def test_steps_of_bf16_int8_and_aten_models_give_their_forwards_logits(options) -> None:
    if "dtype" in options:
        skip_without_bf16_kernel()
    model = optimize_for_inference(tiny(), **options)
    step = step_of(model)
    assert step is not model
    x = ids()
    with torch.inference_mode():
        assert torch.equal(step(x), model(x))
        assert torch.equal(cached(step, model, x), cached(model, model, x))


def test_a_step_called_with_autograd_on_still_gets_gradients() -> None:
    model = optimize_for_inference(tiny())
    step = step_of(model)
    x = ids()
    step(x).sum().backward()  # outside inference mode, parameters requiring grad
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x).sum().backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == want.keys() and len(want) == len(list(model.parameters()))
    for n in want:
        assert torch.allclose(grads[n], want[n], atol=1e-5, rtol=1e-4), n


class Halver(FeedForward):
    """A plugin-style component: forward only."""

    def __init__(self, dims: ModelDims | None = None) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.5


def test_a_step_registered_for_a_class_in_the_runtime_is_used_for_its_modules_and_subclasses() -> None:
    module = Halver()
    assert step_of(module) is module  # nothing registered: called as a module

    calls: list[str] = []

    @register_step(Halver)
    def halver_step(m: Halver):
        calls.append("built")
        return lambda x: x * 0.5

    class Quiet(Halver):  # inherits forward: the step stands for it too
        pass

    class Other(Halver):  # overrides forward: the parent's step would be wrong
        def forward(self, x: Tensor) -> Tensor:
            return x

    x = torch.randn(2, 3, 4)
    assert torch.equal(step_of(module)(x), module(x)) and calls == ["built"]
    quiet = Quiet()
    assert step_of(quiet) is not quiet and calls == ["built", "built"]
    other = Other()
    assert step_of(other) is other
