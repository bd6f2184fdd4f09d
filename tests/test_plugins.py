"""Third-party components through entry points: discovery, laziness, fault isolation, collisions.

Plugins here are real distributions on ``sys.path``: a ``<name>-<version>.dist-info`` folder with
METADATA and entry_points.txt beside a module, found by ``importlib.metadata`` like any installed
package (nothing is patched). In-process tests refresh the registries around each test; CLI and
laziness tests run a subprocess with PYTHONPATH.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from modelkit import KINDS, PluginError, RegistryError, SpecError, build_model, get_registry, load_spec, register
from modelkit.cli import main as cli_main
from modelkit.components.base import Norm

REPO = Path(__file__).resolve().parents[1]

TINY = {"vocab_size": 50, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0}

SCALENORM = '''
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from modelkit.components.base import Norm


class ScaleNorm(Norm):
    """ScaleNorm (Nguyen & Salazar 2019): g · x / max(||x||, eps), one learned scalar g."""

    def __init__(self, dims, *, eps: Annotated[float, Field(gt=0)] = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.tensor(float(dims.emb_dim) ** 0.5))

    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)
'''


def write_dist(root: Path, name: str, version: str, entry_points: dict[str, dict[str, str]],
               modules: dict[str, str] | None = None) -> Path:
    """Create an installed-looking distribution under ``root``: dist-info (METADATA, entry_points.txt) + modules."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines: list[str] = []
    for group, eps in entry_points.items():
        lines += [f"[{group}]", *(f"{k} = {v}" for k, v in eps.items()), ""]
    (info / "entry_points.txt").write_text("\n".join(lines))
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    return info


def refresh_all() -> None:
    for kind in KINDS:
        get_registry(kind).refresh()


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """A folder on sys.path to install temporary distributions into; registries refreshed around the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh_all()
    before = set(sys.modules)

    def install(name: str, version: str, entry_points: dict[str, dict[str, str]],
                modules: dict[str, str] | None = None) -> Path:
        info = write_dist(tmp_path, name, version, entry_points, modules)
        refresh_all()
        return info

    yield install
    for module in set(sys.modules) - before:
        if getattr(sys.modules[module], "__file__", None) and str(tmp_path) in str(sys.modules[module].__file__):
            del sys.modules[module]
    monkeypatch.undo()
    refresh_all()


def run_python(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)


def run_cli(args: list[str], pythonpath: Path) -> subprocess.CompletedProcess[str]:
    return run_python(f"import sys; from modelkit.cli import main; sys.exit(main({args!r}))", pythonpath)


GOOD = ("goodplug", "1.2.3", {"modelkit.norm": {"goodplug.scalenorm": "goodplug_norm:ScaleNorm"}},
        {"goodplug_norm": SCALENORM})
BROKEN_IMPORT = ("brokenplug", "0.3.1", {"modelkit.norm": {"brokenplug.norm": "brokenplug_norm:BrokenNorm"}},
                 {"brokenplug_norm": "import nonexistent_dependency_xyz\n"})


# -- discovery and laziness ---------------------------------------------------------------------------

def test_a_plugin_is_listed_without_import_and_imported_on_first_use(site: Callable[..., Path]) -> None:
    site(*GOOD)
    registry = get_registry("norm")
    assert "goodplug.scalenorm" in registry.names()
    assert "goodplug_norm" not in sys.modules
    spec = load_spec({**TINY, "norm": {"type": "goodplug.scalenorm", "eps": 1e-6}})
    assert "goodplug_norm" in sys.modules
    entry = registry.get("goodplug.scalenorm")
    assert (entry.distribution, entry.version, entry.origin) == ("goodplug", "1.2.3", "goodplug==1.2.3")
    assert entry.cls.__module__ == "goodplug_norm"
    assert spec.norm.params == {"eps": 1e-6}


def test_a_plugin_component_works_like_a_builtin(site: Callable[..., Path]) -> None:
    site(*GOOD)
    torch.manual_seed(0)
    model = build_model({**TINY, "norm": "goodplug.scalenorm"}).eval()
    norm = model.final_norm
    x = torch.randn(2, 3, 32)
    by_hand = (32 ** 0.5) * x / torch.sqrt((x * x).sum(-1, keepdim=True))
    torch.testing.assert_close(norm(x), by_hand)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 50)
    with pytest.raises(SpecError, match=r"norm\.eps"):
        load_spec({**TINY, "norm": {"type": "goodplug.scalenorm", "eps": -1}})


def test_a_plugin_parameter_of_another_json_type_is_refused_at_its_path(site: Callable[..., Path]) -> None:
    site(*GOOD)
    for value, given in (("1e-6", '"1e-6"'), (True, "true")):
        with pytest.raises(SpecError) as exc:
            load_spec({**TINY, "norm": {"type": "goodplug.scalenorm", "eps": value}})
        assert [str(issue) for issue in exc.value.issues] == [f"norm.eps: expected a number, got {given}"]
    assert load_spec({**TINY, "norm": {"type": "goodplug.scalenorm", "eps": 1}}).norm.params == {"eps": 1.0}


def test_builtin_only_spec_imports_no_plugin_code(tmp_path: Path) -> None:
    write_dist(tmp_path, *GOOD)
    result = run_python(textwrap.dedent("""
        import json, sys
        import modelkit
        after_import = sorted(m for m in sys.modules if m.startswith(("modelkit_llama", "goodplug")))
        spec = modelkit.load_spec({"vocab_size": 50, "context_length": 16, "emb_dim": 32, "n_heads": 4,
                                   "n_layers": 2, "norm": "layernorm", "positional": "sinusoidal"})
        modelkit.build_model(spec)
        names = modelkit.get_registry("norm").names()
        after_spec = sorted(m for m in sys.modules if m.startswith(("modelkit_llama", "goodplug")))
        modelkit.get_registry("norm").get("goodplug.scalenorm")
        after_use = sorted(m for m in sys.modules if m.startswith(("modelkit_llama", "goodplug")))
        print(json.dumps([after_import, after_spec, names, after_use]))
    """), pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    after_import, after_spec, names, after_use = json.loads(result.stdout)
    assert after_import == [] and after_spec == []
    assert "goodplug.scalenorm" in names  # its name was read from the metadata ...
    assert after_use == ["goodplug_norm"]  # ... its code only imported when asked for


# -- fault isolation -------------------------------------------------------------------------------------

def test_a_plugin_that_fails_to_import_names_dist_version_entry_point_and_cause(site: Callable[..., Path]) -> None:
    site(*GOOD)
    site(*BROKEN_IMPORT)
    registry = get_registry("norm")
    with pytest.raises(PluginError) as info:
        registry.get("brokenplug.norm")
    message = str(info.value)
    assert "brokenplug==0.3.1" in message
    assert "modelkit.norm: brokenplug.norm = brokenplug_norm:BrokenNorm" in message
    assert "ModuleNotFoundError: No module named 'nonexistent_dependency_xyz'" in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    with pytest.raises(PluginError, match="brokenplug==0.3.1"):  # the same error every time it is used
        registry.get("brokenplug.norm")
    # Everything else keeps working.
    assert registry.get("goodplug.scalenorm").origin == "goodplug==1.2.3"
    assert registry.get("layernorm").is_builtin
    entries, errors = registry.load_all()
    assert {"layernorm", "goodplug.scalenorm"} <= {e.name for e in entries}
    assert [e.name for e in errors] == ["brokenplug.norm"]


def test_a_spec_using_a_broken_plugin_reports_it_at_its_path_with_the_other_problems(
        site: Callable[..., Path]) -> None:
    site(*BROKEN_IMPORT)
    with pytest.raises(SpecError) as info:
        load_spec({**TINY, "n_layers": 0, "norm": "brokenplug.norm"})
    issues = {issue.path: issue.message for issue in info.value.issues}
    assert set(issues) == {"n_layers", "norm"}
    assert "brokenplug==0.3.1" in issues["norm"] and "nonexistent_dependency_xyz" in issues["norm"]


WRONG_OBJECTS = '''
from modelkit.components.base import Attention, Norm

def make_norm(dims):
    return None

class NotANorm(Attention):
    """An attention registered as a norm."""

class Unannotated(Norm):
    def __init__(self, dims, *, eps=1e-5):
        super().__init__()

class KwargsNorm(Norm):
    def __init__(self, dims, **options):
        super().__init__()

class TwoPositional(Norm):
    def __init__(self, dims, width):
        super().__init__()
'''


@pytest.mark.parametrize(("target", "reason"), [
    ("make_norm", "must be a subclass of modelkit.components.base.Norm"),
    ("NotANorm", "must be a subclass of modelkit.components.base.Norm"),
    ("Unannotated", "parameter 'eps' needs a type annotation"),
    ("KwargsNorm", "*args/**kwargs are not allowed"),
    ("TwoPositional", "takes (dims) positionally"),
    ("Missing", "AttributeError"),
])
def test_a_plugin_providing_an_unusable_object_is_refused_where_used(
        site: Callable[..., Path], target: str, reason: str) -> None:
    site("oddplug", "2.0", {"modelkit.norm": {"oddplug.norm": f"oddplug_objs:{target}"}},
         {"oddplug_objs": WRONG_OBJECTS})
    with pytest.raises(PluginError) as info:
        get_registry("norm").get("oddplug.norm")
    message = str(info.value)
    assert reason in message
    assert "oddplug==2.0" in message and f"oddplug.norm = oddplug_objs:{target}" in message
    assert get_registry("norm").get("layernorm").is_builtin


def test_unreadable_entry_point_metadata_of_one_distribution_spares_the_others(
        site: Callable[..., Path]) -> None:
    site(*GOOD)
    info = site("garbled", "0.1", {})
    (info / "entry_points.txt").write_text("[modelkit.norm]\nthis line has no equals sign\n")
    refresh_all()
    registry = get_registry("norm")
    assert registry.get("goodplug.scalenorm").origin == "goodplug==1.2.3"
    entries, errors = registry.load_all()
    assert "goodplug.scalenorm" in {e.name for e in entries}
    assert any("garbled==0.1" in str(e) and "entry_points.txt cannot be read" in str(e) for e in errors)


# -- names: namespaces and collisions -------------------------------------------------------------------

def test_two_distributions_claiming_one_name_is_an_error_naming_both(site: Callable[..., Path]) -> None:
    site("alpha-norms", "1.0", {"modelkit.norm": {"dup.norm": "alpha_norm:ScaleNorm"}}, {"alpha_norm": SCALENORM})
    site("beta-norms", "2.5", {"modelkit.norm": {"dup.norm": "beta_norm:ScaleNorm"}}, {"beta_norm": SCALENORM})
    with pytest.raises(PluginError) as info:
        get_registry("norm").get("dup.norm")
    message = str(info.value)
    assert "alpha-norms==1.0" in message and "beta-norms==2.5" in message
    assert "more than one distribution" in message
    assert "alpha_norm" not in sys.modules and "beta_norm" not in sys.modules  # no silent winner
    assert [e.name for e in get_registry("norm").load_all()[1]] == ["dup.norm"]


def test_a_plugin_claiming_a_bare_name_is_refused(site: Callable[..., Path]) -> None:
    site("squatter", "0.1", {"modelkit.norm": {"layernorm": "squat_norm:ScaleNorm",
                                               "scalenorm": "squat_norm:ScaleNorm"}},
         {"squat_norm": SCALENORM})
    registry = get_registry("norm")
    assert registry.get("layernorm").is_builtin  # the core keeps its name
    with pytest.raises(PluginError, match="bare names are reserved"):
        registry.get("scalenorm")
    errors = {e.name: str(e) for e in registry.load_all()[1]}
    assert set(errors) == {"layernorm", "scalenorm"}
    assert "squatter==0.1" in errors["layernorm"] and "refused" in errors["layernorm"]
    assert "squat_norm" not in sys.modules


def test_registering_at_runtime_a_name_a_plugin_provides_is_refused(site: Callable[..., Path]) -> None:
    site(*GOOD)

    class Mine(Norm):
        def __init__(self, dims: object) -> None:
            super().__init__()

    with pytest.raises(RegistryError, match=r"goodplug==1\.2\.3"):
        register("norm", "goodplug.scalenorm")(Mine)
    register("norm", "mine.norm")(Mine)
    try:
        assert get_registry("norm").get("mine.norm").cls is Mine
    finally:
        get_registry("norm").unregister("mine.norm")


def test_a_plugin_module_that_registers_itself_on_import_is_told_to_stop(site: Callable[..., Path]) -> None:
    source = SCALENORM + '\nfrom modelkit import register\nregister("norm", "selfreg.norm")(ScaleNorm)\n'
    site("selfreg", "1.0", {"modelkit.norm": {"selfreg.norm": "selfreg_norm:ScaleNorm"}}, {"selfreg_norm": source})
    with pytest.raises(PluginError, match="remove the register\\(\\) call"):
        get_registry("norm").get("selfreg.norm")


def test_refresh_finds_a_plugin_installed_while_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh_all()
    try:
        assert "late.norm" not in get_registry("norm").names()
        write_dist(tmp_path, "late", "1.0", {"modelkit.norm": {"late.norm": "late_norm:ScaleNorm"}},
                   {"late_norm": SCALENORM})
        get_registry("norm").refresh()
        assert get_registry("norm").get("late.norm").origin == "late==1.0"
    finally:
        sys.modules.pop("late_norm", None)
        monkeypatch.undo()
        refresh_all()
    assert "late.norm" not in get_registry("norm").names()


# -- the CLI lists broken plugins and still prints the rest ------------------------------------------------

def test_cli_components_and_schema_survive_a_broken_plugin(tmp_path: Path) -> None:
    write_dist(tmp_path, *GOOD)
    write_dist(tmp_path, *BROKEN_IMPORT)
    listing = run_cli(["components", "norm"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    good_at = listing.stdout.index("goodplug.scalenorm")
    assert "from goodplug==1.2.3" in listing.stdout[good_at:]
    assert "layernorm" in listing.stdout
    broken_at = listing.stdout.index("broken plugins")
    assert "brokenplug==0.3.1" in listing.stdout[broken_at:]
    assert "No module named 'nonexistent_dependency_xyz'" in listing.stdout[broken_at:]

    schema_run = run_cli(["schema"], tmp_path)
    assert schema_run.returncode == 0, schema_run.stderr
    schema = json.loads(schema_run.stdout)
    norm_names = schema["$defs"]["norm"]["anyOf"][0]["enum"]
    assert "goodplug.scalenorm" in norm_names and "layernorm" in norm_names
    assert "brokenplug.norm" not in norm_names
    assert "left out a broken plugin" in schema_run.stderr and "brokenplug==0.3.1" in schema_run.stderr


# -- the real plugin, installed with pip -------------------------------------------------------------------

LLAMA_PARTS = {"llama.rmsnorm": "norm", "llama.swiglu": "feedforward", "llama.rope": "positional",
               "llama.alibi": "positional", "llama.gqa": "attention"}


def _llama_version() -> str:
    try:
        return importlib.metadata.version("modelkit-llama")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("modelkit-llama is not installed (pip install ./plugins/modelkit-llama)")


def test_installed_llama_plugin_is_listed_with_its_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    version = _llama_version()
    assert cli_main(["components", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for name, kind in LLAMA_PARTS.items():
        (entry,) = [c for c in report["components"][kind] if c["name"] == name]
        assert entry["origin"] == f"modelkit-llama=={version}"
    assert not [b for b in report["broken"] if "llama" in b]


def test_info_builds_the_llama_style_config(capsys: pytest.CaptureFixture[str]) -> None:
    _llama_version()
    assert cli_main(["info", str(REPO / "configs" / "llama-style.json"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # By hand: tied 50257x768 embedding; per block: q and out 768x768, k and v 768x256 (4 of 12 heads),
    # SwiGLU 3 x 768x2048, two RMSNorm weights of 768; a final RMSNorm; no biases, no position table.
    emb, d, kv, hidden, layers = 50257 * 768, 768, 256, 2048, 12
    block = 2 * d * d + 2 * d * kv + 3 * d * hidden + 2 * d
    assert info["parameters"] == emb + layers * block + d == 114_114_048
    assert info["tied_embeddings"] is True


# -- runtime modules: a plugin's optional fast paths ----------------------------------------------------

RUNTIME_MODULE = """
from modelkit.runtime.steps import register_step
from goodplug_norm import ScaleNorm

STEPS_BUILT = []

@register_step(ScaleNorm)
def scalenorm_step(norm):
    STEPS_BUILT.append(norm)
    return lambda x: norm(x)
"""

CHECK_RUNTIME = """
import warnings, torch
from modelkit import build_model, generate
from modelkit.runtime.steps import step_of
torch.manual_seed(0)
spec = {"vocab_size": 50, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
        "drop_rate": 0.0, "qkv_bias": False, "norm": "goodplug.scalenorm"}
model = build_model(spec).eval()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tokens = generate(model, torch.tensor([[1, 2, 3]]), 4)
print("tokens", tokens.shape[1])
print("warnings", [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
import sys
print("registered", "goodplug_runtime" in sys.modules and len(sys.modules["goodplug_runtime"].STEPS_BUILT) > 0)
"""


def test_a_plugins_runtime_module_is_loaded_through_its_entry_point(tmp_path: Path) -> None:
    name, version, eps, modules = GOOD
    write_dist(tmp_path, name, version, {**eps, "modelkit.runtime": {"goodplug": "goodplug_runtime"}},
               {**modules, "goodplug_runtime": RUNTIME_MODULE})
    done = run_python(CHECK_RUNTIME, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tokens 7" in done.stdout and "registered True" in done.stdout and "warnings []" in done.stdout


def test_a_runtime_module_that_fails_to_import_warns_and_the_components_still_run(tmp_path: Path) -> None:
    name, version, eps, modules = GOOD
    write_dist(tmp_path, name, version, {**eps, "modelkit.runtime": {"goodplug": "goodplug_runtime"}},
               {**modules, "goodplug_runtime": "import nonexistent_dependency_xyz\n"})
    done = run_python(CHECK_RUNTIME, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tokens 7" in done.stdout and "registered False" in done.stdout
    assert "runtime plugin 'goodplug' (goodplug_runtime) failed to import" in done.stdout
    assert "nonexistent_dependency_xyz" in done.stdout


# -- a plugin cannot end the process -----------------------------------------------------------------------

EXITS = ("exitplug", "0.1", {"modelkit.norm": {"exitplug.norm": "exitplug_norm:Norm"}},
         {"exitplug_norm": "import sys\nsys.exit(3)\n"})


ABORTS = ("abortplug", "0.2", {"modelkit.norm": {"abortplug.norm": "abortplug_norm:Norm"}},
          {"abortplug_norm": "class Abort(BaseException):  # neither an Exception nor a KeyboardInterrupt\n"
                              "    pass\nraise Abort('gave up at import')\n"})


@pytest.mark.parametrize(("plugin", "reason"), [
    (EXITS, "SystemExit: the module called sys.exit(3) while being imported"),
    (ABORTS, "Abort: gave up at import"),
])
def test_a_plugin_that_exits_or_raises_a_base_exception_at_import_is_a_broken_plugin(
        site: Callable[..., Path], capsys: pytest.CaptureFixture[str], plugin: tuple, reason: str) -> None:
    site(*GOOD)
    site(*plugin)
    name, version, eps = plugin[0], plugin[1], plugin[2]
    (entry_name,) = eps["modelkit.norm"]
    assert cli_main(["components", "norm"]) == 0  # the process goes on, and exits normally
    out = capsys.readouterr().out
    broken = out[out.index("broken plugins"):]
    assert f"{name}=={version}" in broken and reason in broken
    assert "goodplug.scalenorm" in out[:out.index("broken plugins")]
    with pytest.raises(SpecError) as info:  # a spec names it: reported at its path, cause a PluginError
        build_model({**TINY, "norm": entry_name})
    assert [issue.path for issue in info.value.issues] == ["norm"]
    assert f"{name}=={version}" in str(info.value) and reason in str(info.value)
    with pytest.raises(PluginError, match=re.escape(reason)):
        get_registry("norm").get(entry_name)


def test_a_keyboard_interrupt_while_importing_a_plugin_still_interrupts(site: Callable[..., Path]) -> None:
    site("ctrlcplug", "1.0", {"modelkit.norm": {"ctrlcplug.norm": "ctrlcplug_norm:Norm"}},
         {"ctrlcplug_norm": "raise KeyboardInterrupt\n"})
    with pytest.raises(KeyboardInterrupt):
        get_registry("norm").get("ctrlcplug.norm")


def test_a_runtime_module_that_calls_sys_exit_warns_and_the_components_still_run(tmp_path: Path) -> None:
    name, version, eps, modules = GOOD
    write_dist(tmp_path, name, version, {**eps, "modelkit.runtime": {"goodplug": "goodplug_runtime"}},
               {**modules, "goodplug_runtime": "import sys\nsys.exit(3)\n"})
    done = run_python(CHECK_RUNTIME, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tokens 7" in done.stdout and "registered False" in done.stdout
    assert "runtime plugin 'goodplug' (goodplug_runtime) failed to import" in done.stdout
    assert "sys.exit(3)" in done.stdout
