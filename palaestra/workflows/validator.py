"""Static checks on a policy-written workflow, auto-repair of small faults, and the default fallback.

A workflow is Python code with one class::

    class Workflow:
        async def __call__(self, problem):
            solution = await AnswerGenerate(input=problem)
            return solution["answer"]

:func:`validate_workflow` reads the policy's completion (a fenced block or bare code) and checks,
on the AST, that it parses; that the module holds exactly one class ``Workflow``; that its
``__call__`` is ``async``, takes the problem and returns a value; that every call is to a known
operator with its real keyword arguments (or to one of a few safe builtins, or a method of the
class); and that there are no imports, no dunder names and no attribute access except the class's
own methods and a short list of string/list/dict methods. Those rules make the code safe to run
with globals that hold the operators only (:mod:`palaestra.workflows.execution`).

Small faults are repaired, each repair named in the result: code cut off at the token limit (the
last lines dropped until it parses), uniform extra indentation, a class with another name, imports,
code outside the class (example usage, prints), an ``__init__`` (operators are provided; what it
stored from its arguments reads the problem, its constants stay), AFlow-style ``self.custom(...)`` operator attributes and other spellings (``answer_generate``), a
misnamed argument of a one-argument operator, a missing ``async`` or ``await``, and a missing final
``return`` of the last assigned name. Code that
still fails a check is replaced by :data:`FALLBACK_WORKFLOWS` for its domain; the result says so,
and the reward never credits a fallback's answer to the policy.

A workflow in AFlow's own published form (``__init__(self, name, llm_config, dataset)`` building operators on
``self.llm``, prompts from ``prompt_custom``, the cost from ``self.llm.get_usage_summary()``) is translated as
written, not repaired (:mod:`palaestra.workflows.aflow_form`); ``UsageSummary()``, the run's executor usage, is
the one call besides the operators and the safe builtins.
"""

from __future__ import annotations

import ast
import copy
import re
import textwrap
from dataclasses import dataclass, field

from palaestra.workflows.aflow_form import USAGE_SUMMARY, from_aflow_form
from palaestra.workflows.operators import OPERATORS

__all__ = ["FALLBACK_WORKFLOWS", "SAFE_BUILTINS", "SAFE_METHODS", "ValidationResult", "extract_workflow_code",
           "validate_workflow"]

SAFE_BUILTINS = ("len", "str", "int", "float", "bool", "range", "min", "max", "sum", "sorted", "enumerate", "zip",
                 "list", "dict", "tuple", "set", "isinstance", "any", "all", "abs", "round", "reversed", "Exception",
                 "ValueError", "KeyError", "IndexError", "TypeError")
"""Builtins a workflow may call (the runner's restricted globals hold exactly these and the operators)."""
SAFE_METHODS = ("strip", "lower", "upper", "split", "join", "replace", "startswith", "endswith", "get", "append",
                "extend", "items", "keys", "values", "count", "format", "splitlines", "index", "find")
"""Methods of values (strings, lists, dicts) a workflow may call."""

_SNAKE = {re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower(): name for name in OPERATORS}
"""AFlow's attribute names -> operator: answer_generate -> AnswerGenerate, sc_ensemble -> ScEnsemble."""
_LOOSE = {name.lower(): name for name in OPERATORS}
"""Operator names without case or underscores: answergenerate -> AnswerGenerate."""
_FENCE = re.compile(r"```[a-zA-Z0-9]*\n(.*?)(?:```|\Z)", flags=re.DOTALL)

FALLBACK_WORKFLOWS = {
    "math": 'class Workflow:\n    async def __call__(self, problem):\n'
            '        solution = await AnswerGenerate(input=problem)\n        return solution["answer"]\n',
    "qa": 'class Workflow:\n    async def __call__(self, problem):\n'
          '        solution = await AnswerGenerate(input=problem)\n        return solution["answer"]\n',
    "code": 'class Workflow:\n    async def __call__(self, problem):\n'
            '        solution = await Custom(input=problem, instruction="Write a Python program that solves this. '
            'Reply with one ```python block.")\n        return solution["response"]\n',
}
"""The default workflow of each domain, run when the policy's code cannot be repaired."""


@dataclass
class ValidationResult:
    """What the validator made of one completion."""

    code: str
    """The code to run: the policy's (possibly repaired) workflow, or the domain's fallback."""
    parse_failed: bool = False
    """No parseable code could be found in the completion."""
    validation_failed: bool = False
    """The completion did not pass the checks as written (repaired or replaced)."""
    repaired: bool = False
    """Repairs made it pass; ``code`` is the repaired workflow."""
    fallback: bool = False
    """``code`` is the default workflow; its answer is not the policy's."""
    repairs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Why the checks failed (after repair, when it fell back)."""
    operators: set[str] = field(default_factory=set)
    """The operators the policy's workflow calls (empty for a fallback)."""
    dialect: str = "palaestra"
    """palaestra (the form above), or aflow: AFlow's published form, translated as written
    (:mod:`palaestra.workflows.aflow_form`; not a repair)."""

    @property
    def valid(self) -> bool:
        """The policy's own code passed every check without repair."""
        return not self.validation_failed


def extract_workflow_code(completion: str) -> str:
    """The code of a completion: the fenced block that defines a class, else from the first ``class`` line on."""
    blocks = [body for body in _FENCE.findall(completion or "") if "class " in body]
    if blocks:
        return blocks[-1]
    text = completion or ""
    start = text.find("class ")
    return text[start:] if start >= 0 else text


def validate_workflow(completion: str, domain: str, prompts: dict[str, str] | None = None) -> ValidationResult:
    """Check (and if needed repair) the workflow in ``completion``; fall back to the domain's default. A workflow in
    AFlow's published form is translated as it is (``prompts``: the texts of its ``prompt.py``)."""
    code = extract_workflow_code(completion)
    repairs: list[str] = []
    tree = _parse_with_repairs(code, repairs)
    if tree is None:
        return ValidationResult(FALLBACK_WORKFLOWS[domain], parse_failed=True, validation_failed=True, fallback=True,
                                repairs=repairs, errors=["does not parse"])
    aflow = None if repairs else from_aflow_form(copy.deepcopy(tree), domain, prompts or {})
    if aflow is not None and not _check(aflow):
        return ValidationResult(ast.unparse(aflow), operators=_operators(aflow), dialect="aflow")
    errors = _check(tree)
    if not errors and not repairs:
        return ValidationResult(ast.unparse(tree), operators=_operators(tree))
    tree = _repair(tree, repairs)
    ast.fix_missing_locations(tree)
    errors = _check(tree)
    if errors:
        return ValidationResult(FALLBACK_WORKFLOWS[domain], validation_failed=True, fallback=True, repairs=repairs,
                                errors=errors)
    return ValidationResult(ast.unparse(tree), validation_failed=True, repaired=True, repairs=repairs,
                            operators=_operators(tree))


# ------------------------------------------------------------------------------------ parsing


def _parse_with_repairs(code: str, repairs: list[str]) -> ast.Module | None:
    """Parse; else try dedenting, then dropping up to 6 trailing lines (a completion cut off mid-line)."""
    candidates = [(code, None), (textwrap.dedent(code), "dedented")]
    lines = code.rstrip().splitlines()
    candidates += [("\n".join(lines[:-cut]), f"dropped {cut} cut-off line(s)") for cut in range(1, min(6, len(lines) - 1) + 1)]
    for text, repair in candidates:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        if repair:
            repairs.append(repair)
        return tree
    return None


# ------------------------------------------------------------------------------------- checks


def _check(tree: ast.Module) -> list[str]:
    """Every rule the workflow breaks (empty: it may run)."""
    errors: list[str] = []
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    others = [node for node in tree.body if not isinstance(node, ast.ClassDef) and not _is_docstring(node)]
    if len(classes) != 1 or classes[0].name != "Workflow":
        return [f"needs exactly one class Workflow (found {[c.name for c in classes]})"]
    if others:
        errors.append(f"only the class may be at the top level (found {type(others[0]).__name__})")
    workflow = classes[0]
    if workflow.bases or workflow.keywords or workflow.decorator_list:
        errors.append("class Workflow takes no bases or decorators")
    methods = {node.name: node for node in workflow.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for node in workflow.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Pass)) and not _is_docstring(node):
            errors.append(f"class body may hold methods only (found {type(node).__name__})")
    call = methods.get("__call__")
    if call is None:
        return errors + ["Workflow has no __call__"]
    if not isinstance(call, ast.AsyncFunctionDef):
        errors.append("__call__ must be async")
    if len(call.args.args) < 2:
        errors.append("__call__ must take (self, problem)")
    if not any(isinstance(node, ast.Return) and node.value is not None for node in ast.walk(call)):
        errors.append("__call__ never returns a value")
    helpers = {name for name in methods if not name.startswith("__")}
    for name, method in methods.items():
        if name.startswith("__") and name != "__call__":
            errors.append(f"method {name} is not allowed")
        if method.decorator_list:
            errors.append(f"method {name} may not have decorators")
    for node in ast.walk(workflow):
        errors.extend(_check_node(node, helpers))
    return list(dict.fromkeys(errors))


def _check_node(node: ast.AST, helpers: set[str]) -> list[str]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return ["imports are not allowed"]
    if isinstance(node, (ast.Global, ast.Nonlocal, ast.Yield, ast.YieldFrom, ast.ClassDef)) and not (
            isinstance(node, ast.ClassDef) and node.name == "Workflow"):
        return [f"{type(node).__name__} is not allowed"]
    if isinstance(node, ast.Name):
        if node.id.startswith("__"):
            return [f"dunder name {node.id} is not allowed"]
        if node.id in _FORBIDDEN_BUILTINS:
            return [f"builtin {node.id} is not allowed"]
    if isinstance(node, ast.Attribute):
        if node.attr.startswith("__"):
            return [f"dunder attribute {node.attr} is not allowed"]
        is_helper = isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in helpers
        if not is_helper and node.attr not in SAFE_METHODS:
            return [f"attribute access .{node.attr} is not allowed"]
    if isinstance(node, ast.Call):
        return _check_call(node, helpers)
    return []


def _check_call(node: ast.Call, helpers: set[str]) -> list[str]:
    func = node.func
    if isinstance(func, ast.Attribute):
        return []  # a helper method or a safe method, checked as an attribute
    if not isinstance(func, ast.Name):
        return ["calls must be to a name"]
    if func.id in SAFE_BUILTINS or func.id == USAGE_SUMMARY:
        return []
    spec = OPERATORS.get(func.id)
    if spec is None:
        return [f"unknown function {func.id}"]
    errors = []
    if any(isinstance(arg, ast.Starred) for arg in node.args) or any(k.arg is None for k in node.keywords):
        return [f"{func.id} must be called with explicit arguments"]
    if len(node.args) > len(spec.params):
        errors.append(f"{func.id} takes at most {len(spec.params)} arguments")
    given = set(spec.params[: len(node.args)])
    for keyword in node.keywords:
        if keyword.arg not in spec.params:
            errors.append(f"{func.id} has no argument {keyword.arg!r} (it takes {', '.join(spec.params)})")
        given.add(keyword.arg)
    missing = [name for name in spec.required if name not in given]
    if missing:
        errors.append(f"{func.id} needs {', '.join(missing)}")
    return errors


_FORBIDDEN_BUILTINS = frozenset({"eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "globals", "locals",
                                 "vars", "dir", "type", "object", "input", "help", "breakpoint", "memoryview", "super",
                                 "classmethod", "staticmethod", "property"})


def _is_docstring(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _operators(tree: ast.Module) -> set[str]:
    return {node.func.id for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in OPERATORS}


# ------------------------------------------------------------------------------------ repairs


def _repair(tree: ast.Module, repairs: list[str]) -> ast.Module:
    """Fix the small faults listed in the module docstring, naming each one in ``repairs``."""
    body = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            _note(repairs, "removed imports")
        else:
            body.append(node)
    tree.body = body
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    if len(classes) == 1 and classes[0].name != "Workflow":
        _note(repairs, f"renamed class {classes[0].name} to Workflow")
        classes[0].name = "Workflow"
    if len(classes) == 1 and len(tree.body) > 1:  # example usage, helpers or prints around the class
        _note(repairs, "removed code outside the class")
        tree.body = [node for node in tree.body if node is classes[0] or _is_docstring(node)]
    for workflow in classes:
        if workflow.name != "Workflow":
            continue
        if workflow.bases:
            _note(repairs, "removed base classes")
            workflow.bases = []
        kept, init_values = [], {}
        for node in workflow.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "__init__":
                _note(repairs, "removed __init__ (operators are provided)")
                init_values = _init_values(node)
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                _note(repairs, "removed imports")
                continue
            if isinstance(node, ast.FunctionDef) and node.name == "__call__":
                _note(repairs, "made __call__ async")
                node = ast.AsyncFunctionDef(name=node.name, args=node.args, body=node.body, decorator_list=[],
                                            returns=node.returns, type_comment=None, type_params=[])
            kept.append(node)
        workflow.body = kept or [ast.Pass()]
        for node in ast.walk(workflow):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                node.body = [stmt for stmt in node.body if not isinstance(stmt, (ast.Import, ast.ImportFrom))] or [ast.Pass()]
        _OperatorAttributes(repairs).visit(workflow)
        call = next((n for n in workflow.body if isinstance(n, ast.AsyncFunctionDef) and n.name == "__call__"), None)
        if init_values and call is not None and len(call.args.args) >= 2:
            _InitAttributes(init_values, call.args.args[1].arg, repairs).visit(call)
        _AddAwait(repairs).visit(workflow)
        call = next((n for n in workflow.body if isinstance(n, ast.AsyncFunctionDef) and n.name == "__call__"), None)
        if call is not None and not any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(call)):
            last = call.body[-1]
            if isinstance(last, ast.Assign) and len(last.targets) == 1 and isinstance(last.targets[0], ast.Name):
                call.body.append(ast.Return(value=ast.Name(id=last.targets[0].id, ctx=ast.Load())))
                _note(repairs, f"added return {last.targets[0].id}")
    return tree


def _init_values(init: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, ast.expr | None]:
    """``self.x = <constant>`` and ``self.x = <an __init__ argument>`` of an ``__init__``: x -> the constant,
    or None for an argument (the model passing the problem to the constructor)."""
    arguments = {arg.arg for arg in init.args.args[1:]}
    values: dict[str, ast.expr | None] = {}
    for stmt in init.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                if isinstance(stmt.value, ast.Constant):
                    values[target.attr] = stmt.value
                elif isinstance(stmt.value, ast.Name) and stmt.value.id in arguments:
                    values[target.attr] = None
    return values


class _InitAttributes(ast.NodeTransformer):
    """In ``__call__``, ``self.x`` set by a removed ``__init__`` reads the constant, or the problem for an argument."""

    def __init__(self, values: dict, problem: str, repairs: list[str]):
        self.values, self.problem, self.repairs = values, problem, repairs

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:  # noqa: N802
        self.generic_visit(node)
        if (isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in self.values
                and isinstance(node.ctx, ast.Load)):
            _note(self.repairs, "replaced attributes set in __init__")
            value = self.values[node.attr]
            return ast.Name(id=self.problem, ctx=ast.Load()) if value is None else ast.Constant(value=value.value)
        return node


def _note(repairs: list[str], text: str) -> None:
    if text not in repairs:
        repairs.append(text)


class _OperatorAttributes(ast.NodeTransformer):
    """Operators called by another spelling, and one-argument operators with a misnamed argument.

    ``self.custom(...)`` / ``self.Custom(...)`` / ``operator.Custom(...)`` -> ``Custom(...)``;
    ``answer_generate(...)`` / ``answerGenerate(...)`` -> ``AnswerGenerate(...)``;
    ``AnswerGenerate(question=x)`` -> ``AnswerGenerate(input=x)``.
    """

    def __init__(self, repairs: list[str]):
        self.repairs = repairs

    def visit_Call(self, node: ast.Call) -> ast.AST:  # noqa: N802 - ast's naming
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            name = func.attr if func.attr in OPERATORS else _SNAKE.get(func.attr)
            if name is not None:
                _note(self.repairs, "operator attributes called by name")
                node.func = ast.Name(id=name, ctx=ast.Load())
        elif isinstance(func, ast.Name) and func.id not in OPERATORS:
            name = _LOOSE.get(func.id.replace("_", "").lower())
            if name is not None:
                _note(self.repairs, f"{func.id} spelled {name}")
                func.id = name
        if isinstance(node.func, ast.Name) and node.func.id in OPERATORS:
            params = OPERATORS[node.func.id].params
            if len(params) == 1 and not node.args and len(node.keywords) == 1 and node.keywords[0].arg not in (None, *params):
                _note(self.repairs, f"argument {node.keywords[0].arg} of {node.func.id} renamed {params[0]}")
                node.keywords[0].arg = params[0]
        return node


class _AddAwait(ast.NodeTransformer):
    """An operator call that is not awaited gets ``await`` (operators are coroutines)."""

    def __init__(self, repairs: list[str]):
        self.repairs = repairs

    def visit_Await(self, node: ast.Await) -> ast.AST:  # noqa: N802
        if isinstance(node.value, ast.Call):
            node.value.args = [self.visit(arg) for arg in node.value.args]
            for keyword in node.value.keywords:
                keyword.value = self.visit(keyword.value)
            return node
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:  # noqa: N802
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in OPERATORS:
            _note(self.repairs, "added await to operator calls")
            return ast.Await(value=node)
        return node
