"""modelkit.runtime.native: the C++ decode step computes the Python steps' logits bit for bit, is really
taken when it applies, and gives way to the Python steps whenever it does not."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from modelkit import GPTModel, generate
from modelkit.runtime import native
from modelkit.runtime.decode import native_decoder_chosen
from modelkit.runtime.onednn import onednn_linear_available
from modelkit.runtime.steps import step_of
from modelkit.runtime.optimize import optimize_for_inference
from modelkit.testing import tiny_model_spec

pytestmark = [pytest.mark.speed,
              pytest.mark.skipif(not onednn_linear_available(), reason="needs PyTorch's oneDNN linear op")]


@pytest.fixture(scope="module", autouse=True)
def extension() -> None:
    """Build (first run: ~20 s on 2 cores) or load the extension; skip where it cannot be built."""
    try:
        native.native_extension()
    except native.NativeBuildError as exc:
        pytest.skip(str(exc))


def tiny(seed: int = 0, **overrides: object) -> GPTModel:
    """A tiny model whose parameters all differ (norms and biases too), optimised for inference."""
    torch.manual_seed(seed)
    model = GPTModel(tiny_model_spec(qkv_bias=True, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return optimize_for_inference(model)


def ids(batch: int = 2, n: int = 7, seed: int = 1) -> Tensor:
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


def no_python_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, the Python forward (modules and inference steps alike run ``GPTModel.forward_with``)
    fails: a test that still gets logits got them from the C++ step."""
    def refuse(*args: object, **kwargs: object) -> Tensor:
        raise AssertionError("the native step fell back to the Python steps")
    monkeypatch.setattr(GPTModel, "forward_with", refuse)


def test_cached_logits_equal_the_python_steps_bit_for_bit_and_come_from_cpp(monkeypatch) -> None:
    model = tiny()
    python, step = step_of(model), native.native_step(model)
    assert step is not None
    tokens = ids(batch=2, n=9)
    pieces = [tokens[:, :5]] + [tokens[:, i:i + 1] for i in range(5, 9)]  # a prefill, then one at a time

    def run(forward) -> tuple[list[Tensor], object]:
        cache = model.new_cache()
        with torch.inference_mode():
            return [forward(piece, cache=cache, last_only=True) for piece in pieces], cache

    want, theirs = run(python)
    no_python_fallback(monkeypatch)
    got, ours = run(step)
    assert all(a.shape == (2, 1, 50257) and torch.equal(a, b) for a, b in zip(got, want))
    assert ours.length == theirs.length == 9
    for mine, ref in zip(ours.layers, theirs.layers):  # the same keys and values were cached
        assert torch.equal(mine.k[:, :, :9], ref.k[:, :, :9]) and torch.equal(mine.v[:, :, :9], ref.v[:, :, :9])


def test_native_generate_gives_the_python_steps_tokens_greedy_and_sampled(monkeypatch) -> None:
    reference = tiny()
    model = optimize_for_inference(tiny(), native=True)
    assert native_decoder_chosen(model) and not native_decoder_chosen(reference)
    prompt = ids()
    want = [generate(reference, prompt, 12), generate(reference, prompt, 12, temperature=1.3, top_k=20, seed=5)]
    no_python_fallback(monkeypatch)
    got = [generate(model, prompt, 12), generate(model, prompt, 12, temperature=1.3, top_k=20, seed=5)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_calls_it_does_not_cover_take_the_python_steps_with_the_same_answers() -> None:
    # A context of 32: 40 tokens slide the window (uncached recomputation), use_cache=False never
    # caches, and a forward with autograd on is not an inference step.
    reference = tiny(seed=3)
    model = optimize_for_inference(tiny(seed=3), native=True)
    prompt = ids(batch=1, n=10)
    assert torch.equal(generate(model, prompt, 40), generate(reference, prompt, 40))
    assert torch.equal(generate(model, prompt, 5, use_cache=False), generate(reference, prompt, 5, use_cache=False))
    step = native.native_step(model)
    cache = model.new_cache()
    assert torch.equal(step(prompt, cache=cache, last_only=True), reference(prompt, last_only=True))
    assert torch.equal(step(prompt[:, :3]), reference(prompt[:, :3]))  # no cache: every position's logits


def test_a_hook_added_after_optimizing_fires_during_generate() -> None:
    model = optimize_for_inference(tiny(), native=True)
    seen: list[tuple[int, ...]] = []
    model.trf_blocks[1].ff.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    assert native.native_step(model) is None
    generate(model, ids(batch=1), 3)
    assert len(seen) == 3


@pytest.mark.parametrize(("overrides", "part"), [
    ({"block": "post_norm"}, "trf_blocks.0 is PostNormBlock"),
    ({"positional": "sinusoidal"}, "positional is SinusoidalPositional"),
    ({"positional": {"type": "learned", "offset": 2}}, "learned positions have offset 2"),
    ({"attention": {"type": "mha", "backend": "eager"}}, "trf_blocks.0.att is not mha with the sdpa backend"),
])
def test_another_composition_is_refused_with_the_part_that_differs(overrides, part) -> None:
    model = tiny(**overrides)
    assert native.native_step(model) is None
    with pytest.raises(ValueError, match=part):
        optimize_for_inference(model, native=True)
    assert not native_decoder_chosen(model)


def test_native_needs_optimized_float32_weights_and_excludes_compile() -> None:
    torch.manual_seed(0)
    plain = GPTModel(tiny_model_spec()).eval()
    assert "(optimize_for_inference)" in native.native_unsupported_reason(plain)
    with pytest.raises(ValueError, match="float32"):
        optimize_for_inference(tiny(), dtype=torch.bfloat16, native=True)
    with pytest.raises(ValueError, match="exclude each other"):
        optimize_for_inference(tiny(), native=True, compile=True)
    model = optimize_for_inference(tiny(), native=True)
    model.train()  # changed after optimizing: generate takes the Python steps again
    assert native.native_step(model) is None


def test_a_missing_build_tool_is_a_clear_error(monkeypatch) -> None:
    import torch.utils.cpp_extension as cpp

    def no_ninja() -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    native.native_extension.cache_clear()
    monkeypatch.setattr(cpp, "verify_ninja_availability", no_ninja)
    try:
        with pytest.raises(native.NativeBuildError, match=r"pip install 'modelkit\[native\]'"):
            native.native_extension()
    finally:
        native.native_extension.cache_clear()


def test_cli_native_prints_the_books_greedy_text_and_refuses_bf16_in_one_line(tmp_path, capsys) -> None:
    import json

    import book_reference

    from modelkit.cli import main
    from modelkit.tokenizer import text_to_token_ids, token_ids_to_text

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 4,
                                  "n_layers": 2, "drop_rate": 0.1}))
    args = ["generate", "--config", str(config), "--prompt", "Hello, I am", "--max-new-tokens", "8", "--seed", "5"]
    assert main([*args, "--native"]) == 0
    torch.manual_seed(5)
    model = GPTModel(config).eval()
    expected = book_reference.generate_text_simple(model, text_to_token_ids("Hello, I am"), 8, 32)
    assert capsys.readouterr().out == token_ids_to_text(expected) + "\n"
    assert main([*args, "--native", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "--native" in err and "float32" in err and "Traceback" not in err
