"""Run many policy-written workflows at once, isolated, each with its own budget and timeout.

:meth:`WorkflowRunner.run` takes a step's completions and problems, validates each workflow
(:mod:`palaestra.workflows.validator`), and runs them all concurrently in one asyncio loop, so that
their executor calls are batched (:class:`palaestra.workflows.executor.Executor`).

Isolation: the validated code is executed with restricted globals, whose builtins are only
:data:`~palaestra.workflows.validator.SAFE_BUILTINS` and whose names are only the operators bound to
this run; the validator has already ruled out imports, dunders and attribute access, so the code
can reach nothing else. With ``isolation="process"`` (the default) each workflow also runs in a process
of its own, under a memory limit and killed at its timeout (:mod:`palaestra.workflows.isolation`); its
executor calls still come here to be batched. Model-written *solution* code (Programmer, Test, the code reward) never runs
here: it goes to :func:`palaestra.sandbox.run_python`.

A workflow that raises, times out, exceeds its budget or returns nothing has a runtime error and
no answer. Code that never awaits (``while True: pass``) cannot be stopped by an asyncio timeout and
would stall every other workflow, so the workflow's own code also has a budget of
:data:`MAX_LINES` executed lines: a trace hook counts the lines of workflow code (and only those:
other frames are not traced, and the executor's model runs with tracing off), and ``range`` is capped
at :data:`MAX_RANGE` items. A single huge C-level operation (``10 ** 10 ** 9``) cannot be interrupted.
"""

from __future__ import annotations

import asyncio
import builtins
import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from palaestra.workflows.aflow_form import USAGE_SUMMARY
from palaestra.workflows.executor import BudgetExceeded, Executor
from palaestra.workflows.operators import Problem, bind_operators
from palaestra.workflows.validator import SAFE_BUILTINS, ValidationResult, validate_workflow

__all__ = ["ISOLATIONS", "MAX_RANGE", "WorkflowOutcome", "WorkflowRunner", "answer_text", "execute"]

ISOLATIONS = ("process", "none")

MAX_RANGE = 10_000
"""The most items a workflow's ``range`` may have."""
MAX_LINES = 100_000
"""The most lines of its own code a workflow may execute (operators' work not counted)."""
_FILENAME = "<workflow>"
_LINES_LEFT: ContextVar[list] = ContextVar("workflow_lines_left")


@dataclass
class WorkflowOutcome:
    """What running one completion's workflow gave."""

    answer: str
    """The workflow's answer as text ("" after a runtime error)."""
    validation: ValidationResult
    runtime_error: str = ""
    """Why the run failed ("" when it returned an answer)."""
    calls: int = 0
    """Executor calls the workflow made (cache hits included)."""
    tokens: int = 0
    seconds: float = 0.0
    cost: float | None = None
    """The cost the workflow reported with its answer (AFlow's ``return answer, cost``), or None."""

    @property
    def credited(self) -> bool:
        """The answer is the policy's own: its workflow (maybe repaired) ran to the end."""
        return not self.validation.fallback and not self.runtime_error

    @property
    def kind(self) -> str:
        """One word for the eval shares: parse_failure, validation_failure, runtime_error, repaired or clean."""
        v = self.validation
        if v.parse_failed:
            return "parse_failure"
        if v.fallback:
            return "validation_failure"
        if self.runtime_error:
            return "runtime_error"
        return "repaired" if v.repaired else "clean"


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


class WorkflowRunner:
    """Validates and runs workflows on an :class:`Executor`, with a per-workflow budget and timeout."""

    def __init__(self, executor: Executor, *, max_calls: int = 8, max_tokens: int = 4096, timeout_s: float = 60.0,
                 sandbox_seconds: float = 5.0, max_lines: int = MAX_LINES, isolation: str = "process", memory_mb: int = 1024):
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        self.executor = executor
        self.max_lines = max_lines
        self.max_calls, self.max_tokens = max_calls, max_tokens
        self.timeout_s, self.sandbox_seconds = timeout_s, sandbox_seconds
        self.isolation, self.memory_mb = isolation, memory_mb

    def run(self, completions: list[str], problems: list[Problem], prompts: dict[str, str] | None = None) -> list[WorkflowOutcome]:
        """Outcomes of ``completions[i]`` run on ``problems[i]``, all concurrently (one asyncio loop); ``prompts``:
        the texts an AFlow workflow's ``prompt_custom.NAME`` reads (its ``prompt.py``)."""
        if len(completions) != len(problems):
            raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
        validations = [validate_workflow(text, problem.domain, prompts) for text, problem in zip(completions, problems)]
        if self.isolation == "process":  # each workflow traces its own lines in its own process
            return asyncio.run(self._run_all(validations, problems))
        with traced_workflow_lines():
            return asyncio.run(self._run_all(validations, problems))

    async def _run_all(self, validations: list[ValidationResult], problems: list[Problem]) -> list[WorkflowOutcome]:
        self.executor.reset_loop()
        return list(await asyncio.gather(*(self._run_one(v, p) for v, p in zip(validations, problems))))

    async def _run_one(self, validation: ValidationResult, problem: Problem) -> WorkflowOutcome:
        client = self.executor.client(max_calls=self.max_calls, max_tokens=self.max_tokens)
        start = time.monotonic()
        if self.isolation == "process":
            from palaestra.workflows.isolation import run_isolated

            answer, cost, error = await run_isolated(validation.code, problem, client, timeout_s=self.timeout_s,
                                                     memory_mb=self.memory_mb, max_lines=self.max_lines,
                                                     sandbox_seconds=self.sandbox_seconds)
        else:
            answer, cost, error = await execute(validation.code, problem, client, timeout_s=self.timeout_s,
                                                max_lines=self.max_lines, sandbox_seconds=self.sandbox_seconds)
        return WorkflowOutcome(answer if not error else "", validation, error, client.calls, client.tokens,
                               time.monotonic() - start, cost)


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
