"""The package's layers point down: the model core imports nothing above it, the runtime only the core,
and no module imports another in a cycle but the registry's lazy loading of the built-in components.

Read from the source (every ``import`` and ``from ... import`` statement, at module level or inside a
function, except those under ``if TYPE_CHECKING:``), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import modelkit

PACKAGE = Path(modelkit.__file__).parent

#: The model core: registry, spec, builder, model, components, cache, errors, limits, sizing.
CORE = ("modelkit.errors", "modelkit.registry", "modelkit.spec", "modelkit.builder", "modelkit.model",
        "modelkit.cache", "modelkit.introspect", "modelkit.components", "modelkit.limits", "modelkit.sizing")
RUNTIME = ("modelkit.runtime",)


def in_group(module: str, group: tuple[str, ...]) -> bool:
    return any(module == g or module.startswith(g + ".") for g in group)


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modelkit modules ``name`` imports (a ``from x import y`` names ``x.y`` when that is a module)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports_of(name, path, set(names)) for name, path in names.items()}


def test_the_core_imports_only_the_core() -> None:
    graph = import_graph()
    wrong = sorted(f"{m} imports {d}" for m, deps in graph.items() if in_group(m, CORE)
                   for d in deps if not in_group(d, CORE))
    assert not wrong, "the model core must not import runtime, training, weights, CLI or tools:\n" + "\n".join(wrong)


def test_the_runtime_imports_only_the_core_and_itself() -> None:
    graph = import_graph()
    wrong = sorted(f"{m} imports {d}" for m, deps in graph.items() if in_group(m, RUNTIME)
                   for d in deps if not (in_group(d, CORE) or in_group(d, RUNTIME)))
    assert not wrong, "the runtime depends on the core only:\n" + "\n".join(wrong)


def test_no_module_imports_the_package_facade() -> None:
    graph = import_graph()
    assert not sorted(m for m, deps in graph.items() if "modelkit" in deps and m != "modelkit")


def test_no_import_cycles_but_the_registrys_lazy_loader() -> None:
    graph = import_graph()
    graph.pop("modelkit")  # the facade imports the public API; nothing imports it (tested above)
    # The one allowed cycle: the registry imports the built-in components lazily (inside a function),
    # and they import the registry to register themselves.
    graph["modelkit.registry"] = {d for d in graph["modelkit.registry"] if not in_group(d, ("modelkit.components",))}
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(sorted(c)) for c in cycles)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_check_sees_a_lazy_relative_import(tmp_path: Path) -> None:
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from ..runtime.steps import step_of\n")
    assert imports_of("modelkit.components.probe", path, set(module_names())) == {"modelkit.runtime.steps"}
