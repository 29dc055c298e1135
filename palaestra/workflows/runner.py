"""Run many policy-written workflows at once, isolated, each with its own budget and timeout.

:meth:`WorkflowRunner.run` takes a step's completions and problems, validates each workflow
(:mod:`palaestra.workflows.validator`), and runs them all concurrently in one asyncio loop, so that
their executor calls are batched (:class:`palaestra.workflows.executor.Executor`). Each runs as
:func:`palaestra.workflows.execution.execute` runs it (restricted globals: the operators and safe builtins
only; a budget of lines, calls and tokens; a timeout), in a process of its own under a memory limit
(``isolation="process"``, the default: :mod:`palaestra.workflows.isolation`; its executor calls still come
here to be batched) or in this process (``isolation="none"``). Model-written *solution* code (Programmer,
Test, the code reward) runs in neither: it goes to :func:`palaestra.sandbox.run_python`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from palaestra.workflows.execution import MAX_LINES, execute, traced_workflow_lines
from palaestra.workflows.executor import Executor
from palaestra.workflows.isolation import run_isolated
from palaestra.workflows.operators import Problem
from palaestra.workflows.validator import ValidationResult, validate_workflow

__all__ = ["ISOLATIONS", "WorkflowOutcome", "WorkflowRunner"]

ISOLATIONS = ("process", "none")
"""Where a workflow runs: a process of its own, or the trainer's (none)."""


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
            answer, cost, error = await run_isolated(validation.code, problem, client, timeout_s=self.timeout_s,
                                                     memory_mb=self.memory_mb, max_lines=self.max_lines,
                                                     sandbox_seconds=self.sandbox_seconds)
        else:
            answer, cost, error = await execute(validation.code, problem, client, timeout_s=self.timeout_s,
                                                max_lines=self.max_lines, sandbox_seconds=self.sandbox_seconds)
        return WorkflowOutcome(answer if not error else "", validation, error, client.calls, client.tokens,
                               time.monotonic() - start, cost)
