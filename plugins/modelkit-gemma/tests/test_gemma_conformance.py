"""The plugin's components pass modelkit's conformance check."""

from __future__ import annotations

from typing import Any

import pytest

from modelkit.testing import check_component

pytestmark = pytest.mark.usefixtures("modelkit_one_thread")


@pytest.mark.parametrize(("kind", "component"), [
    ("norm", "gemma.rmsnorm"),
    ("norm", {"type": "gemma.rmsnorm", "eps": 1e-5}),
    ("feedforward", "gemma.geglu"),
    ("feedforward", {"type": "gemma.geglu", "hidden_dim": 40, "activation": "gelu_exact", "bias": True}),
    ("feedforward", {"type": "gemma.geglu", "hidden_mult": 2, "activation": "silu"}),
    ("block", "gemma.sandwich"),
], ids=str)
def test_component_conforms(kind: str, component: str | dict[str, Any]) -> None:
    report = check_component(kind, component)
    assert report.ok, report
