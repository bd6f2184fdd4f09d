"""modelkit's built-in components, one module per kind. Importing this package registers them."""

from . import activation, attention, block, feedforward, norm, positional  # noqa: F401  (registration)
