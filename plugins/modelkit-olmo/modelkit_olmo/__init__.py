"""OLMo 2-style components for modelkit, registered through entry points (see pyproject.toml).

- ``olmo.post_norm`` (block): :class:`modelkit_olmo.block.SublayerPostNormBlock`

Importing this package (or its modules) registers nothing: modelkit imports a module the first time
a spec or a lookup names one of its components. The block subclasses modelkit's two-norm block and
changes only its wiring, so modelkit's runtime step for two-norm blocks applies to it unchanged.
"""

__version__ = "0.1.0"
