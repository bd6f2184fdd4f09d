"""The corpus of absurd and hostile specs (issue: sizes are bounded, JSON is read defensively).

Every case is refused with one :class:`ModelkitError` through the Python API (``load_spec``,
``build_model``, ``GPTModel``) and with exit status 2 and one ``modelkit <cmd>: error:`` line (no
traceback) through the CLI (``info``, ``spec``, ``generate --config``, ``compare``), quickly and
without allocating: a subprocess runs the whole absurd-size corpus and its peak RSS is checked.

The cases are generated: every size field (and the built-in components' hidden sizes) at every value
of :data:`BAD_VALUES` that is out of bounds or of the wrong JSON type; specs whose every field is in
bounds but whose model is over ``MAX_PARAMETERS``; hostile JSON (deep nesting, NaN, huge numbers,
duplicate keys); and hostile files (devices, FIFOs, directories, oversized files).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from modelkit import GPTModel, build_model, load_spec
from modelkit.cli import main
from modelkit.errors import ModelkitError, ModelTooLargeError, SpecError
from modelkit.limits import (MAX_CONTEXT_LENGTH, MAX_EMB_DIM, MAX_HIDDEN_DIM, MAX_HIDDEN_MULT, MAX_JSON_DEPTH,
                             MAX_N_HEADS, MAX_N_LAYERS, MAX_PARAMETERS, MAX_SPEC_BYTES, MAX_VOCAB_SIZE)
from modelkit.sizing import available_memory, check_memory, check_model_size, estimate_size

REPO = Path(__file__).parent.parent

#: A valid spec that builds in milliseconds; each case changes one thing.
BASE: dict[str, Any] = {"vocab_size": 16, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 1,
                        "drop_rate": 0.0}

#: Each size field -> (its JSON path, its ceiling); the component ones are set inside their slot.
SIZE_FIELDS: dict[str, int] = {
    "vocab_size": MAX_VOCAB_SIZE, "context_length": MAX_CONTEXT_LENGTH, "emb_dim": MAX_EMB_DIM,
    "n_heads": MAX_N_HEADS, "n_layers": MAX_N_LAYERS,
    "feedforward.hidden_dim": MAX_HIDDEN_DIM, "feedforward.hidden_mult": MAX_HIDDEN_MULT,
}

#: The values the issue lists, and other wrong JSON types.
BAD_VALUES: dict[str, Any] = {
    "1e6": 10**6, "1e9": 10**9, "1e12": 10**12, "2^63": 2**63, "2^64": 2**64, "1e100": 10**100,
    "negative": -1, "min_int64": -(2**63), "zero": 0, "true": True, "false": False, "string": "8",
    "float": 8.0, "fraction": 8.5, "null": None, "array": [8], "object": {"n": 8},
}


#: Size fields where null is a value (the default: hidden_dim null means hidden_mult · emb_dim).
NULLABLE = {"feedforward.hidden_dim"}


def _is_bad(path: str, value: Any) -> bool:
    """Whether ``value`` is invalid for the size field at ``path`` (10**6 is a fine vocab_size)."""
    if value is None and path in NULLABLE:
        return False
    return not (type(value) is int and 0 < value <= SIZE_FIELDS[path])


def with_value(path: str, value: Any) -> dict[str, Any]:
    """:data:`BASE` with the field at ``path`` (``n_layers``, ``feedforward.hidden_dim``) set to ``value``."""
    spec = json.loads(json.dumps(BASE))
    if "." in path:
        slot, param = path.split(".")
        spec[slot] = {"type": "mlp", param: value}
    else:
        spec[path] = value
    return spec


SIZE_CASES = [pytest.param(path, value, id=f"{path}={name}")
              for path, ceiling in SIZE_FIELDS.items() for name, value in BAD_VALUES.items() if _is_bad(path, value)]

#: Every field within its ceiling, the model over MAX_PARAMETERS: refused when built (or by ``modelkit spec``).
TOO_MANY_PARAMETERS: dict[str, tuple[dict[str, Any], str]] = {
    "huge-vocab-and-width": ({"vocab_size": MAX_VOCAB_SIZE, "emb_dim": 2**16, "n_heads": 1}, "vocab_size"),
    "huge-context-learned-positions": ({"context_length": MAX_CONTEXT_LENGTH, "emb_dim": 2**16, "n_heads": 1},
                                       "context_length"),
    "one-enormous-block": ({"emb_dim": MAX_EMB_DIM, "n_heads": 1}, "emb_dim"),
    "deep-and-wide": ({"n_layers": MAX_N_LAYERS, "emb_dim": 2**14, "n_heads": 1}, "n_layers"),
    "widest-mlp": ({"emb_dim": 2**12, "n_heads": 1, "n_layers": MAX_N_LAYERS,
                    "feedforward": {"type": "mlp", "hidden_dim": MAX_HIDDEN_DIM}}, "n_layers"),
}

#: Hostile JSON text, each refused before anything is validated.
DEEP = MAX_JSON_DEPTH + 1
BAD_TEXT: dict[str, tuple[str, str]] = {
    "arrays-100000-deep": ("[" * 100_000, "nest more than"),
    "objects-100000-deep": ('{"a":' * 100_000, "nest more than"),
    "field-nested-65-deep": ('{"name": ' + "[" * DEEP + "]" * DEEP + "}", "nest more than"),
    "component-param-nested-65-deep": ('{"norm": {"type": "layernorm", "eps": ' + "[" * DEEP + "]" * DEEP + "}}",
                                       "nest more than"),
    "nan": ('{"vocab_size": NaN}', "NaN is not a JSON number"),
    "infinity": ('{"eps": Infinity}', "Infinity is not a JSON number"),
    "minus-infinity": ('{"drop_rate": -Infinity}', "-Infinity is not a JSON number"),
    "float-overflow": ('{"n_layers": 1e400}', "too large for a float"),
    "duplicate-keys": ('{"n_layers": 1, "n_layers": 2}', "duplicate key 'n_layers'"),
    "top-level-array": ("[1, 2]", "a spec must be a JSON object"),
    "truncated": ('{"n_layers": ', "invalid JSON at line 1"),
    "empty": ("", "invalid JSON at line 1, column 1"),
}

#: JSON types that were once coerced (``true`` built 1 layer): now each is an error at its path.
COERCED: dict[str, tuple[dict[str, Any], str]] = {
    "n_layers-true": ({"n_layers": True}, "n_layers: expected an integer, got true"),
    "qkv_bias-yes": ({"qkv_bias": "yes"}, 'qkv_bias: expected a boolean (true or false), got "yes"'),
    "eps-string": ({"norm": {"type": "layernorm", "eps": "1e-5"}}, 'norm.eps: expected a number, got "1e-5"'),
    "drop_rate-string": ({"drop_rate": "0.1"}, 'drop_rate: expected a number, got "0.1"'),
    "tie-1": ({"tie_embeddings": 1}, "tie_embeddings: expected a boolean (true or false), got 1"),
    "eps-nan": ({"norm": {"type": "layernorm", "eps": float("nan")}}, "norm.eps: must be a finite number"),
    "drop_rate-inf": ({"drop_rate": float("inf")}, "drop_rate: must be a finite number"),
}


# -- the Python API -------------------------------------------------------------------------------

API: dict[str, Callable[[Any], Any]] = {
    "load_spec": load_spec,
    "build_model(cpu)": build_model,
    "build_model(meta)": lambda spec: build_model(spec, device="meta"),
    "GPTModel": GPTModel,
}


def assert_refused_everywhere(spec: Any, expected: str, api: dict[str, Callable[[Any], Any]] = API) -> None:
    """Each API entry point raises one ModelkitError mentioning ``expected``, each within seconds."""
    for name, call in api.items():
        start = time.monotonic()
        with pytest.raises(ModelkitError) as excinfo:
            call(spec)
        assert expected in str(excinfo.value), f"{name}: {excinfo.value}"
        assert time.monotonic() - start < 5, f"{name} took {time.monotonic() - start:.1f} s"


@pytest.mark.parametrize(("path", "value"), SIZE_CASES)
def test_a_bad_size_is_refused_at_its_path_by_every_api(path, value, tmp_path):
    spec = with_value(path, value)
    assert_refused_everywhere(spec, f"{path}: ")
    file = tmp_path / "absurd.json"
    file.write_text(json.dumps(spec))
    assert_refused_everywhere(file, f"in {file}: {path}: ")
    assert_refused_everywhere(json.dumps(spec), f"{path}: ", {"load_spec": load_spec})


@pytest.mark.parametrize("path", [p for p in SIZE_FIELDS if "." not in p])
def test_a_size_over_its_ceiling_names_the_ceiling(path):
    with pytest.raises(SpecError) as excinfo:
        load_spec(with_value(path, SIZE_FIELDS[path] + 1))
    assert [str(issue) for issue in excinfo.value.issues] == [
        f"{path}: must be at most {SIZE_FIELDS[path]:,} (a ceiling from modelkit.limits), got {SIZE_FIELDS[path] + 1}"]


@pytest.mark.parametrize("path", [p for p in SIZE_FIELDS if p != "n_heads"])
def test_every_size_at_its_ceiling_is_accepted(path):
    assert load_spec(with_value(path, SIZE_FIELDS[path]))


@pytest.mark.parametrize("name", TOO_MANY_PARAMETERS)
def test_a_model_over_max_parameters_is_refused_before_building(name):
    changes, path = TOO_MANY_PARAMETERS[name]
    spec = {**BASE, **changes}
    assert load_spec(spec)  # each field is within its ceiling: the spec itself is valid JSON data
    assert estimate_size(load_spec(spec)).parameters > MAX_PARAMETERS
    assert_refused_everywhere(spec, f"{path}: the model would have ",
                              {k: v for k, v in API.items() if k != "load_spec"})


@pytest.mark.parametrize("name", BAD_TEXT)
def test_hostile_json_text_is_one_spec_error(name, tmp_path):
    text, expected = BAD_TEXT[name]
    file = tmp_path / "hostile.json"
    file.write_text(text)
    assert_refused_everywhere(file, expected)
    if text.lstrip().startswith("{"):
        assert_refused_everywhere(text, expected, {"load_spec": load_spec, "GPTModel": GPTModel})


@pytest.mark.parametrize("name", COERCED)
def test_json_types_are_never_coerced(name):
    changes, expected = COERCED[name]
    assert_refused_everywhere({**BASE, **changes}, expected)


def test_deep_python_data_and_cycles_are_refused_without_recursion():
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    cycle: dict[str, Any] = {}
    cycle["a"] = cycle
    for spec in ({**BASE, "name": deep}, {**BASE, "norm": {"type": "layernorm", "eps": deep}}, {**BASE, "x": cycle}):
        assert_refused_everywhere(spec, f"nest more than {MAX_JSON_DEPTH} deep")


def test_json_text_over_the_size_cap_is_refused_before_parsing():
    text = '{"name": "' + "x" * MAX_SPEC_BYTES + '"}'
    assert_refused_everywhere(text, f"characters; a spec may be at most {MAX_SPEC_BYTES:,}",
                              {"load_spec": load_spec, "GPTModel": GPTModel})
    assert_refused_everywhere("x" * 5000, "is neither JSON text", {"load_spec": load_spec})


# -- hostile files ----------------------------------------------------------------------------------

def _hostile_file(kind: str, tmp: Path) -> tuple[str, str]:
    """(path, expected message) of a file that is no spec; made in ``tmp``."""
    if kind == "fifo":
        os.mkfifo(tmp / "fifo.json")
        return str(tmp / "fifo.json"), "is not a regular file"
    if kind == "directory":
        (tmp / "dir.json").mkdir()
        return str(tmp / "dir.json"), "is a directory"
    if kind == "symlink-to-dev-zero":
        (tmp / "zero.json").symlink_to("/dev/zero")
        return str(tmp / "zero.json"), "is not a regular file"
    if kind == "sparse-1-TiB":  # st_size is checked before a byte is read; no disk is used
        with open(tmp / "huge.json", "wb") as fh:
            fh.truncate(2**40)
        return str(tmp / "huge.json"), f"the file is {2**40:,} bytes"
    if kind == "just-over-the-cap":
        (tmp / "big.json").write_bytes(b" " * (MAX_SPEC_BYTES + 1))
        return str(tmp / "big.json"), f"a spec file may be at most {MAX_SPEC_BYTES:,} bytes"
    if kind == "not-utf8":
        (tmp / "bin.json").write_bytes(b"\xff\xfe{}")
        return str(tmp / "bin.json"), "not UTF-8"
    if kind == "missing":
        return str(tmp / "missing.json"), "cannot read the spec file"
    return f"/dev/{kind}", "is not a regular file"


HOSTILE_FILES = ["zero", "null", "urandom", "fifo", "directory", "symlink-to-dev-zero", "sparse-1-TiB",
                 "just-over-the-cap", "not-utf8", "missing"]


@pytest.mark.parametrize("kind", HOSTILE_FILES)
def test_a_hostile_file_is_refused_without_reading_it(kind, tmp_path):
    path, expected = _hostile_file(kind, tmp_path)
    assert_refused_everywhere(path, expected)


def test_a_spec_file_at_the_cap_is_read():
    # whitespace pads a valid spec to exactly MAX_SPEC_BYTES: the cap is on size, not content
    text = json.dumps(BASE)
    padded = text[:-1] + " " * (MAX_SPEC_BYTES - len(text)) + "}"
    assert len(padded.encode()) == MAX_SPEC_BYTES
    assert load_spec(padded).n_layers == 1


# -- the CLI ------------------------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[str], list[str]]] = {
    "info": lambda f: ["info", f],
    "spec": lambda f: ["spec", f],
    "generate": lambda f: ["generate", "--config", f, "--prompt", "Hi", "--max-new-tokens", "1"],
    "compare": lambda f: ["compare", f, "--no-speed", "--no-plot"],
}


def assert_cli_refuses(path: str, expected: str, capsys: pytest.CaptureFixture[str],
                       commands: tuple[str, ...] = tuple(COMMANDS)) -> None:
    """Each command exits 2 printing exactly one ``modelkit <cmd>: error:`` line with ``expected``."""
    for command in commands:
        assert main(COMMANDS[command](path)) == 2, command
        err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
        assert len(err) == 1 and err[0].startswith(f"modelkit {command}: error: "), (command, err)
        assert expected in err[0] and "Traceback" not in err[0], (command, err)


CLI_SIZE_CASES = [pytest.param(path, value, id=f"{path}={name}") for path, ceiling in SIZE_FIELDS.items()
                  for name, value in BAD_VALUES.items()
                  if _is_bad(path, value) and name in ("1e6", "1e9", "1e12", "2^63", "2^64", "negative", "zero",
                                                          "true", "string", "float")]


@pytest.mark.parametrize(("path", "value"), CLI_SIZE_CASES)
def test_the_cli_refuses_a_bad_size_in_one_line(path, value, tmp_path, capsys):
    file = tmp_path / "absurd.json"
    file.write_text(json.dumps(with_value(path, value)))
    assert_cli_refuses(str(file), f"{path}: ", capsys)


@pytest.mark.parametrize("name", TOO_MANY_PARAMETERS)
def test_the_cli_refuses_a_model_over_max_parameters(name, tmp_path, capsys):
    changes, path = TOO_MANY_PARAMETERS[name]
    file = tmp_path / "huge.json"
    file.write_text(json.dumps({**BASE, **changes}))
    assert_cli_refuses(str(file), f"{path}: the model would have ", capsys)


@pytest.mark.parametrize("name", [*BAD_TEXT, *(n for n in COERCED if n not in ("eps-nan", "drop_rate-inf"))])
def test_the_cli_refuses_hostile_json_in_one_line(name, tmp_path, capsys):
    """(NaN and Infinity in a file are refused by the parser: BAD_TEXT has them.)"""
    if name in BAD_TEXT:
        text, expected = BAD_TEXT[name]
    else:
        changes, expected = COERCED[name]
        text = json.dumps({**BASE, **changes})
    file = tmp_path / "hostile.json"
    file.write_text(text)
    assert_cli_refuses(str(file), expected, capsys)


@pytest.mark.parametrize("kind", HOSTILE_FILES)
def test_the_cli_refuses_a_hostile_file_in_one_line(kind, tmp_path, capsys):
    path, expected = _hostile_file(kind, tmp_path)
    assert_cli_refuses(path, expected, capsys)


@pytest.mark.parametrize(("key", "value"), [("n_layers", "1e12"), ("emb_dim", "1000000000"), ("vocab_size", "-1"),
                                            ("n_layers", "true"), ("norm.eps", "NaN"), ("n_layers", "1e999")])
def test_compare_overrides_are_checked_like_spec_fields(key, value, tmp_path, capsys):
    file = tmp_path / "base.json"
    file.write_text(json.dumps(BASE))
    assert main(["compare", str(file), "--no-speed", "--no-plot", "--override", f"{key}={value}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"modelkit compare: error: invalid model spec in <dict>: {key}: ")


def test_a_compare_override_nested_100000_deep_is_one_line(tmp_path, capsys):
    file = tmp_path / "base.json"
    file.write_text(json.dumps(BASE))
    assert main(["compare", str(file), "--no-speed", "--no-plot", "--override", "name=" + "[" * 100_000]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "modelkit compare: error: override 'name': the value nests too deep to be a spec value"]


# -- memory: sizing before allocating ------------------------------------------------------------------

def test_the_estimate_is_exact_for_built_in_and_plugin_components():
    specs = [BASE, {**BASE, "tie_embeddings": True, "n_layers": 3},
             json.loads((REPO / "configs/tiny.json").read_text())]
    try:
        import modelkit_llama  # noqa: F401
        specs.append({**BASE, "norm": "llama.rmsnorm", "feedforward": {"type": "llama.swiglu", "multiple_of": 16},
                      "attention": {"type": "llama.gqa", "num_kv_heads": 1}, "positional": "llama.rope"})
    except ImportError:
        pass
    for spec in specs:
        model = build_model(spec, device="meta")
        assert estimate_size(model.spec).parameters == sum(p.numel() for p in model.parameters()), spec


def test_a_build_that_does_not_fit_free_memory_names_both_figures(monkeypatch):
    monkeypatch.setattr("modelkit.sizing.available_memory", lambda device: 1_000)
    with pytest.raises(ModelTooLargeError) as excinfo:
        build_model(BASE)
    needed = estimate_size(load_spec(BASE)).nbytes(torch.float32)
    assert excinfo.value.needed == needed and excinfo.value.available == 1_000
    assert "GiB on cpu" in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert build_model(BASE, device="meta")  # nothing is allocated on meta: never checked


def test_a_spec_too_large_for_any_machine_is_refused_on_cpu_but_sized_on_meta(capsys, tmp_path):
    spec = {**BASE, "emb_dim": 8192, "n_heads": 8, "n_layers": 100}  # 8e10 parameters, 300 GiB in float32
    estimate = check_model_size(load_spec(spec), torch.device("meta"))
    assert MAX_PARAMETERS > estimate.parameters > 8 * 10**10
    with pytest.raises(ModelTooLargeError, match=r"needs 30\d\.\d GiB on cpu"):
        GPTModel(spec)
    file = tmp_path / "big.json"
    file.write_text(json.dumps(spec))
    assert main(["generate", "--config", str(file), "--prompt", "Hi"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert len(err) == 1 and "GiB on cpu" in err[0]


def test_cuda_free_memory_is_asked_of_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 80 * 2**30))
    estimate = estimate_size(load_spec({**BASE, "emb_dim": 2**14, "n_heads": 1}))  # ~3.2e9 parameters
    with pytest.raises(ModelTooLargeError, match=r"on cuda:0 .* but cuda:0 has 1\.0 GiB free"):
        check_memory(estimate, torch.device("cuda:0"), torch.bfloat16)
    check_memory(estimate_size(load_spec(BASE)), torch.device("cuda:0"), torch.bfloat16)  # fits


def test_no_false_positive_for_gpt2_xl_on_a_128_gb_machine(monkeypatch):
    gpt2_xl = load_spec(REPO / "configs/gpt2-xl.json") if (REPO / "configs/gpt2-xl.json").exists() else load_spec(
        {"vocab_size": 50257, "context_length": 1024, "emb_dim": 1600, "n_heads": 25, "n_layers": 48})
    monkeypatch.setattr("modelkit.sizing.available_memory", lambda device: 128 * 10**9)
    assert check_model_size(gpt2_xl, torch.device("cpu"), torch.float32).parameters > 1.5e9


def test_free_memory_is_known_on_this_cpu_and_fits_a_small_model():
    free = available_memory(torch.device("cpu"))
    assert free is not None and 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert GPTModel(BASE)  # the real check, not patched


def test_a_cgroup_limit_counts_page_cache_as_free(monkeypatch, tmp_path):
    import modelkit.sizing as sizing

    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("900000\n")
    (tmp_path / "memory.stat").write_text("anon 100000\nfile 800000\n")
    real_path = sizing.Path
    monkeypatch.setattr(sizing, "Path", lambda p: tmp_path if p == "/sys/fs/cgroup" else real_path(p))
    assert sizing._cgroup_available() == 1000000 - 900000 + 800000
    (tmp_path / "memory.max").write_text("max\n")
    assert sizing._cgroup_available() is None


def test_meta_info_on_the_largest_valid_depth_finishes_in_seconds(tmp_path, capsys):
    file = tmp_path / "deep.json"
    file.write_text(json.dumps({**BASE, "n_layers": MAX_N_LAYERS}))
    start = time.monotonic()
    assert main(["info", str(file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == estimate_size(load_spec(file)).parameters
    assert time.monotonic() - start < 10


def test_the_schema_states_each_ceiling_as_its_maximum(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    for field in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        assert schema["properties"][field]["maximum"] == SIZE_FIELDS[field]
    mlp = next(v for v in schema["$defs"]["feedforward"]["anyOf"][1]["oneOf"] if v["title"] == "feedforward 'mlp'")
    assert mlp["properties"]["hidden_mult"]["maximum"] == MAX_HIDDEN_MULT
    assert {"type": "integer", "exclusiveMinimum": 0, "maximum": MAX_HIDDEN_DIM} in mlp["properties"]["hidden_dim"]["anyOf"]


# -- peak memory of a real process ---------------------------------------------------------------------

#: Runs the CLI in-process on every file given, then prints each exit status and this process's peak RSS.
_RUN_ALL = """
import contextlib, io, json, sys
from modelkit.cli import main
results = []
for path in sys.argv[1:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["info", path])
    results.append([path, status, err.getvalue()])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would include the forking test process
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"results": results, "peak_kib": peak}))
"""

PEAK_RSS_LIMIT_MIB = 400  # importing torch and modelkit alone takes ~235 MiB; one absurd allocation takes GiBs


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_the_absurd_size_corpus_stays_small_in_a_real_process(tmp_path):
    files = []
    cases = [with_value(path, value) for path, ceiling in SIZE_FIELDS.items()
             for value in (10**9, 10**12, 2**63, 2**64) if _is_bad(path, value)]
    cases += [{**BASE, **changes} for changes, _ in TOO_MANY_PARAMETERS.values()]
    cases += [{**BASE, "emb_dim": 10**9, "n_heads": 1}, {**BASE, "vocab_size": 10**12}]
    for i, spec in enumerate(cases):
        files.append(tmp_path / f"case{i}.json")
        files[-1].write_text(json.dumps(spec))
    (tmp_path / "deep.json").write_text("[" * 100_000)
    files += [tmp_path / "deep.json", Path("/dev/zero")]
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _RUN_ALL, *map(str, files)], capture_output=True, text=True,
                         timeout=120, env=_subprocess_env(), check=True).stdout
    report = json.loads(out.splitlines()[-1])
    for path, status, err in report["results"]:
        assert status == 2 and err.count("\n") == 1 and err.startswith("modelkit info: error: "), (path, err)
    assert report["peak_kib"] / 1024 < PEAK_RSS_LIMIT_MIB
    assert time.monotonic() - start < 60


def test_modelkit_info_on_a_trillion_layers_exits_at_once_without_allocating(tmp_path):
    file = tmp_path / "absurd.json"
    file.write_text(json.dumps({**BASE, "n_layers": 10**12}))
    # a fresh, small parent whose only child is the CLI, so RUSAGE_CHILDREN is that child's peak RSS (Linux
    # counts in it what the child had before exec: the small parent's copy, not this test process's)
    parent = ("import resource, subprocess, sys; r = subprocess.run([sys.executable, '-m', 'modelkit', 'info', "
              f"{str(file)!r}], capture_output=True, text=True, timeout=60); "
              "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
              "sys.stdout.write(r.stderr)")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=90,
                         env=_subprocess_env(), check=True).stdout.splitlines()
    status, peak_kib = map(int, out[0].split())
    assert status == 2 and out[1:] == [
        f"modelkit info: error: invalid model spec in {file}: n_layers: must be at most {MAX_N_LAYERS:,} "
        f"(a ceiling from modelkit.limits), got {10**12}"]
    assert peak_kib / 1024 < PEAK_RSS_LIMIT_MIB


# -- the llama plugin's size parameters ---------------------------------------------------------------

@pytest.mark.parametrize(("slot", "component", "param"), [
    ("feedforward", "llama.swiglu", "hidden_dim"), ("feedforward", "llama.swiglu", "multiple_of"),
    ("attention", "llama.gqa", "num_kv_heads")])
@pytest.mark.parametrize("value", [10**12, 2**64, 0, True, "8"], ids=["1e12", "2^64", "zero", "true", "string"])
def test_the_llama_plugin_bounds_its_sizes_too(slot, component, param, value):
    pytest.importorskip("modelkit_llama")
    assert_refused_everywhere({**BASE, slot: {"type": component, param: value}}, f"{slot}.{param}: ")
