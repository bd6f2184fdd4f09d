"""modelkit's pytest plugin (modelkit/pytest_plugin.py), run in fresh pytest sessions through ``pytester``.

Each session runs in an empty temporary folder, as in a project other than this repository.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from modelkit import build_model
from modelkit.testing import components_of

pytest_plugins = ["pytester"]

USES_CONFIG = """
from modelkit import load_spec

def test_config(modelkit_config):
    assert load_spec(modelkit_config).name == modelkit_config.stem
"""


def write_spec(folder: Path, name: str) -> None:
    """A valid tiny spec named ``name`` in ``folder/name.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"name": name, "vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2}
    (folder / f"{name}.json").write_text(json.dumps(spec))


def test_modelkit_config_without_a_configs_folder_is_skipped_saying_why(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_it=USES_CONFIG)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines([f"*no config folder 'configs' under {pytester.path}; pass --modelkit-configs DIR*"])


def test_modelkit_configs_names_the_folder_of_specs(pytester: pytest.Pytester) -> None:
    write_spec(pytester.path / "specs" / "more", "beta")
    write_spec(pytester.path / "specs", "alpha")
    pytester.makepyfile(test_it=USES_CONFIG)
    result = pytester.runpytest("-v", "--modelkit-configs", "specs")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_config?alpha? PASSED*", "*test_config?beta? PASSED*"])


def test_the_default_configs_folder_is_the_rootdirs_wherever_pytest_starts(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\n")
    write_spec(pytester.path / "configs", "tiny")
    sub = pytester.mkpydir("tests")
    (sub / "test_it.py").write_text(USES_CONFIG)
    monkeypatch.chdir(sub)
    pytester.runpytest_inprocess("-q").assert_outcomes(passed=1)


def test_an_empty_configs_folder_skips_saying_so(pytester: pytest.Pytester) -> None:
    (pytester.path / "configs").mkdir()
    pytester.makepyfile(test_it=USES_CONFIG)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no [*].json spec under *configs*"])


def test_an_explicit_modelkit_configs_that_is_no_folder_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_it=USES_CONFIG)
    result = pytester.runpytest("--modelkit-configs", "missing")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--modelkit-configs missing: no such folder*"])


def test_modelkit_tiny_spec_is_a_spec(modelkit_tiny_spec: dict[str, Any]) -> None:
    model = build_model(modelkit_tiny_spec)
    assert (model.spec.vocab_size, model.spec.emb_dim, model.spec.n_layers) == (50257, 32, 2)


def test_modelkit_make_tiny_spec_takes_overrides(modelkit_make_tiny_spec: Callable[..., dict[str, Any]]) -> None:
    spec = modelkit_make_tiny_spec(vocab_size=97, block="post_norm")
    assert (spec["vocab_size"], spec["block"], spec["emb_dim"]) == (97, "post_norm", 32)
    assert build_model(spec).spec.block.type == "post_norm"
    assert modelkit_make_tiny_spec()["vocab_size"] == 50257  # overrides do not stick


def test_the_readmes_example_runs_as_written(pytester: pytest.Pytester) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Testing across variants"):readme.index("## Speed options")]
    (code,) = re.findall(r"```python\n# tests/test_variants.py\n(.*?)```", section, re.S)
    write_spec(pytester.path / "configs", "tiny")
    pytester.makepyfile(test_variants=code)
    result = pytester.runpytest("-q")
    norms = components_of("norm")
    assert len(norms) >= 2  # the llama plugin's too (installed for the suite)
    result.assert_outcomes(passed=2 + len(norms))
