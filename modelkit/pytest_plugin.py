"""pytest fixtures for modelkit and its plugins (registered through the ``pytest11`` entry point).

Parametrised arguments: a test that takes one of these arguments runs once per value.

- ``modelkit_config``: every JSON spec under ``configs/`` of the directory pytest runs from
  (``--modelkit-configs DIR`` to choose another folder).
- ``modelkit_<kind>_name`` (``modelkit_attention_name``, ``modelkit_norm_name``, ...): every
  component of that kind that loads, plugins included (``--modelkit-builtin-only``: modelkit's own).

Fixtures: ``modelkit_tiny_spec`` is :func:`modelkit.testing.tiny_model_spec` (call it with overrides);
``modelkit_one_thread`` runs a test with one intra-op torch thread (use it with
``pytestmark = pytest.mark.usefixtures("modelkit_one_thread")``).

Nothing is imported from modelkit until a test asks for one of these, so having modelkit installed
costs other projects' test runs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

_KINDS = ("activation", "norm", "attention", "feedforward", "positional", "block")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("modelkit")
    group.addoption("--modelkit-configs", default="configs", help="folder of specs for modelkit_config")
    group.addoption("--modelkit-builtin-only", action="store_true",
                    help="parametrise modelkit_<kind>_name over modelkit's own components only")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    if "modelkit_config" in names:
        from .testing import all_configs

        paths = all_configs(metafunc.config.getoption("--modelkit-configs"))
        metafunc.parametrize("modelkit_config", paths, ids=[p.stem for p in paths])
    for kind in _KINDS:
        arg = f"modelkit_{kind}_name"
        if arg in names:
            from .testing import components_of

            found = components_of(kind, builtin_only=metafunc.config.getoption("--modelkit-builtin-only"))
            metafunc.parametrize(arg, found)


@pytest.fixture
def modelkit_tiny_spec() -> Callable[..., dict[str, Any]]:
    """A factory of tiny spec dicts: ``modelkit_tiny_spec(block="post_norm")``."""
    from .testing import tiny_model_spec

    return tiny_model_spec


@pytest.fixture
def modelkit_one_thread() -> Iterator[None]:
    """One intra-op torch thread for the test: tiny models run fastest so, above all on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
