"""The core CLI commands: info, spec, schema, components, and how they report bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, tiny_cfg

from modelkit import load_spec
from modelkit.cli import main
from modelkit.components.kernels import attention_kernel_names


def test_info_prints_the_books_figures_for_gpt2_small(capsys):
    assert main(["info", str(REPO / "configs/gpt2-small.json")]) == 0
    out = capsys.readouterr().out
    assert "163,009,536" in out and "124,412,160" in out and "621.83 MB" in out
    assert "attention:   mha(backend=sdpa, out_bias=True)" in out
    assert "trf_blocks.0-11   PreNormBlock x12" in out


def test_info_json_for_gpt2_xl_counts_on_meta(capsys):
    assert main(["info", "--json", str(REPO / "configs/gpt2-xl.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == 1_637_792_000
    assert report["parameters_without_head"] == 1_557_380_800
    assert report["memory_mb"]["float32"] == 6247.68


def test_spec_prints_every_default_and_round_trips(tmp_path, capsys):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_cfg(block="parallel")))
    assert main(["spec", str(path)]) == 0
    filled = json.loads(capsys.readouterr().out)
    assert filled["norm"] == {"type": "layernorm", "eps": 1e-5, "bias": True}
    assert filled["attention"] == {"type": "mha", "backend": "sdpa", "out_bias": True}
    assert load_spec(filled) == load_spec(path)


def test_schema_writes_a_file_an_editor_can_use(tmp_path):
    out = tmp_path / "modelkit.schema.json"
    assert main(["schema", "-o", str(out)]) == 0
    schema = json.loads(out.read_text())
    assert schema["properties"]["norm"] == {"$ref": "#/$defs/norm", "default": "layernorm"}
    assert "gelu_exact" in schema["$defs"]["activation"]["anyOf"][0]["enum"]


def test_components_lists_each_kind_with_parameters_and_source(capsys):
    assert main(["components"]) == 0
    out = capsys.readouterr().out
    for kind in ("activation:", "norm:", "attention:", "feedforward:", "positional:", "block:"):
        assert kind in out
    assert "eps: float (default 1e-05)" in out
    assert "from modelkit (built-in)" in out and "modelkit/components/norm.py:" in out
    assert main(["components", "block", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["components"]["block"]
    assert {c["name"] for c in listed} >= {"pre_norm", "post_norm", "parallel"}


def test_components_shows_the_allowed_values_of_a_parameter_that_has_a_set(capsys):
    kernels = attention_kernel_names()
    assert len(kernels) >= 2 and "sdpa" in kernels
    assert main(["components", "attention"]) == 0
    out = capsys.readouterr().out
    assert f"backend: {' | '.join(repr(k) for k in kernels)} (default 'sdpa')" in out
    assert "out_bias: bool (default True)" in out
    assert main(["components", "attention", "--json"]) == 0
    (mha,) = [c for c in json.loads(capsys.readouterr().out)["components"]["attention"] if c["name"] == "mha"]
    params = {p["name"]: p for p in mha["parameters"]}
    assert params["backend"]["choices"] == kernels and params["out_bias"]["choices"] is None


def test_a_bad_config_is_one_clear_message_and_exit_status_2_without_traceback(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(tiny_cfg(feedforward={"type": "mlp", "activation": "gleu"}, n_heads=5)))
    result = subprocess.run([sys.executable, "-m", "modelkit", "info", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"modelkit info: error: invalid model spec in {path} (2 problems):" in result.stderr
    assert "feedforward.activation: unknown activation 'gleu'; did you mean 'gelu'?" in result.stderr
    assert "n_heads: emb_dim 32 is not divisible by n_heads 5" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["generate", "--config", "x.json", "--seed", "nan"], "modelkit generate: error: argument --seed: invalid int value: 'nan'"),
    (["train", "--steps", "abc"], "modelkit train: error: argument --steps"),
    (["spec"], "modelkit spec: error: the following arguments are required: config"),
    (["nonsense"], "modelkit: error: argument COMMAND: invalid choice: 'nonsense'"),
])
def test_a_usage_error_is_one_line_and_exit_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err
    assert err.rstrip().endswith("--help)")


def test_numpy_is_a_dependency_so_commands_print_no_numpy_warning(tmp_path):
    """torch's CPU wheel does not require numpy but warns at import without it: modelkit depends on it."""
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("numpy>=") for d in deps), deps
    command = [sys.executable, "-m", "modelkit", "info", str(REPO / "configs/tiny.json")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Failed to initialize NumPy" not in result.stderr
    # The check can fail: with numpy hidden (as a fresh install without it was), the same command warns.
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "numpy.py").write_text("raise ModuleNotFoundError(\"No module named 'numpy'\", name='numpy')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert "Failed to initialize NumPy" in result.stderr
