"""The checks every Hugging Face family's parity tests share (imported by ``tests/test_hf_*.py``).

A family's test module builds a tiny random transformers model from a config (no downloads),
perturbs every parameter (:func:`perturbed`, so biases are nonzero and norm weights not ones), saves
it with ``save_pretrained`` and calls these checks; each asserts against transformers' own numbers:

- :func:`check_logits`: ``load_hf`` logits within ``TOL`` of transformers' (fp32, a batch of two);
- :func:`check_greedy`: the same 30 greedy tokens as ``generate``, with and without the KV cache;
- :func:`check_cache`: prefill + one token at a time equals one uncached pass;
- :func:`check_cli_roundtrip`: ``modelkit import-hf`` then ``export-hf`` then
  ``AutoModelForCausalLM.from_pretrained`` gives the same logits;
- :func:`check_runtime`: ``optimize_for_inference`` (fp32) within ``TOL`` and exact under the cache; int8
  close, its cached decode equal to one pass up to bf16 rounding, its greedy tokens greedy in one pass;
- :func:`check_meta_count`: a ``configs/pretrained`` spec counts what transformers counts on the meta device;
- :func:`check_config_refused` / :func:`check_tensor_refused`: a ``config.json`` field or a tensor the
  family cannot honour is a :class:`~modelkit.CheckpointError` naming it.

A family whose fixture ``hf_folder`` gives ``(variant, transformers model, saved folder)`` gets the
first five as tests by subclassing :class:`FamilyParity`. Run with ``pytest -s`` to see the
differences printed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from modelkit import CheckpointError, build_model
from modelkit.cli import main as cli_main
from modelkit.generation import generate
from modelkit.introspect import count_parameters
from modelkit.weights.checkpoint import load_checkpoint
from modelkit.weights.hf_families import load_hf

TOL = 1e-4
CONFIGS = Path(__file__).parent.parent / "configs" / "pretrained"


def perturbed(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """``model`` in eval mode with N(0, scale²) noise added to every parameter (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def batch(vocab: int, length: int = 20, seed: int = 0, size: int = 2) -> torch.Tensor:
    """``(size, length)`` random token ids below ``vocab``."""
    return torch.randint(0, vocab, (size, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' logits for an unpadded batch (an all-ones attention mask)."""
    with torch.no_grad():
        return hf(x, attention_mask=torch.ones_like(x)).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_logits(model: nn.Module, hf: Any, label: str, length: int = 20, seed: int = 0) -> float:
    """Assert ``model``'s logits on a batch of two are within ``TOL`` of ``hf``'s; return the difference."""
    x = batch(hf.config.vocab_size, length, seed)
    ref = hf_logits(hf, x)
    with torch.no_grad():
        ours = model(x)
    diff = max_diff(ours, ref)
    print(f"\n[{label}] max |logit diff| {diff:.2e}")
    assert ref.abs().max() > 0.1  # a real signal, not zeros
    assert diff < TOL, f"{label}: logits differ by {diff:.2e}"
    return diff


def check_greedy(model: nn.Module, hf: Any, label: str, prompt_length: int = 7, new_tokens: int = 30) -> None:
    """Assert 30 greedy tokens equal transformers' ``generate``, with the KV cache and without."""
    x = batch(hf.config.vocab_size, prompt_length, seed=1)
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=0)
    cached = generate(model, x, max_new_tokens=new_tokens)
    uncached = generate(model, x, max_new_tokens=new_tokens, use_cache=False)
    assert ref.shape == (2, prompt_length + new_tokens)
    print(f"\n[{label}] {new_tokens} greedy tokens identical: {torch.equal(cached, ref)}")
    assert torch.equal(cached, ref)
    assert torch.equal(uncached, ref)


def check_cache(model: Any, vocab: int, length: int = 12, prefill: int = 5, atol: float = 1e-5) -> None:
    """Assert prefill of ``prefill`` tokens then one token at a time equals one uncached pass."""
    x = batch(vocab, length, seed=2)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        steps = [model(x[:, :prefill], cache=cache)]
        steps += [model(x[:, i:i + 1], cache=cache) for i in range(prefill, length)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=atol)


def check_cli_roundtrip(folder: Path, hf: Any, tmp_path: Path, architecture: str, label: str) -> Any:
    """``modelkit import-hf folder`` (to ``tmp_path / f"{label}.safetensors"``) then ``export-hf``: both
    within ``TOL`` of ``hf``'s logits, and the export opens as ``architecture`` with ``hf``'s
    ``tie_word_embeddings``. Returns the reopened transformers model."""
    import transformers

    ckpt = tmp_path / f"{label}.safetensors"
    assert cli_main(["import-hf", str(folder), str(ckpt)]) == 0
    model = load_checkpoint(ckpt)
    x = batch(hf.config.vocab_size, 16, seed=3)
    ref = hf_logits(hf, x)
    with torch.no_grad():
        assert max_diff(model(x), ref) < TOL
    out = tmp_path / "exported"
    assert cli_main(["export-hf", str(ckpt), str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == architecture
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    diff = max_diff(hf_logits(back, x), ref)
    print(f"\n[{label}] export: max |logit diff| {diff:.2e}")
    assert diff < TOL
    return back


def check_family(folder: Path, hf: Any, label: str) -> nn.Module:
    """The three model checks on ``load_hf(folder)``: logits, greedy tokens, cache. Returns the model."""
    model = load_hf(folder)
    check_logits(model, hf, label)
    check_greedy(model, hf, label)
    check_cache(model, hf.config.vocab_size)
    return model


def check_runtime(model: Any, hf: Any, label: str) -> None:
    """Assert ``optimize_for_inference`` (float32: the runtime's steps, stacked and oneDNN Linear layers)
    keeps the logits within ``TOL`` of transformers' and the cache exact; and that int8 weights stay
    within 5% of the logits' range, with the cache (see :func:`check_int8_decode`)."""
    import copy

    from modelkit.runtime import optimize_for_inference

    x = batch(hf.config.vocab_size, 20, seed=5)
    ref = hf_logits(hf, x)
    fast = optimize_for_inference(copy.deepcopy(model))
    with torch.no_grad():
        diff = max_diff(fast(x), ref)
    print(f"\n[{label}] optimize_for_inference: max |logit diff| {diff:.2e}")
    assert diff < TOL
    check_cache(fast, hf.config.vocab_size)
    int8 = optimize_for_inference(copy.deepcopy(model), quantize="int8")
    with torch.no_grad():
        diff = max_diff(int8(x), ref)
    spread = (ref.max() - ref.min()).item()
    print(f"[{label}] int8: max |logit diff| {diff:.2e} (logits span {spread:.2f})")
    assert diff < 0.05 * spread
    check_int8_decode(int8, x[:, :6], tol=0.01 * spread)


def check_int8_decode(int8: Any, prompt: torch.Tensor, tol: float, new_tokens: int = 12) -> None:
    """Assert an int8 model's KV-cache decode agrees with one pass over the same tokens.

    Decode steps (few rows) run the int8 kernel on bf16-rounded activations, a whole pass dequantises
    and runs in float32 (:mod:`modelkit.runtime.quantize`), so the two differ by rounding, not more:
    prefill + one token at a time is within ``tol`` of one pass, and every greedy token chosen with
    the cache scores within ``tol`` of the best token in one pass (equal, but for near-ties)."""
    check_cache(int8, int(int8.spec.vocab_size), atol=tol)
    tokens = generate(int8, prompt, max_new_tokens=new_tokens)
    start = prompt.shape[1]
    with torch.no_grad():
        logits = int8(tokens)[:, start - 1:-1]  # the logits each generated token was picked from
    chosen = logits.gather(-1, tokens[:, start:, None]).squeeze(-1)
    shortfall = (logits.max(dim=-1).values - chosen).max().item()
    assert shortfall <= tol, f"a cached greedy token scores {shortfall:.3f} below the best in one pass"


def check_meta_count(spec_file: str, hf_model_class: Any, hf_config: Any, total: int) -> None:
    """Assert ``configs/pretrained/<spec_file>`` built on the meta device has ``total`` parameters, as
    does transformers' ``hf_model_class(hf_config)`` built on the meta device."""
    model = build_model(CONFIGS / spec_file, device="meta")
    assert count_parameters(model).total == total
    with torch.device("meta"):
        ref = hf_model_class(hf_config)
    assert sum(p.numel() for p in ref.parameters()) == total


def check_config_refused(hf: Any, folder: Path, change: Mapping[str, Any] | Callable[[dict[str, Any]], None],
                         field: str) -> None:
    """Save ``hf`` to ``folder``, change its ``config.json`` (a mapping of fields to set, or a function
    editing the dict in place) and assert ``load_hf`` raises a CheckpointError naming ``field`` and
    ``config.json``."""

    hf.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    if callable(change):
        change(config)
    else:
        config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_hf(folder)
    assert field in str(info.value)
    assert "config.json" in str(info.value)


def check_tensor_refused(hf: Any, folder: Path, extra: str, family: str, tensor: torch.Tensor | None = None) -> None:
    """Save ``hf`` to ``folder`` with one more tensor ``extra`` (default ``ones(64)``) and assert
    ``load_hf`` refuses it: ``not part of <family> (1): <extra>``."""

    state = dict(hf.state_dict())
    state[extra] = torch.ones(64) if tensor is None else tensor
    hf.save_pretrained(folder, state_dict=state)
    with pytest.raises(CheckpointError, match=rf"not part of {re.escape(family)} \(1\): {re.escape(extra)}"):
        load_hf(folder)


class FamilyParity:
    """The shared parity tests of a family read by ``load_hf``, for a test module to subclass::

        class TestParity(FamilyParity):
            architecture = "LlamaForCausalLM"

    The module provides a fixture ``hf_folder`` -> ``(variant name, perturbed transformers model, the
    folder it was saved to)``. :meth:`check_export` is the hook for a family's own checks of the
    ``export-hf`` output."""

    architecture = ""

    def label(self, name: str) -> str:
        return f"{self.architecture} {name}"

    def check_export(self, back: Any, hf: Any) -> None:
        """More checks of the exported-and-reopened transformers model ``back`` (none by default)."""

    def test_logits_match_transformers(self, hf_folder: tuple[str, Any, Path]) -> None:
        name, hf, folder = hf_folder
        check_logits(load_hf(folder), hf, self.label(name))

    def test_greedy_generation_matches_transformers(self, hf_folder: tuple[str, Any, Path]) -> None:
        name, hf, folder = hf_folder
        check_greedy(load_hf(folder), hf, self.label(name))

    def test_kv_cache_logits_equal_no_cache(self, hf_folder: tuple[str, Any, Path]) -> None:
        _, hf, folder = hf_folder
        check_cache(load_hf(folder), hf.config.vocab_size)

    def test_import_hf_cli_then_export_hf_roundtrip(self, hf_folder: tuple[str, Any, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
        name, hf, folder = hf_folder
        back = check_cli_roundtrip(folder, hf, tmp_path, self.architecture, self.label(name))
        assert "wrote" in capsys.readouterr().out
        self.check_export(back, hf)

    def test_optimize_for_inference_and_int8(self, hf_folder: tuple[str, Any, Path]) -> None:
        name, hf, folder = hf_folder
        check_runtime(load_hf(folder), hf, self.label(name))


def save_tiny(hf: Any, folder: Path) -> Path:
    """``hf.save_pretrained(folder)``; returns the folder."""
    hf.save_pretrained(folder)
    return folder
