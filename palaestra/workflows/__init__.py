"""Workflow writing (AFlow-style): the policy writes a ``Workflow`` class from operators; an executor LLM runs it.

- :mod:`~palaestra.workflows.operators`: Custom, AnswerGenerate, Programmer, Test, Review, Revise, ScEnsemble;
- :mod:`~palaestra.workflows.executor`: the executor interface, batching and cache, and its three backends
  (in-process generation, an OpenAI-compatible URL, scripted replies);
- :mod:`~palaestra.workflows.validator`: static checks, repairs and the fallback workflow;
- :mod:`~palaestra.workflows.runner`: concurrent execution with budgets and timeouts, each workflow in a process of
  its own (:mod:`~palaestra.workflows.isolation`) running :mod:`~palaestra.workflows.execution`;
- :mod:`~palaestra.workflows.experience`: the few-shot buffer of good workflows;
- :mod:`~palaestra.workflows.task` and :mod:`~palaestra.workflows.reward`: the task GRPO trains on and its rewards;
- :mod:`~palaestra.workflows.evaluation`: per-domain figures (validity, shares of each outcome, ...).
"""

from palaestra.workflows.executor import (
    BudgetExceeded,
    Executor,
    ExecutorClient,
    GeneratorBackend,
    OpenAIBackend,
    Reply,
    Request,
    ScriptedBackend,
)
from palaestra.workflows.experience import Experience, ExperienceBuffer
from palaestra.workflows.operators import OPERATORS, Problem, bind_operators
from palaestra.workflows.runner import WorkflowOutcome, WorkflowRunner
from palaestra.workflows.task import WorkflowScore, WorkflowTask, make_backend
from palaestra.workflows.validator import FALLBACK_WORKFLOWS, ValidationResult, validate_workflow

__all__ = [
    "FALLBACK_WORKFLOWS", "OPERATORS", "BudgetExceeded", "Executor", "ExecutorClient", "Experience", "ExperienceBuffer",
    "GeneratorBackend", "OpenAIBackend", "Problem", "Reply", "Request", "ScriptedBackend", "ValidationResult",
    "WorkflowOutcome", "WorkflowRunner", "WorkflowScore", "WorkflowTask", "bind_operators", "make_backend",
    "validate_workflow",
]
