"""The project's imports point one way, read from the source with ``ast``.

Layers, lowest first: ``aipipe.schemas`` (the events and the formats others write),
``aipipe.producers`` (emitting), ``aipipe.infra`` (settings, logging, supervision, topics,
the read endpoint), ``aipipe.consumers`` (the sinks), ``aipipe.streams`` (admission and
generation, which read budgets from ``aipipe.consumers.costs.budgets``), and on top the
wiring: every other ``aipipe`` module (``infra/app``: the CLI, the runner, the workers per
role). A module imports its own layer or lower, never the wiring from below, and no import
cycle exists among the modules (imports inside functions count too). An import inside a
function states why on its line (``# deferred: <reason>``); it is for keeping a role light,
never for hiding a cycle.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("aipipe.schemas", "aipipe.producers", "aipipe.infra", "aipipe.consumers",
          "aipipe.streams")
WIRING = len(LAYERS)  # the rank of every other aipipe module
DEFERRED = re.compile(r"#\s*deferred:\s*\S")


@dataclass(frozen=True)
class Module:
    name: str
    source: str
    package: bool = False  # an __init__.py: relative imports resolve inside it


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    deferred: str | None  # the source line, for an import inside a function or class


def project_modules(root: Path = ROOT) -> dict[str, Module]:
    """Every module of the installed ``aipipe`` namespace, through pyproject's package-dir."""
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    # the longest folder wins: infra/app is `aipipe`, infra the `aipipe.infra` around it
    folders = sorted(mapping.items(), key=lambda item: -len(item[1]))
    modules: dict[str, Module] = {}
    # only the package folders are walked, not .venv nor .aipipe (Kafka's data dir, whose
    # topic folders come and go while other tests run: a walk there can fail mid-way)
    paths = {path for _, folder in folders for path in (root / folder).rglob("*.py")}
    for path in sorted(paths):
        relative = path.relative_to(root)
        for package, folder in folders:
            if Path(folder) in relative.parents:
                parts = relative.relative_to(folder).with_suffix("").parts
                is_package = parts[-1] == "__init__"
                name = ".".join((package, *(parts[:-1] if is_package else parts)))
                modules[name] = Module(name, path.read_text(), is_package)
                break
    return modules


def rank(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return index
    return WIRING


def _targets(node: ast.Import | ast.ImportFrom, module: Module,
             known: Mapping[str, Module]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:  # relative: from the module's own package upwards
        package = module.name.split(".")
        package = package if module.package else package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
        yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base


def _imports(node: ast.AST, nested: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom,
                                                                   bool]]:
    """Every import under ``node``, and whether it sits in a function or class body (an
    ``if`` or ``try`` at the top still runs when the module loads)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, nested
        inner = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
                           | ast.Lambda)
        yield from _imports(child, nested or inner)


def edges(modules: Mapping[str, Module]) -> list[Edge]:
    found: list[Edge] = []
    for module in modules.values():
        lines = module.source.splitlines()
        for node, nested in _imports(ast.parse(module.source)):
            for target in _targets(node, module, modules):
                if target in modules:
                    found.append(Edge(module.name, target, node.lineno,
                                      lines[node.lineno - 1] if nested else None))
    return found


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan, iterative: no recursion limit to meet
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def violations(modules: Mapping[str, Module]) -> list[str]:
    """Every broken rule, one sentence each (empty: the imports are in order)."""
    problems: list[str] = []
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for edge in edges(modules):
        graph[edge.importer].add(edge.imported)
        where = f"{edge.importer} (line {edge.line})"
        low, high = rank(edge.importer), rank(edge.imported)
        if high == WIRING and low < WIRING:
            problems.append(f"{where} imports the wiring module {edge.imported}; pass what "
                            "it needs in from the wiring instead")
        elif high > low:
            problems.append(f"{where} imports {edge.imported}, a layer above it "
                            f"({LAYERS[low]} is below {LAYERS[high]})")
        if edge.deferred is not None and not DEFERRED.search(edge.deferred):
            problems.append(f"{where} imports {edge.imported} inside a function without "
                            "'# deferred: <reason>' on the line; import it at the top")
    for component in cycles(graph):
        problems.append(f"import cycle among {', '.join(component)}")
    return problems


# -- the project -------------------------------------------------------------------------


def test_the_project_keeps_the_rules() -> None:
    modules = project_modules()
    assert {"aipipe.cli", "aipipe.schemas.events", "aipipe.infra.settings",
            "aipipe.streams.app"} <= set(modules)
    assert violations(modules) == []


def test_every_deferred_import_is_in_the_wiring() -> None:
    """The library has no deferred imports of its own modules: only the program picks
    what a role loads."""
    deferred = [f"{e.importer}:{e.line}" for e in edges(project_modules())
                if e.deferred is not None and rank(e.importer) < WIRING]
    assert deferred == []


# -- the checker, on small examples ------------------------------------------------------


def _modules(**sources: str) -> dict[str, Module]:
    return {name.replace("__", "."): Module(name.replace("__", "."), text)
            for name, text in sources.items()}


def test_a_clean_example_passes() -> None:
    modules = _modules(
        aipipe__schemas__events="import json\n",
        aipipe__producers__producer="from aipipe.schemas.events import x\n",
        aipipe__streams__app=(
            "from aipipe.producers import producer\n"
            "def f():\n"
            "    from aipipe.schemas.events import y  # deferred: keeps z out of role w\n"),
        aipipe__cli="from aipipe.streams.app import f\n",
    )
    modules["aipipe.producers"] = Module("aipipe.producers", "", package=True)
    assert violations(modules) == []


def test_a_cycle_fails() -> None:
    modules = _modules(
        aipipe__streams__a="import aipipe.streams.b\n",
        aipipe__streams__b="def f():\n    from aipipe.streams import a  # deferred: a reason\n",
        aipipe__streams__c="import aipipe.streams.a\n",
    )
    modules["aipipe.streams"] = Module("aipipe.streams", "", package=True)
    assert violations(modules) == ["import cycle among aipipe.streams.a, aipipe.streams.b"]


def test_the_library_importing_the_wiring_fails() -> None:
    modules = _modules(aipipe__infra__settings="import aipipe.runner\n", aipipe__runner="")
    assert violations(modules) == [
        "aipipe.infra.settings (line 1) imports the wiring module aipipe.runner; pass what "
        "it needs in from the wiring instead"]


@pytest.mark.parametrize(("importer", "imported"), [
    ("aipipe.schemas.events", "aipipe.producers.producer"),
    ("aipipe.producers.producer", "aipipe.streams.app"),
    ("aipipe.producers.producer", "aipipe.consumers.sink"),
    ("aipipe.infra.settings", "aipipe.streams.admission.params"),
    ("aipipe.consumers.sink", "aipipe.streams.admission.params"),
])
def test_an_upward_import_fails(importer: str, imported: str) -> None:
    modules = {importer: Module(importer, f"from {imported} import thing\n"),
               imported: Module(imported, "")}
    (problem,) = violations(modules)
    assert problem.startswith(f"{importer} (line 1) imports {imported}, a layer above it")


def test_a_relative_upward_import_fails() -> None:
    modules = {
        "aipipe.schemas": Module("aipipe.schemas", "from ..producers import producer\n",
                                 package=True),
        "aipipe.producers.producer": Module("aipipe.producers.producer", ""),
    }
    (problem,) = violations(modules)
    assert "imports aipipe.producers.producer, a layer above it" in problem


@pytest.mark.parametrize("line", [
    "    from aipipe.schemas.events import x\n",
    "    from aipipe.schemas.events import x  # deferred:\n",
    "    from aipipe.schemas.events import x  # because\n",
])
def test_a_function_local_import_without_its_reason_fails(line: str) -> None:
    modules = _modules(aipipe__schemas__events="",
                       aipipe__streams__app=f"class A:\n  def f(self):\n{line}")
    assert violations(modules) == [
        "aipipe.streams.app (line 3) imports aipipe.schemas.events inside a function "
        "without '# deferred: <reason>' on the line; import it at the top"]


def test_imports_under_if_or_try_at_the_top_are_not_deferred() -> None:
    modules = _modules(
        aipipe__schemas__events="",
        aipipe__streams__app=("try:\n    from aipipe.schemas.events import x\n"
                              "except ImportError:\n    pass\n"),
    )
    assert violations(modules) == []
