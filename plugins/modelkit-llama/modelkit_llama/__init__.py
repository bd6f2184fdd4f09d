"""Llama-style components for modelkit, registered through entry points (see pyproject.toml).

- ``llama.rmsnorm`` (norm): :class:`modelkit_llama.norm.RMSNorm`
- ``llama.swiglu`` (feedforward): :class:`modelkit_llama.feedforward.SwiGLU`
- ``llama.rope`` (positional): :class:`modelkit_llama.positional.RoPE`
- ``llama.alibi`` (positional): :class:`modelkit_llama.positional.ALiBi`
- ``llama.gqa`` (attention): :class:`modelkit_llama.attention.GroupedQueryAttention`

Importing this package (or any of its modules) registers nothing: modelkit imports a module the
first time a spec or a lookup names one of its components.
"""

__version__ = "0.1.0"
