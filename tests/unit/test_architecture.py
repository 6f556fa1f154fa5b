"""The layering the README promises, checked on the source: what runs on a TaskManager never
reaches for the tooling, and no two modules import each other in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protos", "udfs", "jobs", "modelserving")
SHIPPED = ("protos", "udfs", "jobs")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")
            if "__pycache__" not in p.parts and not p.name.endswith("_pb2.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere (functions included), as their longest
    known dotted name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def test_the_shipped_packages_never_import_the_tooling(graph):
    offending = sorted(f"{module} -> {target}" for module, targets in graph.items()
                       if module.split(".")[0] in SHIPPED
                       for target in targets if target.split(".")[0] == "modelserving")
    assert offending == []


def test_the_cli_does_not_import_the_benchmark(graph):
    assert not any(t.startswith("modelserving.bench") for m, ts in graph.items()
                   if m.startswith("modelserving.cli") for t in ts)


def test_no_import_circles(graph):
    """A package's ``__init__`` importing its own submodules is not a circle."""
    def edges(module):
        return {t for t in graph[module] if not module.startswith(t + ".")
                and not t.startswith(module + ".")}

    circles = []
    state: dict[str, int] = {}

    def visit(module, trail):
        state[module] = 1
        for target in sorted(edges(module)):
            if state.get(target) == 1:
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []
