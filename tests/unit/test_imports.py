"""Every module of palaestra imports alone in a fresh interpreter, and the package has no import circle:
nothing below the recipes imports a recipe or a command module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "palaestra"
MODULES = sorted(".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                 for path in PACKAGE.rglob("*.py"))
COMMANDS = ("palaestra.cli", "palaestra.jobs", "palaestra.pipeline", "palaestra.settings_reference", "palaestra.conf",
            "palaestra.evaluation.cli", "palaestra.registry.cli", "palaestra.planner.cli", "palaestra.serving.command")
"""Modules that run a command; with the recipes, the top of the import graph."""


def _imports(module: str) -> set[str]:
    """The palaestra modules ``module`` imports (at the top or inside a function), as the code says."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("palaestra"):
            for alias in node.names:  # "from palaestra import checkpoint" names a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("palaestra")}
    return {m for m in found if m in MODULES and m != module}


def _cycles() -> list[list[str]]:
    graph = {module: _imports(module) for module in MODULES}
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in MODULES:
        if module not in state:
            visit(module)
    return cycles


def test_no_import_circles():
    assert _cycles() == []


def test_nothing_below_the_recipes_imports_a_recipe_or_a_command():
    top = set(COMMANDS) | {m for m in MODULES if m.startswith("palaestra.recipes")}
    below = [m for m in MODULES if m not in top and m != "palaestra"]
    wrong = {m: sorted(_imports(m) & top) for m in below if _imports(m) & top}
    assert wrong == {}


def test_config_errors_is_a_leaf():
    assert _imports("palaestra.config.errors") == set() and _imports("palaestra.config.choices") == set()


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(4))
def test_every_module_imports_alone(chunk):
    def import_alone(module: str) -> str | None:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True)
        return f"{module}: {result.stderr.strip().splitlines()[-1]}" if result.returncode else None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # one fresh interpreter per module, a core each
        failures = [failure for failure in pool.map(import_alone, MODULES[chunk::4]) if failure]
    assert failures == []
