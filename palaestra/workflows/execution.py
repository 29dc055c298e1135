"""Running one policy-written workflow: its validated code with the operators bound to an executor client, under
a budget of lines and a timeout, its return value read as an answer.

:func:`execute` is what :class:`palaestra.workflows.runner.WorkflowRunner` runs for every workflow, in the
trainer's process (``isolation="none"``) or in a process of the workflow's own
(:mod:`palaestra.workflows.isolation`). The code runs with restricted globals, whose builtins are only
:data:`~palaestra.workflows.validator.SAFE_BUILTINS` and whose names are only the operators bound to this run.

A workflow that raises, times out, exceeds its budget or returns nothing has a runtime error and no answer.
Code that never awaits (``while True: pass``) cannot be stopped by an asyncio timeout and would stall every
other workflow of its loop, so the workflow's own code also has a budget of :data:`MAX_LINES` executed lines: a
trace hook (:func:`traced_workflow_lines`) counts the lines of workflow code (and only those: other frames are
not traced, and the executor's model runs with tracing off), and ``range`` is capped at :data:`MAX_RANGE`
items. A single huge C-level operation (``10 ** 10 ** 9``) is stopped only by its process's end.
"""

from __future__ import annotations

import asyncio
import builtins
import sys
from contextlib import contextmanager
from contextvars import ContextVar

from palaestra.workflows.aflow_form import USAGE_SUMMARY
from palaestra.workflows.executor import BudgetExceeded
from palaestra.workflows.operators import Problem, bind_operators
from palaestra.workflows.validator import SAFE_BUILTINS

__all__ = ["MAX_LINES", "MAX_RANGE", "WorkflowTimeout", "answer_text", "execute", "traced_workflow_lines"]

MAX_RANGE = 10_000
"""The most items a workflow's ``range`` may have."""
MAX_LINES = 100_000
"""The most lines of its own code a workflow may execute (operators' work not counted)."""
_FILENAME = "<workflow>"
_LINES_LEFT: ContextVar[list] = ContextVar("workflow_lines_left")


def answer_text(value) -> str:
    """A workflow's return value as text: AFlow's ``(answer, cost)`` keeps the answer, an operator's dict its
    answer/response/solution/output field.

    >>> answer_text(("42", 0.01)), answer_text({"response": "Paris"}), answer_text(None)
    ('42', 'Paris', '')
    """
    if isinstance(value, tuple) and value:
        value = value[0]
    if isinstance(value, dict):
        for key in ("answer", "response", "solution", "output", "code"):
            if key in value:
                value = value[key]
                break
    return "" if value is None else str(value)


def _reported_cost(value) -> float | None:
    """The cost in AFlow's ``(answer, cost)`` return value, or None."""
    if isinstance(value, tuple) and len(value) > 1 and isinstance(value[1], (int, float)) and not isinstance(value[1], bool):
        return float(value[1])
    return None




async def execute(code: str, problem: Problem, client, *, timeout_s: float, max_lines: int = MAX_LINES,
                  sandbox_seconds: float = 5.0) -> tuple[str, float | None, str]:
    """Run validated workflow ``code`` on ``problem`` with operators bound to ``client`` (an executor client, or
    an isolated process's pipe client): (answer, the cost it reported or None, runtime error or ""). Its lines
    are counted where :func:`traced_workflow_lines` is on."""
    _LINES_LEFT.set([max_lines])  # this task's own context: other workflows keep theirs
    answer, error, cost = "", "", None
    try:
        operators = bind_operators(client, problem, sandbox_seconds=sandbox_seconds)
        workflow = _instantiate(code, {**operators, USAGE_SUMMARY: client.usage})
        value = await asyncio.wait_for(workflow(problem.question), timeout_s)
        answer, cost = answer_text(value), _reported_cost(value)
        if not answer.strip():
            error = "returned no answer"
    except asyncio.TimeoutError:
        error = f"timed out after {timeout_s:g} s"
    except WorkflowTimeout as exc:
        error = str(exc)
    except BudgetExceeded as exc:
        error = f"budget: {exc}"
    except MemoryError:
        error = "MemoryError: the workflow ran out of memory"
    except Exception as exc:  # noqa: BLE001 - anything the policy's code does wrong is its runtime error
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return answer, cost, error


@contextmanager
def traced_workflow_lines():
    """Count the lines workflow code executes (and only those) while the block runs."""
    previous = sys.gettrace()
    sys.settrace(_trace_calls)
    try:
        yield
    finally:
        sys.settrace(previous)


class WorkflowTimeout(Exception):
    """Raised inside workflow code that runs more than its budget of lines."""


def _trace_calls(frame, event, arg):
    """The global trace hook while workflows run: trace lines of workflow code only."""
    return _trace_lines if frame.f_code.co_filename == _FILENAME else None


def _trace_lines(frame, event, arg):
    if event == "line":
        left = _LINES_LEFT.get(None)
        if left is not None:
            left[0] -= 1
            if left[0] < 0:
                raise WorkflowTimeout("ran more than its budget of lines of its own code")
    return _trace_lines


def _bounded_range(*args):
    """``range`` with at most :data:`MAX_RANGE` items."""
    values = range(*args)
    if len(values) > MAX_RANGE:
        raise ValueError(f"range of {len(values)} items; workflows may use at most {MAX_RANGE}")
    return values


def _instantiate(code: str, operators: dict):
    """Execute validated workflow code with the operators and safe builtins only; return a Workflow()."""
    allowed = {name: getattr(builtins, name) for name in SAFE_BUILTINS}
    allowed["range"] = _bounded_range
    allowed["__build_class__"] = builtins.__build_class__  # what a class statement calls
    namespace = {"__builtins__": allowed, "__name__": "workflow", **operators}
    exec(compile(code, _FILENAME, "exec"), namespace)  # noqa: S102 - validated code, restricted globals
    return namespace["Workflow"]()
