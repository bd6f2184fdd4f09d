"""modelkit's runtime: everything about speed, beside a model core that knows nothing of it.

It depends on the core (registry, spec, model, components) and the core never on it. What it holds:

- :mod:`.optimize`: :func:`optimize_for_inference` (dtype, int8, Linear kernel, weight layout,
  huge pages, the native step, ``torch.compile``) and the kernel report of ``modelkit info --device``;
- :mod:`.steps`: inference steps (a module's forward as plain function calls, for decoding), registered
  per component class with :func:`register_step`; :mod:`.builtin` registers modelkit's own;
- :mod:`.onednn`: ``nn.Linear`` on oneDNN's kernels, with activations fused as post-ops;
- :mod:`.stacking`: Linear layers that read one input stored as one matrix
  (:func:`register_linear_groups`);
- :mod:`.quantize` (int8 weights), :mod:`.hugepages` (2 MiB pages), :mod:`.native` (the C++ decode
  step), :mod:`.decode` (which of them ``generate`` runs) and :mod:`.cpu` (what this CPU can do).

A plugin's fast paths live in a module of its own that registers them, named by an entry point in
the group ``modelkit.runtime`` (``docs/extending.md``). Names below are imported on first use, so
``import modelkit`` does not load the runtime's kernels.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "optimize_for_inference": "optimize", "set_weight_layout_": "optimize", "parse_dtype": "optimize",
    "register_step": "steps", "step_of": "steps", "Step": "steps",
    "register_linear_groups": "stacking", "register_post_op": "onednn",
    "quantize_int8_": "quantize", "decoding_forward": "decode",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modelkit.runtime' has no attribute '{name}'")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
