"""AFlow's own workflow files, run unchanged: a ``graph.py`` in the form AFlow publishes, with its ``prompt.py``.

AFlow writes each workflow as a module that imports its operator and prompt modules, builds an LLM and its
operators in ``__init__(self, name, llm_config, dataset)``, and returns the answer with the cost::

    import workspace.MATH.workflows.template.operator as operator
    import workspace.MATH.workflows.round_3.prompt as prompt_custom
    from metagpt.provider.llm_provider_registry import create_llm_instance

    class Workflow:
        def __init__(self, name: str, llm_config, dataset: DatasetType) -> None:
            self.name = name
            self.dataset = dataset
            self.llm = create_llm_instance(llm_config)
            self.custom = operator.Custom(self.llm)

        async def __call__(self, problem: str):
            solution = await self.custom(input=problem, instruction=prompt_custom.SOLVE_PROMPT)
            return solution["response"], self.llm.get_usage_summary()["total_cost"]

:func:`from_aflow_form` recognises exactly that form and translates it into palaestra's own workflow form,
which the validator checks and the runner runs with restricted globals:
- the imports and the ``DatasetType`` alias go;
- ``__init__`` goes, and each operator attribute it built (``self.custom = operator.Custom(self.llm)``) becomes
  the operator (``self.custom(...)`` -> ``Custom(...)``);
- ``prompt_custom.NAME`` becomes the text of ``NAME`` in ``prompt.py`` (read, never executed);
- ``self.llm.get_usage_summary()`` (and the older ``self.llm.cost_manager.total_cost``) becomes the run's real
  executor usage, ``UsageSummary()``: its ``total_cost`` is the executor's tokens at
  ``task.workflow.executor.cost_per_million_tokens``;
- ``self.name`` and ``self.dataset`` read the workflow's name and the AFlow dataset of the problem's domain.

Anything else in ``__init__``, or an attribute no operator was built for, is not AFlow's form. Such code goes
through the ordinary checks and repairs.
"""

from __future__ import annotations

import ast
from pathlib import Path

from palaestra.workflows.operators import OPERATORS

__all__ = ["AFLOW_DATASETS", "USAGE_SUMMARY", "from_aflow_form", "load_aflow_workflow", "read_prompts"]

USAGE_SUMMARY = "UsageSummary"
"""The name the runner binds to the workflow run's executor usage (AFlow's ``llm.get_usage_summary()``)."""
AFLOW_DATASETS = {"math": "MATH", "qa": "HotpotQA", "code": "HumanEval"}
"""The AFlow dataset a workflow's ``self.dataset`` names, by problem domain."""
_INIT_ARGUMENTS = 4  # self, name, llm_config, dataset


def read_prompts(path: str | Path) -> dict[str, str]:
    """The module-level text constants of an AFlow ``prompt.py`` (``NAME = \"\"\"...\"\"\"``), read, not executed."""
    prompts = {}
    for node in ast.parse(Path(path).read_text()).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            prompts[node.targets[0].id] = node.value.value
    return prompts


def load_aflow_workflow(path: str | Path) -> tuple[str, dict[str, str]]:
    """(the code of ``graph.py``, the prompts of the ``prompt.py`` beside it): ``path`` is the graph file or the
    folder that holds both, as AFlow writes them (``workflows/round_N/``)."""
    path = Path(path)
    graph = path / "graph.py" if path.is_dir() else path
    if not graph.is_file():
        raise FileNotFoundError(f"no AFlow workflow at {path} (expected graph.py)")
    prompt = graph.with_name("prompt.py")
    return graph.read_text(), (read_prompts(prompt) if prompt.is_file() else {})


def from_aflow_form(tree: ast.Module, domain: str, prompts: dict[str, str]) -> ast.Module | None:
    """palaestra's form of a module in AFlow's published form, or None when the module is not in that form."""
    workflow = _aflow_class(tree)
    if workflow is None:
        return None
    init = next(n for n in workflow.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    operators = _operator_attributes(init)
    if operators is None:
        return None
    constants = {"name": "Workflow", "dataset": AFLOW_DATASETS.get(domain, domain)}
    translated = _Translate(operators, prompts, constants)
    methods = [translated.visit(node) for node in workflow.body if node is not init and not _is_docstring(node)]
    if translated.unknown:
        return None
    module = ast.Module(body=[ast.ClassDef(name="Workflow", bases=[], keywords=[], body=methods or [ast.Pass()],
                                           decorator_list=[], type_params=[])], type_ignores=[])
    return ast.fix_missing_locations(module)


def _aflow_class(tree: ast.Module) -> ast.ClassDef | None:
    """The module's ``Workflow`` class when the rest of the module is imports, the ``DatasetType`` alias and
    docstrings, and the class has AFlow's ``__init__(self, name, llm_config, dataset)``; else None."""
    classes = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            classes.append(node)
        elif not (isinstance(node, (ast.Import, ast.ImportFrom)) or _is_docstring(node) or _is_type_alias(node)):
            return None
    if len(classes) != 1 or classes[0].name != "Workflow" or classes[0].bases or classes[0].decorator_list:
        return None
    init = [n for n in classes[0].body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    if len(init) != 1 or len(init[0].args.args) != _INIT_ARGUMENTS:
        return None
    return classes[0]


def _operator_attributes(init: ast.FunctionDef) -> dict[str, str] | None:
    """``self.<attribute>`` -> the operator ``__init__`` built for it, when every statement of ``__init__`` is one of
    AFlow's: keep the name and dataset, build the LLM (and its cost manager), build an operator on it."""
    _, name_arg, config_arg, dataset_arg = (arg.arg for arg in init.args.args)
    operators = {}
    for statement in init.body:
        if _is_docstring(statement) or isinstance(statement, ast.Pass):
            continue
        if not (isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None):
            return None
        target = statement.targets[0] if isinstance(statement, ast.Assign) else statement.target
        value = statement.value
        if isinstance(statement, ast.Assign) and len(statement.targets) != 1:
            return None
        if _is_self(target, "name") and isinstance(value, ast.Name) and value.id == name_arg:
            continue
        if _is_self(target, "dataset") and isinstance(value, ast.Name) and value.id == dataset_arg:
            continue
        if _is_self(target, "llm") and _calls(value, "create_llm_instance") and _only_name_argument(value, config_arg):
            continue
        if _is_llm_attribute(target, "cost_manager") and _calls(value, "CostManager"):
            continue
        if (isinstance(target, ast.Attribute) and _is_self(target, target.attr) and isinstance(value, ast.Call)
                and isinstance(value.func, ast.Attribute) and value.func.attr in OPERATORS
                and len(value.args) == 1 and not value.keywords and _is_self(value.args[0], "llm")):
            operators[target.attr] = value.func.attr
            continue
        return None
    return operators


class _Translate(ast.NodeTransformer):
    """The methods of an AFlow workflow in palaestra's form (see the module docstring); ``unknown`` is set when
    they read something AFlow's ``__init__`` did not build."""

    def __init__(self, operators: dict[str, str], prompts: dict[str, str], constants: dict[str, str]):
        self.operators, self.prompts, self.constants = operators, prompts, constants
        self.unknown = False

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:  # noqa: N802
        node.returns = None  # annotations name AFlow's types, which are not there
        for arg in node.args.args:
            arg.annotation = None
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815

    def visit_Call(self, node: ast.Call) -> ast.AST:  # noqa: N802
        # self.llm.get_usage_summary() -> UsageSummary()
        if isinstance(node.func, ast.Attribute) and node.func.attr == "get_usage_summary" and _is_self(node.func.value, "llm"):
            return ast.Call(func=ast.Name(id=USAGE_SUMMARY, ctx=ast.Load()), args=[], keywords=[])
        # self.custom(...) -> Custom(...)
        if isinstance(node.func, ast.Attribute) and _is_self(node.func, node.func.attr) and node.func.attr in self.operators:
            node.func = ast.Name(id=self.operators[node.func.attr], ctx=ast.Load())
        return self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:  # noqa: N802
        # prompt_custom.NAME -> its text
        if isinstance(node.value, ast.Name) and node.value.id == "prompt_custom":
            if node.attr not in self.prompts:
                self.unknown = True
                return node
            return ast.Constant(value=self.prompts[node.attr])
        # self.llm.cost_manager.total_cost -> UsageSummary()["total_cost"]
        if node.attr == "total_cost" and _is_llm_attribute(node.value, "cost_manager"):
            summary = ast.Call(func=ast.Name(id=USAGE_SUMMARY, ctx=ast.Load()), args=[], keywords=[])
            return ast.Subscript(value=summary, slice=ast.Constant(value="total_cost"), ctx=ast.Load())
        # self.name, self.dataset -> their values
        if _is_self(node, node.attr) and node.attr in self.constants and isinstance(node.ctx, ast.Load):
            return ast.Constant(value=self.constants[node.attr])
        return self.generic_visit(node)


def _is_self(node: ast.AST, attribute: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == attribute and isinstance(node.value, ast.Name)
            and node.value.id == "self")


def _is_llm_attribute(node: ast.AST, attribute: str) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == attribute and _is_self(node.value, "llm")


def _calls(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name


def _only_name_argument(node: ast.Call, name: str) -> bool:
    return len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Name) and node.args[0].id == name


def _is_docstring(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _is_type_alias(node: ast.AST) -> bool:
    """``DatasetType = Literal[...]``, as AFlow's graph files start."""
    return (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Subscript) and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "Literal")
