"""Tools an agent calls: a name, a JSON schema of its arguments, and a function that returns text.

A tool is an ordinary Python function with type hints and a Google-style docstring; its JSON schema
(what a chat template shows the model) is built from them by ``transformers.utils.get_json_schema``,
the same schema Hugging Face chat templates take. ``agent.tools`` names the shipped ones or any
``package.module:function``:

- ``calculator``: exact arithmetic on integers and decimals (``+ - * / // % **`` and parentheses),
  evaluated from the expression's syntax tree, never by ``eval``;
- ``python``: a program run in palaestra's sandbox (:mod:`palaestra.sandbox`), its output returned;
- ``search``: the best passage of a palaestra RAG index folder (``agent.search_index``; by default
  the shipped index over Python's documentation, :mod:`palaestra.retrieval.docs_index`).

A tool's failure is never the run's: :func:`call_tool` returns an error text for the model to read
(bad arguments, an exception, a call past ``timeout_s``).
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, DivisionByZero, InvalidOperation, localcontext

from palaestra.config.errors import ConfigError

__all__ = ["SHIPPED_TOOLS", "Tool", "ToolResult", "calculator", "call_tool", "resolve_tools", "search_tool", "tool_from_function"]


@dataclass(frozen=True)
class Tool:
    """One callable tool."""

    name: str
    """What the model calls it by."""
    description: str
    """One line on what it does (the docstring's first paragraph)."""
    parameters: dict
    """The JSON schema of its keyword arguments (``{"type": "object", "properties": ..., "required": ...}``)."""
    function: Callable[..., object]
    """Called with the arguments as keywords; its return value, as text, is the result."""

    @property
    def schema(self) -> dict:
        """The OpenAI / Hugging Face function description a chat template's ``tools=`` takes."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    @property
    def main_parameter(self) -> str | None:
        """The one required argument a plain-text call fills (the plain tool format), or None."""
        required = self.parameters.get("required", [])
        return required[0] if len(required) == 1 else None


@dataclass(frozen=True)
class ToolResult:
    """What one call gave: the text shown to the model, and whether the call succeeded."""

    text: str
    ok: bool


def tool_from_function(function: Callable, name: str | None = None) -> Tool:
    """A :class:`Tool` from a typed function with a Google-style docstring (an ``Args:`` section for every argument).

    A function whose schema cannot be built is a one-line ConfigError saying what its docstring or hints lack.
    """
    from transformers.utils import get_json_schema

    label = name or getattr(function, "__name__", repr(function))
    try:
        schema = get_json_schema(function)["function"]
    except Exception as error:  # transformers raises its own types for a missing docstring / hint / Args entry
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"tool {label!r}: its JSON schema cannot be built ({message}); give the function type hints "
                          "and a Google-style docstring with an Args: line per argument") from None
    return Tool(name or schema["name"], schema.get("description", ""), schema["parameters"], function)


def call_tool(tool: Tool, arguments: dict, timeout_s: float, max_chars: int = 2000) -> ToolResult:
    """Run ``tool`` on ``arguments`` in a worker thread for at most ``timeout_s`` seconds; the result as text (cut to
    ``max_chars``), or an error text: unknown or missing arguments, an exception, a timeout. A call that overruns
    is abandoned (its thread finishes on its own; the shipped tools bound their own time)."""
    known = set(tool.parameters.get("properties", {}))
    unknown = sorted(set(arguments) - known)
    missing = sorted(set(tool.parameters.get("required", [])) - set(arguments))
    if unknown or missing:
        problem = f"unknown argument(s) {', '.join(unknown)}" if unknown else f"missing argument(s) {', '.join(missing)}"
        return ToolResult(f"error: {problem}; {tool.name} takes {', '.join(sorted(known)) or 'no arguments'}", False)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tool-{tool.name}")
    try:
        value = pool.submit(tool.function, **arguments).result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        return ToolResult(f"error: {tool.name} took longer than {timeout_s:g} s", False)
    except Exception as error:  # the tool's failure is the model's to read, not the run's
        return ToolResult(f"error: {type(error).__name__}: {str(error)[:200]}", False)
    finally:
        pool.shutdown(wait=False)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return ToolResult(text if len(text) <= max_chars else text[:max_chars] + " ...", True)


# ------------------------------------------------------------------------------------------ shipped tools

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def calculator(expression: str) -> str:
    """Compute an arithmetic expression exactly.

    Args:
        expression: Numbers with + - * / // % ** and parentheses.
    """
    tree = ast.parse(expression.replace("^", "**").replace("×", "*").replace(",", ""), mode="eval")

    def value(node) -> Decimal:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return Decimal(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 512 or abs(left) > 10 ** 12 and abs(right) > 2):
                raise ValueError("the power is too large")
            return _OPERATORS[type(node.op)](left, right)
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")

    with localcontext() as context:
        context.prec = 60
        try:
            result = value(tree.body)
        except (DivisionByZero, InvalidOperation, ZeroDivisionError):
            raise ValueError("division by zero") from None
    if result == result.to_integral_value():
        return str(int(result))
    return format(result.normalize(), "f")


def python(code: str) -> str:
    """Run a Python program in a sandbox and return what it prints.

    Args:
        code: The program; print the values you need.
    """
    from palaestra.sandbox import run_python

    result = run_python(code)
    output = (result.stdout or "") + (("\n" + result.stderr[-500:]) if not result.ok and result.stderr else "")
    return output.strip() or ("(no output)" if result.ok else "error: the program failed")


def search_tool(index_folder: str | None = None) -> Callable[[str], str]:
    """The ``search`` tool over the RAG index in ``index_folder`` (None: the shipped Python-docs index)."""

    def search(query: str) -> str:
        """Search the documentation and return the best passage.

        Args:
            query: What to look for, in a few words.
        """
        from palaestra.retrieval.docs_index import search_docs

        return search_docs(_load_index(index_folder), query, k=1)  # one passage: short enough for a small model to read

    return search


_INDEXES: dict = {}


def _load_index(folder: str | None):
    """A RAG index folder, loaded once per process (None: the shipped Python-docs index)."""
    if folder not in _INDEXES:
        from palaestra.retrieval.docs_index import shipped_docs_index
        from palaestra.retrieval.index import RetrievalIndex

        _INDEXES[folder] = RetrievalIndex.load(folder or shipped_docs_index())
    return _INDEXES[folder]


SHIPPED_TOOLS = ("calculator", "python", "search")
"""The tools ``agent.tools`` names without a module path."""


def resolve_tools(names: list[str], search_index: str | None = None) -> list[Tool]:
    """The tools ``names`` lists: shipped names or ``package.module:function``; a bad name is a one-line ConfigError."""
    tools = []
    for name in names:
        if name == "calculator":
            tools.append(tool_from_function(calculator))
        elif name == "python":
            tools.append(tool_from_function(python))
        elif name == "search":
            from palaestra.retrieval.index import IndexError_

            try:
                _load_index(search_index)  # a folder that holds no index is one line now, not an error at every search
            except IndexError_ as error:
                raise ConfigError(f"agent.search_index={search_index}: {str(error).splitlines()[0]}") from None
            tools.append(tool_from_function(search_tool(search_index)))
        elif ":" not in name:
            raise ConfigError(f"agent.tools: {name!r} is not a tool; use {', '.join(SHIPPED_TOOLS)} or package.module:function")
        else:
            from palaestra.plugins import lookup

            try:
                function = lookup(name, {}, "agent.tools entry")
            except ValueError as error:
                raise ConfigError(str(error).split("; use")[0]) from None
            tools.append(tool_from_function(function, name=name.rsplit(":", 1)[1]))
    names_seen = [tool.name for tool in tools]
    duplicated = sorted({n for n in names_seen if names_seen.count(n) > 1})
    if duplicated:
        raise ConfigError(f"agent.tools names {', '.join(duplicated)} twice; give each tool once")
    return tools
