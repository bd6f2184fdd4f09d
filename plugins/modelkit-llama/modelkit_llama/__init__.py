"""Llama-style components for modelkit, registered through entry points (see pyproject.toml).

- ``llama.rmsnorm`` (norm): :class:`modelkit_llama.norm.RMSNorm`
- ``llama.swiglu`` (feedforward): :class:`modelkit_llama.feedforward.SwiGLU`
- ``llama.rope`` (positional): :class:`modelkit_llama.positional.RoPE`
- ``llama.alibi`` (positional): :class:`modelkit_llama.positional.ALiBi`
- ``llama.gqa`` (attention): :class:`modelkit_llama.attention.GroupedQueryAttention`

Importing this package (or its component modules) registers nothing: modelkit imports a module the
first time a spec or a lookup names one of its components. ``modelkit_llama.runtime`` registers
optional fast paths for them in modelkit's runtime (entry-point group ``modelkit.runtime``).
"""

__version__ = "0.1.0"
