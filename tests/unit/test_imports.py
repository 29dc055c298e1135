"""Every module of palaestra imports alone (no other palaestra module loaded first), and the package has no import circle:
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


# Imports each module named on its command line in a fork of one interpreter that has loaded only the heavy
# third-party packages (each child starts with no palaestra module loaded, as a fresh interpreter does, without
# paying torch's import again); prints one line per failure.
_FORK_IMPORTER = """
import importlib, os, sys
for heavy in ("numpy", "torch", "transformers", "peft", "safetensors", "omegaconf", "hydra", "mlflow"):
    try:
        importlib.import_module(heavy)
    except ImportError:
        pass
assert not any(name == "palaestra" or name.startswith("palaestra.") for name in sys.modules)
failures = []
for module in sys.argv[1:]:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            os._exit(0)
        except BaseException as error:
            os.write(write, f"{module}: {type(error).__name__}: {error}".encode()[:4000])
            os._exit(1)
    os.close(write)
    message = b""
    while chunk := os.read(read, 4096):
        message += chunk
    os.close(read)
    if os.waitpid(child, 0)[1]:
        failures.append(message.decode() or f"{module}: the import crashed")
print("\\n".join(failures))
"""


@pytest.mark.slow
def test_every_module_imports_alone():
    def import_each(modules: list[str]) -> list[str]:
        result = subprocess.run([sys.executable, "-c", _FORK_IMPORTER, *modules], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return [line for line in result.stdout.splitlines() if line]

    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:  # one forking interpreter per core
        failures = [failure for found in pool.map(import_each, [MODULES[i::workers] for i in range(workers)]) for failure in found]
    assert failures == []
