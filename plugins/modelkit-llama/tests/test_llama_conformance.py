"""The plugin's components pass modelkit's conformance check."""

from __future__ import annotations

from typing import Any

import pytest

from modelkit.components.kernels import attention_kernel_names
from modelkit.testing import check_component, tiny_dims


pytestmark = pytest.mark.usefixtures("modelkit_one_thread")


@pytest.mark.parametrize(("kind", "component"), [
    ("norm", "llama.rmsnorm"),
    ("norm", {"type": "llama.rmsnorm", "eps": 1e-6}),
    ("feedforward", "llama.swiglu"),
    ("feedforward", {"type": "llama.swiglu", "hidden_dim": 40, "bias": True}),
    ("positional", "llama.rope"),
    ("positional", {"type": "llama.rope", "theta": 500000.0}),
    ("positional", "llama.alibi"),
    ("attention", "llama.gqa"),
    *[("attention", {"type": "llama.gqa", "num_kv_heads": kv, "backend": b})
      for kv in (1, 2) for b in attention_kernel_names()],
    *[("attention", {"type": "llama.gqa", "num_kv_heads": 2, "backend": b, **options})
      for b in attention_kernel_names()
      for options in ({"sliding_window": 3}, {"sliding_window": 4, "window_pattern": [True, False]},
                      {"softcap": 1.0, "query_scale": 0.5})],
    *[("attention", {"type": "llama.gqa", "num_kv_heads": 2, "qk_norm": n, "qk_norm_eps": 1e-5})
      for n in ("head", "projection")],
], ids=str)
def test_component_conforms(kind: str, component: str | dict[str, Any]) -> None:
    assert check_component(kind, component).ok


def test_alibi_conforms_with_a_head_count_that_is_not_a_power_of_two() -> None:
    check_component("positional", "llama.alibi", dims=tiny_dims(emb_dim=48, n_heads=6))
