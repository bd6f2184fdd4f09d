"""pytest fixtures for modelkit and its plugins (registered through the ``pytest11`` entry point).

Parametrised arguments: a test that takes one of these arguments runs once per value.

- ``modelkit_config``: the path of every ``*.json`` spec under ``configs/`` in pytest's rootdir (the
  folder of your ``pytest.ini``/``pyproject.toml``), or under ``--modelkit-configs DIR`` (a relative
  ``DIR`` is from the directory pytest was started in). Without that folder the test is skipped,
  saying why; an explicit ``--modelkit-configs`` that is not a folder is a usage error.
- ``modelkit_<kind>_name`` (``modelkit_attention_name``, ``modelkit_norm_name``, ...): every
  component of that kind that loads, plugins included (``--modelkit-builtin-only``: modelkit's own).

Fixtures: ``modelkit_tiny_spec`` is a tiny spec dict (:func:`modelkit.testing.tiny_model_spec`);
``modelkit_make_tiny_spec`` is that function, to call with overrides; ``modelkit_one_thread`` runs a
test with one intra-op torch thread (use it with ``pytestmark = pytest.mark.usefixtures("modelkit_one_thread")``).

Nothing is imported from modelkit until a test asks for one of these, so having modelkit installed
costs other projects' test runs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_KINDS = ("activation", "norm", "attention", "feedforward", "positional", "block")
_DEFAULT_CONFIGS = "configs"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("modelkit")
    group.addoption("--modelkit-configs", metavar="DIR", default=None,
                    help=f"folder of specs for modelkit_config (default: '{_DEFAULT_CONFIGS}' in the rootdir)")
    group.addoption("--modelkit-builtin-only", action="store_true",
                    help="parametrise modelkit_<kind>_name over modelkit's own components only")


def pytest_configure(config: pytest.Config) -> None:
    """Refuse an explicit ``--modelkit-configs`` that is not a folder before anything is collected."""
    given = config.getoption("--modelkit-configs")
    if given is not None and not configs_folder(config).is_dir():
        raise pytest.UsageError(f"--modelkit-configs {given}: no such folder ({configs_folder(config)})")


def configs_folder(config: pytest.Config) -> Path:
    """The folder ``modelkit_config`` takes its specs from: ``--modelkit-configs DIR`` (relative to the
    directory pytest was started in), else ``configs`` in the rootdir."""
    given = config.getoption("--modelkit-configs")
    if given is None:
        return config.rootpath / _DEFAULT_CONFIGS
    return config.invocation_params.dir / given


def _config_params(config: pytest.Config) -> tuple[list[Any], list[str]]:
    """The ``modelkit_config`` values and ids; one skipped value saying why when there is no spec."""
    folder = configs_folder(config)
    if not folder.is_dir():  # only the default can be missing here: pytest_configure refused the rest
        reason = f"no config folder '{_DEFAULT_CONFIGS}' under {config.rootpath}; pass --modelkit-configs DIR"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))], ["no-configs"]
    from .testing import all_configs

    paths = all_configs(folder)
    if not paths:
        reason = f"no *.json spec under {folder}"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))], ["no-configs"]
    return list(paths), [p.stem for p in paths]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    if "modelkit_config" in names:
        values, ids = _config_params(metafunc.config)
        metafunc.parametrize("modelkit_config", values, ids=ids)
    for kind in _KINDS:
        arg = f"modelkit_{kind}_name"
        if arg in names:
            from .testing import components_of

            found = components_of(kind, builtin_only=metafunc.config.getoption("--modelkit-builtin-only"))
            metafunc.parametrize(arg, found)


@pytest.fixture
def modelkit_tiny_spec() -> dict[str, Any]:
    """A tiny spec dict (GPT-2 vocabulary, context 32, emb 32, 4 heads, 2 layers), new for each test."""
    from .testing import tiny_model_spec

    return tiny_model_spec()


@pytest.fixture
def modelkit_make_tiny_spec() -> Callable[..., dict[str, Any]]:
    """A factory of tiny spec dicts: ``modelkit_make_tiny_spec(block="post_norm", vocab_size=97)``."""
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
