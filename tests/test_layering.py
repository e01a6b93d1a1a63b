"""The house rules of the import graph, read from the source (every ``import``, at any depth of a file):

- no import cycles among the modules of ``harness/`` and ``methods/``;
- ``harness/`` never imports a concrete method (``methods``);
- a method imports ``harness`` and its own package, never another method;
- the layers (``harness/<folder>/`` or ``harness/<file>.py``, ``methods/``) import one another without a loop,
  so each layer stands on the ones below it (``harness/run/``, the orchestrator, on everything it composes;
  nothing below imports it).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "methods")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.update(f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported(path, name, known) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), ignoring a module's import of its
    own package's ``__init__`` (a package re-exporting its modules is not a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if v.startswith(w + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_there_are_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    # the check above could pass by finding nothing at all: a known cycle must be found
    edges = {"harness.a": {"harness.b"}, "harness.b": {"harness.c"}, "harness.c": {"harness.a"}, "harness.d": {"harness"}}
    assert cycles(edges) == [["harness.a", "harness.b", "harness.c"]]


def test_harness_never_imports_a_method():
    offending = {m: sorted(i for i in imps if i.split(".")[0] == "methods")
                 for m, imps in graph().items() if m.split(".")[0] == "harness"}
    assert {m: i for m, i in offending.items() if i} == {}


def test_a_method_imports_only_harness_and_its_own_package():
    def own(name: str) -> str:
        return ".".join(name.split(".")[:2])  # methods.qllm.correction -> methods.qllm

    offending = {m: sorted(i for i in imps if i.split(".")[0] == "methods" and own(i) != own(m) and i != "methods")
                 for m, imps in graph().items() if m.split(".")[0] == "methods"}
    assert {m: i for m, i in offending.items() if i} == {}
    assert graph()["methods.rtn"] and all(i.split(".")[0] == "harness" for i in graph()["methods.rtn"])


def layer(module: str) -> str:
    """The layer a module belongs to: ``harness.run.executors.local`` -> ``harness.run``, ``methods.qllm.x`` -> ``methods``."""
    parts = module.split(".")
    return "methods" if parts[0] == "methods" else ".".join(parts[:2])


def layer_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, imports in graph().items():
        if module == "harness":  # the package's face re-exports; importing it is not a layer's dependency
            continue
        edges.setdefault(layer(module), set()).update(layer(i) for i in imports if i != "harness" and layer(i) != layer(module))
    return edges


def test_the_layers_import_each_other_without_a_loop():
    assert cycles(layer_graph()) == []


def test_the_orchestrator_is_imported_only_from_above_it():
    below = {src for src, dst in layer_graph().items() if "harness.run" in dst}
    assert below <= {"harness.api", "harness.bench", "harness.cli", "harness.report"}, below
