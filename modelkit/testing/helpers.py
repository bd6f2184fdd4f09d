"""Helpers for tests that run over every config file or every registered component of a kind,
and that assert properties holding across variants (two specs computing the same logits, or having
the same parameter count). The pytest fixtures built on them are in :mod:`modelkit.pytest_plugin`
(loaded automatically by pytest when modelkit is installed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..builder import build_model
from ..registry import KINDS, get_registry
from ..spec import ModelSpec, load_spec

__all__ = [
    "all_configs", "assert_same_outputs", "assert_same_parameter_count", "components_of", "synthetic_text",
    "tiny_model_spec", "with_component",
]

_TINY_MODEL: dict[str, Any] = {
    "name": "tiny", "vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
    "drop_rate": 0.0, "qkv_bias": False,
}


def all_configs(root: str | os.PathLike[str] = "configs") -> list[Path]:
    """Every ``*.json`` spec under ``root`` (recursively), sorted; relative roots resolve from the cwd.

    Raises ``FileNotFoundError`` if ``root`` is not a folder, so a wrong path never yields an empty
    (and silently passing) parametrisation.
    """
    folder = Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"no config folder '{folder}' (from {Path.cwd()})")
    return sorted(folder.rglob("*.json"))


def components_of(kind: str, *, builtin_only: bool = False) -> list[str]:
    """Names of the components of ``kind`` that load: built-ins first, then runtime registrations and
    plugins (broken plugins are left out; :func:`check_component` reports them). ``builtin_only``
    keeps modelkit's own."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind '{kind}' (kinds: {', '.join(KINDS)})")
    entries, _ = get_registry(kind).load_all()
    return [e.name for e in entries if e.is_builtin or not builtin_only]


def tiny_model_spec(**overrides: Any) -> dict[str, Any]:
    """A spec dict for a tiny GPT (GPT-2 vocabulary, context 32, emb 32, 4 heads, 2 layers, no dropout).

    ``overrides`` replace top-level fields or slots (``block="post_norm"``, ``vocab_size=97``).
    The vocabulary stays GPT-2's by default so the model trains on tokenised text.
    """
    return {**_TINY_MODEL, **overrides}


def with_component(spec: Mapping[str, Any], kind: str, component: str | Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with ``component`` in the slot of ``kind`` (an activation goes into the ``mlp``)."""
    out = dict(spec)
    if kind == "activation":
        out["feedforward"] = {"type": "mlp", "activation": component}
    else:
        out[kind] = component
    return out


def assert_same_outputs(spec_a: ModelSpec | Mapping[str, Any] | str, spec_b: ModelSpec | Mapping[str, Any] | str,
                        *, seed: int = 0, share_weights: bool = True, batch: int = 2, seq: int | None = None,
                        atol: float = 1e-5, rtol: float = 1e-5) -> float:
    """Assert two specs compute the same logits on the same tokens; return the largest difference.

    Both models are built after ``torch.manual_seed(seed)``; with ``share_weights`` B then loads A's
    state dict (strictly), so the check is about the computation (e.g. two attention backends, or a
    plugin re-implementing a built-in), not the initialisation. Runs in eval mode without grad.
    """
    a_spec, b_spec = load_spec(spec_a), load_spec(spec_b)
    torch.manual_seed(seed)
    model_a = build_model(a_spec).eval()
    torch.manual_seed(seed)
    model_b = build_model(b_spec).eval()
    if share_weights:
        try:
            model_b.load_state_dict(model_a.state_dict(), strict=True)
        except RuntimeError as exc:
            raise AssertionError(f"the two specs do not have the same parameters: {exc}") from None
    n = min(seq or a_spec.context_length, a_spec.context_length, b_spec.context_length)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(a_spec.vocab_size, b_spec.vocab_size), (batch, n), generator=g)
    with torch.no_grad():
        out_a, out_b = model_a(ids), model_b(ids)
    assert out_a.shape == out_b.shape, f"logit shapes differ: {tuple(out_a.shape)} vs {tuple(out_b.shape)}"
    diff = (out_a - out_b).abs().max().item()
    torch.testing.assert_close(out_b, out_a, atol=atol, rtol=rtol,
                               msg=lambda m: f"{a_spec.name} and {b_spec.name} compute different logits: {m}")
    return diff


def assert_same_parameter_count(spec_a: ModelSpec | Mapping[str, Any] | str,
                                spec_b: ModelSpec | Mapping[str, Any] | str) -> int:
    """Assert two specs have the same number of parameters (built on meta); return it."""
    from ..introspect import count_parameters

    a = count_parameters(build_model(spec_a, device="meta")).total
    b = count_parameters(build_model(spec_b, device="meta")).total
    assert a == b, f"parameter counts differ: {a:,} vs {b:,}"
    return a


def synthetic_text(n_sentences: int = 200, seed: int = 0) -> str:
    """Deterministic English-like text (a tiny grammar over ~40 words) for training tests.

    It has structure a small model learns in a few dozen steps (fixed word order, agreement-free
    templates), is the same for the same arguments, and is free to ship.
    """
    import random

    rng = random.Random(seed)
    adjectives = "old young quiet clever tired brave small patient curious gentle".split()
    nouns = "painter sailor teacher farmer doctor baker miller writer singer weaver".split()
    verbs = "paints greets follows thanks visits watches answers helps calls meets".split()
    places = "by the river|in the garden|at the market|near the mill|on the hill".split("|")
    sentences = []
    for _ in range(n_sentences):
        subject = f"the {rng.choice(adjectives)} {rng.choice(nouns)}"
        sentence = f"{subject} {rng.choice(verbs)} the {rng.choice(nouns)} {rng.choice(places)}."
        sentences.append(sentence[0].upper() + sentence[1:])
    return " ".join(sentences)
