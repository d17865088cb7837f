"""The layout is the architecture: imports between adqueue's parts flow one way, and never in a circle.

Read from the source, not by importing: every import at module level, those under `if
TYPE_CHECKING:` included (an annotation-only cycle is still a cycle for a reader), counts; an
import inside a function is a deliberate, lazy one (torch only where a job computes) and does not.

    cli, web            -> runners, jobs -> store -> core
    runners             -> jobs + pipeline -> detectors -> data -> core
    workers (Celery)    -> runners
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "adqueue"

# What each part of adqueue may import at module level (besides itself).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "data": {"core"},
    "store": {"core", "migrations"},  # the schema's history: migrate.py finds the revisions there
    "detectors": {"core", "data"},
    "pipeline": {"core", "data", "detectors"},
    "jobs": {"core", "data", "store", "detectors"},
    "runners": {"core", "data", "store", "detectors", "jobs", "pipeline"},
    "web": {"core", "data", "store", "jobs"},
    "cli": {"core", "data", "store", "detectors", "jobs", "web"},
    "workers": {"core", "data", "store", "detectors", "jobs", "pipeline", "runners"},
    "migrations": {"store"},
    # The entry points.
    "launcher": {"core"},
    "__main__": {"launcher"},
    "__init__": set(),
}
CELERY_SIDE = {"celery", "kombu"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    """Every module of the package, the linked workers/ and migrations/ folders included (not the
    Alembic revisions, which Alembic loads by path)."""
    found = {}
    for folder, dirs, files in os.walk(PACKAGE, followlinks=True):  # rglob would not enter the links
        dirs[:] = sorted(d for d in dirs if d not in ("versions", "__pycache__"))
        for file in sorted(f for f in files if f.endswith(".py")):
            path = Path(folder) / file
            found[module_name(path)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(path: Path, name: str, is_package: bool) -> Iterable[tuple[str, bool]]:
    """(imported module or `module.attribute`, at module level) for every import in the file;
    imports under `if TYPE_CHECKING:` (and other module-level ifs and trys) count as module level."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    base = name.split(".") if is_package else name.split(".")[:-1]

    def visit(nodes: list[ast.stmt], top: bool) -> Iterable[tuple[str, bool]]:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, top
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    prefix = ".".join(base[: len(base) - node.level + 1])
                    module = f"{prefix}.{node.module}" if node.module else prefix
                else:
                    module = node.module or ""
                for alias in node.names:
                    yield f"{module}.{alias.name}", top
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from visit(node.body, False)
            elif isinstance(node, ast.ClassDef):
                yield from visit(node.body, top)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []):
                        yield from visit(child.body if isinstance(child, ast.ExceptHandler) else [child], top)

    yield from visit(tree.body, True)


def resolve(imported: str, modules: Mapping[str, Path]) -> str | None:
    """The adqueue module an import names (`from adqueue.x import y` is adqueue.x.y if that is a
    module, else adqueue.x); None for anything outside adqueue."""
    if not (imported == "adqueue" or imported.startswith("adqueue.")):
        return None
    while imported and imported not in modules:
        imported = imported.rpartition(".")[0]
    return imported or None


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imported, top in module_level_imports(path, name, path.name == "__init__.py"):
            target = resolve(imported, modules)
            if top and target is not None and target != name and not name.startswith(target + "."):
                edges.add(target)  # a package's __init__ is imported with any of its modules: not an edge
        graph[name] = edges
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def layering_violations(graph: Mapping[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if part(target) != part(source) and part(target) not in ALLOWED[part(source)]:
                bad.append(f"{source} imports {target}")
    return bad


def test_no_import_cycle_between_adqueue_modules() -> None:
    found = cycles(import_graph(sources()))
    assert not found, "import cycles (module level, TYPE_CHECKING included):\n" + "\n".join(map(" <-> ".join, found))


def test_imports_follow_the_layers() -> None:
    modules = sources()
    assert {part(name) for name in modules} <= set(ALLOWED), "a new part of adqueue: give it its place in ALLOWED"
    violations = layering_violations(import_graph(modules))
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_only_the_celery_side_imports_celery() -> None:
    modules = sources()
    offenders = [
        f"{name} imports {imported}"
        for name, path in modules.items() if part(name) != "workers"
        for imported, _ in module_level_imports(path, name, path.name == "__init__.py")
        if imported.split(".")[0] in CELERY_SIDE
    ]
    assert not offenders, offenders


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    """The cycle finder and the layer check, on graphs made to fail them."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layering_violations({"adqueue.store.x": {"adqueue.jobs.y"}}) == ["adqueue.store.x imports adqueue.jobs.y"]
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from adqueue.jobs import ports\n"
                      "def f():\n    import adqueue.runners.shard\n")
    assert sorted(module_level_imports(source, "adqueue.store.m", False)) == [
        ("adqueue.jobs.ports", True), ("adqueue.runners.shard", False), ("typing.TYPE_CHECKING", True)]


@pytest.mark.parametrize("name", ["adqueue.workers", "adqueue.migrations"])
def test_workers_and_migrations_are_part_of_the_package(name: str) -> None:
    """The top-level folders workers/ and migrations/ are imported as adqueue.workers and
    adqueue.migrations (links in adqueue/), never as top-level names of their own."""
    assert name in sources()
    for path in sources().values():
        for imported, _ in module_level_imports(path, module_name(path), path.name == "__init__.py"):
            assert imported.split(".")[0] not in ("workers", "migrations"), f"{path} imports {imported}"
