"""The testing kit: what a component must satisfy, and helpers for modelkit's and plugins' tests.

- :mod:`modelkit.testing.conformance`: :func:`check_component` and the properties it checks
  (:data:`CHECKS`) on a component built at tiny sizes, alone and inside a tiny model.
- :mod:`modelkit.testing.helpers`: parametrising over configs and components (:func:`all_configs`,
  :func:`components_of`), tiny specs and training text (:func:`tiny_model_spec`,
  :func:`synthetic_text`), and cross-variant assertions (:func:`assert_same_outputs`).

Everything is importable from here: ``from modelkit.testing import check_component``.
"""

from .conformance import (
    CHECKS,
    CheckResult,
    ConformanceReport,
    ProbePositional,
    builtin_components,
    check_component,
    tiny_dims,
    tiny_spec,
)
from .helpers import (
    all_configs,
    assert_same_outputs,
    assert_same_parameter_count,
    components_of,
    synthetic_text,
    tiny_model_spec,
    with_component,
)

__all__ = [
    "CHECKS", "CheckResult", "ConformanceReport", "ProbePositional", "builtin_components", "check_component",
    "tiny_dims", "tiny_spec",
    "all_configs", "assert_same_outputs", "assert_same_parameter_count", "components_of", "synthetic_text",
    "tiny_model_spec", "with_component",
]
