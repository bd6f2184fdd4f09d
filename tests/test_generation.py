"""Generation: the book's numbers, the book's sampling loop, top-k/top-p by hand, eos, errors, the CLI.

References from outside the code under test: the token ids printed in the book (chapter 4), the book's
``generate_text_simple`` and ``generate`` (tests/book_reference.py, verbatim), and probabilities
worked out by hand.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import book_reference
from modelkit import GenerationError, GPTModel
from modelkit.cli import main
from modelkit.generation import filter_logits, generate, stream_generate
from modelkit.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

REPO = Path(__file__).resolve().parents[1]
VOCAB, CONTEXT = 50, 32
NEG_INF = -math.inf

BOOK_TOKENS = [15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267, 49706, 43231, 47062, 34657]
BOOK_TEXT = "Hello, I am Featureiman Byeswickattribute argue logger Normandy Compton analogous"


def tiny_model(seed: int = 0, **overrides: Any) -> GPTModel:
    torch.manual_seed(seed)
    spec = {"vocab_size": VOCAB, "context_length": CONTEXT, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
            "drop_rate": 0.1, **overrides}
    return GPTModel(spec).eval()


def prompt(batch: int, length: int, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- the book's numbers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_small() -> GPTModel:
    torch.manual_seed(123)
    return GPTModel(REPO / "configs" / "gpt2-small.json").eval()


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_seeded_gpt2_small_generates_the_books_tokens(gpt2_small: GPTModel, use_cache: bool) -> None:
    idx = text_to_token_ids("Hello, I am")
    out = generate(gpt2_small, idx, max_new_tokens=10, context_size=1024, use_cache=use_cache)
    assert out.tolist() == [BOOK_TOKENS]
    assert token_ids_to_text(out) == BOOK_TEXT


# -- sampling, against the book's chapter-5 loop ----------------------------------------------------

@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, None), (1.4, 5), (0.7, 3), (0.0, 4)])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_sampling_after_manual_seed_equals_the_books_generate(temperature: float, top_k: int | None,
                                                              use_cache: bool) -> None:
    model = tiny_model()
    idx = prompt(1, 6)
    torch.manual_seed(42)
    expected = book_reference.generate(model, idx, 30, CONTEXT, temperature=temperature, top_k=top_k)
    torch.manual_seed(42)
    out = generate(model, idx, 30, temperature=temperature, top_k=top_k, use_cache=use_cache)
    assert torch.equal(out, expected)


def test_a_seed_makes_sampling_reproducible_without_touching_the_global_rng() -> None:
    model = tiny_model()
    idx = prompt(2, 4)
    state = torch.get_rng_state()
    first = generate(model, idx, 20, temperature=1.5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(generate(model, idx, 20, temperature=1.5, seed=7), first)
    assert torch.equal(generate(model, idx, 20, temperature=1.5, generator=torch.Generator().manual_seed(7)), first)
    assert not torch.equal(generate(model, idx, 20, temperature=1.5, seed=8), first)


# -- top-k / top-p by hand ----------------------------------------------------------------------------

def kept(logits: Tensor) -> list[list[int]]:
    return [torch.nonzero(row != NEG_INF).flatten().tolist() for row in logits]


# Token probabilities 0.1, 0.4, 0.05, 0.3, 0.15: by rank 1 (0.4), 3 (0.3), 4 (0.15), 0 (0.1), 2 (0.05);
# cumulative 0.4, 0.7, 0.85, 0.95, 1.0.
PROBS = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]])
LOGITS = PROBS.log()


def test_top_k_keeps_the_k_largest_logits() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, 2.5]])
    assert filter_logits(logits, top_k=2).tolist() == [[NEG_INF, 3.0, NEG_INF, NEG_INF, 2.5]]


def test_top_k_keeps_ties_with_the_kth_logit_like_the_book() -> None:
    assert kept(filter_logits(torch.tensor([[2.0, 1.0, 2.0, 0.0]]), top_k=1)) == [[0, 2]]


def test_top_k_at_or_above_the_vocabulary_keeps_everything() -> None:
    assert torch.equal(filter_logits(LOGITS, top_k=5), LOGITS)
    assert torch.equal(filter_logits(LOGITS, top_k=50), LOGITS)


@pytest.mark.parametrize(("top_p", "expected"), [
    (0.3, [1]),           # 0.4 alone reaches 0.3
    (0.65, [1, 3]),       # 0.4 < 0.65 <= 0.7
    (0.8, [1, 3, 4]),     # 0.7 < 0.8 <= 0.85
    (0.9, [0, 1, 3, 4]),  # 0.85 < 0.9 <= 0.95
    (1.0, [0, 1, 2, 3, 4]),
    (1e-9, [1]),          # never empty: the most probable token stays
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, expected: list[int]) -> None:
    out = filter_logits(LOGITS, top_p=top_p)
    assert kept(out) == [expected]
    assert torch.equal(out[0, expected], LOGITS[0, expected])  # kept logits unchanged


def test_top_p_applies_to_what_top_k_left_renormalised() -> None:
    # top_k=3 leaves 0.4, 0.3, 0.15 -> renormalised 0.471, 0.353, 0.176 (cumulative 0.471, 0.824):
    # p=0.8 now stops at two tokens, where without top_k it needs three.
    assert kept(filter_logits(LOGITS, top_k=3, top_p=0.8)) == [[1, 3]]
    assert kept(filter_logits(LOGITS, top_p=0.8)) == [[1, 3, 4]]


def test_filtering_is_per_row_and_leaves_the_input_alone() -> None:
    logits = torch.cat([LOGITS, torch.tensor([[0.3, 0.3, 0.2, 0.1, 0.1]]).log()])
    before = logits.clone()
    assert kept(filter_logits(logits, top_p=0.5)) == [[1, 3], [0, 1]]
    assert torch.equal(logits, before)


def allowed(logits: Tensor, top_k: int | None, top_p: float | None) -> set[int]:
    """The support worked out independently: plain Python over the sorted probabilities."""
    values = logits.tolist()
    ranked = sorted(range(len(values)), key=lambda i: -values[i])
    if top_k is not None:
        kth = values[ranked[top_k - 1]]
        ranked = [i for i in ranked if values[i] >= kth]
    if top_p is None:
        return set(ranked)
    weights = [math.exp(values[i] - values[ranked[0]]) for i in ranked]
    total, mass, support = sum(weights), 0.0, set()
    for i, w in zip(ranked, weights):
        support.add(i)
        mass += w / total
        if mass >= top_p:
            break
    return support


@pytest.mark.parametrize(("top_k", "top_p"), [(3, None), (None, 0.5), (6, 0.7)])
def test_sampled_tokens_stay_in_the_top_k_top_p_support(top_k: int | None, top_p: float | None) -> None:
    model = tiny_model()
    idx = prompt(1, 4)
    out = generate(model, idx, 25, temperature=1.0, top_k=top_k, top_p=top_p, seed=3)
    with torch.no_grad():
        logits = model(out)[0]
    for t in range(4, out.shape[1]):
        assert int(out[0, t]) in allowed(logits[t - 1], top_k, top_p)


def test_a_support_of_one_token_samples_the_greedy_tokens() -> None:
    model = tiny_model()
    idx = prompt(2, 4)
    greedy = generate(model, idx, 15)
    assert torch.equal(generate(model, idx, 15, temperature=5.0, top_k=1, seed=0), greedy)
    assert torch.equal(generate(model, idx, 15, temperature=5.0, top_p=1e-9, seed=0), greedy)


# -- eos ------------------------------------------------------------------------------------------------

def test_eos_finishes_each_row_and_pads_it_until_every_row_is_done() -> None:
    model = tiny_model()
    idx = prompt(2, 4, seed=5)
    free = generate(model, idx, 20)[:, 4:].tolist()  # greedy, no eos
    # An eos id both rows produce, first at different steps.
    firsts = {tok: (free[0].index(tok), free[1].index(tok)) for tok in set(free[0]) & set(free[1])}
    eos, (end0, end1) = next((t, f) for t, f in sorted(firsts.items()) if f[0] != f[1])
    out = generate(model, idx, 20, eos_id=eos)[:, 4:].tolist()
    n = max(end0, end1) + 1
    assert out[0] == free[0][:end0 + 1] + [eos] * (n - end0 - 1)
    assert out[1] == free[1][:end1 + 1] + [eos] * (n - end1 - 1)


def test_batch_one_eos_is_the_books_result_plus_the_eos_token() -> None:
    model = tiny_model()
    idx = prompt(1, 4)
    free = generate(model, idx, 20)[0, 4:].tolist()
    eos = free[5]
    book = book_reference.generate(model, idx, 20, CONTEXT, eos_id=eos)
    out = generate(model, idx, 20, eos_id=eos)
    assert out[0, -1] == eos
    assert torch.equal(out[:, :-1], book)


# -- streaming ------------------------------------------------------------------------------------------

def test_stream_yields_each_token_before_computing_the_next() -> None:
    model = tiny_model()
    idx = prompt(2, 4)
    calls: list[int] = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    try:
        stream = stream_generate(model, idx, 5)
        assert calls == []  # nothing computed until asked
        first = next(stream)
        assert first.shape == (2, 1) and calls == [4]  # prefill only
        second = next(stream)
        assert second.shape == (2, 1) and calls == [4, 1]  # one cached step per token
        rest = list(stream)
    finally:
        handle.remove()
    assert len(rest) == 3
    assert torch.equal(torch.cat([idx, first, second, *rest], dim=1), generate(model, idx, 5))


def test_results_are_ordinary_tensors_and_the_model_mode_is_left_alone() -> None:
    model = tiny_model()
    out = generate(model, prompt(1, 3), 4)
    assert not out.is_inference() and out.dtype == torch.long
    assert not model.training
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        generate(model, prompt(1, 3), 2)
    assert model.training


def test_zero_new_tokens_returns_the_prompt() -> None:
    idx = prompt(1, 3)
    assert torch.equal(generate(tiny_model(), idx, 0), idx)


def test_a_prompt_longer_than_the_window_is_cropped_with_a_warning() -> None:
    model = tiny_model()
    idx = prompt(1, 40)
    with pytest.warns(UserWarning, match=r"40 tokens but the context window is 32.*last 32"):
        out = generate(model, idx, 6)
    assert torch.equal(out, book_reference.generate_text_simple(model, idx, 6, CONTEXT))


# -- errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("idx", "kwargs", "message"), [
    (torch.zeros(1, 0, dtype=torch.long), {}, r"the prompt is empty"),
    (torch.tensor([[1, -1]]), {}, r"token id -1 is outside the model's vocabulary \[0, 50\)"),
    (torch.tensor([[1, 50]]), {}, r"token id 50 is outside the model's vocabulary \[0, 50\)"),
    (torch.tensor([1, 2]), {}, r"shape \(batch, n\).*unsqueeze\(0\)"),
    (torch.tensor([[1.0, 2.0]]), {}, r"integer token ids"),
    (torch.tensor([[1]]), {"temperature": -0.5}, r"temperature must be >= 0"),
    (torch.tensor([[1]]), {"temperature": float("nan")}, r"temperature must be a finite number"),
    (torch.tensor([[1]]), {"top_k": 0}, r"top_k must be >= 1, got 0"),
    (torch.tensor([[1]]), {"top_k": 2.5}, r"top_k must be an integer"),
    (torch.tensor([[1]]), {"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    (torch.tensor([[1]]), {"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    (torch.tensor([[1]]), {"max_new_tokens": -1}, r"max_new_tokens must be >= 0"),
    (torch.tensor([[1]]), {"context_size": 33}, r"context_size 33 is larger than the model's context_length 32"),
    (torch.tensor([[1]]), {"eos_id": 50}, r"eos_id 50 is outside"),
    (torch.tensor([[1]]), {"seed": 1, "generator": torch.Generator()}, r"either seed or generator"),
])
def test_bad_arguments_raise_a_clear_generation_error(idx: Tensor, kwargs: dict[str, Any], message: str) -> None:
    args = {"max_new_tokens": 3, **kwargs}
    model = tiny_model()
    with pytest.raises(GenerationError, match=message):
        generate(model, idx, **args)
    with pytest.raises(GenerationError, match=message):  # at the call, before the first token
        stream_generate(model, idx, **args)


# -- the CLI ------------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """A 2-layer model with GPT-2's vocabulary, so the tokenizer's ids fit."""
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 4,
                                "n_layers": 2, "drop_rate": 0.1}))
    return path


def test_cli_streams_the_text_of_the_seeded_model(tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--config", str(tiny_config), "--prompt", "Hello, I am",
                 "--max-new-tokens", "8", "--seed", "5"]) == 0
    captured = capsys.readouterr()
    torch.manual_seed(5)
    model = GPTModel(tiny_config).eval()
    expected = book_reference.generate_text_simple(model, text_to_token_ids("Hello, I am"), 8, 32)
    assert captured.out == token_ids_to_text(expected) + "\n"
    assert "untrained" in captured.err


def test_cli_sampling_equals_the_books_generate_after_the_same_seed(
        tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--config", str(tiny_config), "--prompt", "Every effort moves you",
                 "--max-new-tokens", "10", "--temperature", "1.4", "--top-k", "25", "--seed", "9",
                 "--no-cache"]) == 0
    torch.manual_seed(9)
    model = GPTModel(tiny_config).eval()
    torch.manual_seed(9)
    expected = book_reference.generate(model, text_to_token_ids("Every effort moves you"), 10, 32,
                                       temperature=1.4, top_k=25)
    assert capsys.readouterr().out == token_ids_to_text(expected) + "\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "Hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "Hi", "--top-k", "0"], "top_k must be >= 1"),
    (["--prompt", "Hi", "--top-p", "2"], r"top_p must be in (0, 1]"),
])
def test_cli_reports_bad_input_in_one_line(tiny_config: Path, capsys: pytest.CaptureFixture[str],
                                           args: list[str], message: str) -> None:
    assert main(["generate", "--config", str(tiny_config), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


SAMPLING = ["--prompt", "Every effort moves you", "--max-new-tokens", "10", "--temperature", "1.4", "--top-k", "25",
            "--seed", "9"]


def test_cli_device_cpu_gives_the_tokens_of_the_default(tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--config", str(tiny_config), *SAMPLING]) == 0
    default = capsys.readouterr().out
    assert main(["generate", "--config", str(tiny_config), *SAMPLING, "--device", "cpu"]) == 0
    assert capsys.readouterr().out == default
    assert len(default.split()) > 4  # the prompt and generated text


@pytest.mark.parametrize(("device", "message"), [
    ("cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}",
     "but CUDA is not available; use --device cpu" if not torch.cuda.is_available() else "CUDA device"),
    ("gpu", "unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps"),
    ("meta", "device 'meta' holds no data"),
])
def test_cli_a_device_this_machine_lacks_is_one_line_and_exit_2(
        tiny_config: Path, capsys: pytest.CaptureFixture[str], device: str, message: str) -> None:
    assert main(["generate", "--config", str(tiny_config), "--prompt", "Hi", "--device", device]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("modelkit generate: error: ") and message in line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_device_cuda_generates_the_greedy_tokens_of_the_cpu(tiny_config: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--config", str(tiny_config), "--prompt", "Hello, I am", "--max-new-tokens", "8"]
    assert main([*args, "--device", "cpu"]) == 0
    on_cpu = capsys.readouterr().out
    assert main([*args, "--device", "cuda"]) == 0
    assert capsys.readouterr().out == on_cpu


def test_cli_rejects_a_vocabulary_smaller_than_the_tokenizers(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "small_vocab.json"
    path.write_text(json.dumps({"vocab_size": 100, "context_length": 16, "emb_dim": 32, "n_heads": 4,
                                "n_layers": 1}))
    assert main(["generate", "--config", str(path), "--prompt", "Hi"]) == 2
    assert "vocab_size 100" in capsys.readouterr().err


def always_end_of_text(model: GPTModel) -> GPTModel:
    """Rig the weights so every position's most likely token is <|endoftext|>."""
    with torch.no_grad():
        model.final_norm.scale.zero_()
        model.final_norm.shift.fill_(1.0)  # the final hidden state is all ones
        model.out_head.weight.zero_()
        model.out_head.weight[get_tokenizer().eot_token] = 1.0
    return model


@pytest.mark.parametrize(("flag", "expected"), [([], "Hi" + "<|endoftext|>" * 3), (["--eos"], "Hi")])
def test_cli_eos_stops_at_end_of_text_without_printing_it(
        tiny_config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        flag: list[str], expected: str) -> None:
    import modelkit.cli.generate as cli_generate

    real_build = cli_generate.build_model
    monkeypatch.setattr(cli_generate, "build_model", lambda spec: always_end_of_text(real_build(spec)))
    assert main(["generate", "--config", str(tiny_config), "--prompt", "Hi", "--max-new-tokens", "3", *flag]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_cli_without_config_or_checkpoint_says_what_is_needed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--prompt", "Hi"]) == 2
    assert "--config CONFIG" in capsys.readouterr().err


def test_python_dash_m_modelkit_generate_runs(tiny_config: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "modelkit", "generate", "--config", str(tiny_config),
                             "--prompt", "Hello", "--max-new-tokens", "3"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello") and "untrained" in result.stderr


def test_cli_generates_with_a_saved_checkpoint(tmp_path: Path, tiny_config: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = pytest.importorskip("modelkit.weights.checkpoint")
    torch.manual_seed(77)  # weights the CLI's seed (123) would not build
    model = GPTModel(tiny_config).eval()
    path = tmp_path / "tiny.safetensors"
    checkpoint.save_checkpoint(model, path)
    idx = text_to_token_ids("Every effort moves you")
    expected = token_ids_to_text(book_reference.generate_text_simple(model, idx, 6, 32)) + "\n"

    assert main(["generate", "--checkpoint", str(path), "--prompt", "Every effort moves you",
                 "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected and "untrained" not in captured.err
    assert main(["generate", "--config", str(tiny_config), "--checkpoint", str(path),
                 "--prompt", "Every effort moves you", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected


def test_cli_refuses_a_config_that_differs_from_the_checkpoints_spec(tmp_path: Path, tiny_config: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = pytest.importorskip("modelkit.weights.checkpoint")
    path = tmp_path / "tiny.safetensors"
    checkpoint.save_checkpoint(GPTModel(tiny_config), path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(tiny_config.read_text()), "n_layers": 3}))
    assert main(["generate", "--config", str(other), "--checkpoint", str(path), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert "n_layers: checkpoint 2, config 3" in err and "omit --config" in err


def test_cli_loads_the_books_state_dict_with_its_config(tmp_path: Path, tiny_config: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("modelkit.weights.checkpoint")
    torch.manual_seed(78)
    model = GPTModel(tiny_config).eval()
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)  # the book's chapter-5 way of saving
    idx = text_to_token_ids("Hello")
    expected = token_ids_to_text(book_reference.generate_text_simple(model, idx, 5, 32)) + "\n"
    assert main(["generate", "--config", str(tiny_config), "--checkpoint", str(path), "--prompt", "Hello",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == expected


def test_cli_warns_in_one_line_when_the_prompt_is_cropped(tiny_config: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    long_prompt = ("one two three four five six seven eight nine ten " * 4).strip()  # 40 tokens, window 32
    assert text_to_token_ids(long_prompt).shape[1] == 40
    assert main(["generate", "--config", str(tiny_config), "--prompt", long_prompt, "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "warning: the prompt has 40 tokens but the context window is 32" in captured.err
    assert captured.out.startswith(long_prompt)
