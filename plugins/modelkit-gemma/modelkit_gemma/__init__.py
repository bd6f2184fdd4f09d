"""Gemma-style components for modelkit, registered through entry points (see pyproject.toml).

- ``gemma.rmsnorm`` (norm): RMSNorm computing ``x̂ · (1 + w)`` in float32, ``w`` zero-initialised;
- ``gemma.geglu`` (feedforward): ``down(act(gate(x)) ⊙ up(x))`` with an activation sub-component
  (default ``gelu``, the tanh approximation: GeGLU);
- ``gemma.sandwich`` (block): a norm before and after each sub-layer, ``x + post(sub(pre(x)))`` (Gemma 2).

Importing this package registers nothing; modelkit imports a module when a spec asks for its component.
"""
