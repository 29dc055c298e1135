"""The workflow task: the policy is shown a problem and writes a ``Workflow`` class that solves it.

:class:`WorkflowTask` wraps any task (usually a math / QA / code mixture, :mod:`palaestra.tasks.mixture`):
same examples, but the prompt asks for a workflow built from the operators, with the best earlier
workflows of the same domain as examples (:class:`~palaestra.workflows.experience.ExperienceBuffer`).
:meth:`WorkflowTask.score` runs a batch of completions through the validator and the executor and
scores each answer with its domain's 5-tier reward minus the penalties:

    operator mismatch (Programmer / Test outside code) -0.4, validation failed -0.2, runtime error -0.3,
    floor 0; a fallback workflow's answer is never credited (reward 0).

Scores are cached by (completion, problem), so the reward functions of one step and the verifier
(accuracy) share one execution. The GRPO recipe calls :meth:`bind` (the policy, for the in-process
``policy`` executor) and saves :meth:`state_dict` (the experience buffer) in its checkpoints.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from palaestra.tasks.base import Example, Task
from palaestra.workflows.executor import Executor, GeneratorBackend, OpenAIBackend, ScriptedBackend
from palaestra.workflows.experience import ExperienceBuffer
from palaestra.workflows.operators import OPERATORS, Problem
from palaestra.workflows.runner import WorkflowOutcome, WorkflowRunner

__all__ = ["MISMATCHED_OPERATORS", "WorkflowScore", "WorkflowTask", "make_backend", "tier"]

log = logging.getLogger(__name__)

MISMATCHED_OPERATORS = {"math": frozenset({"Programmer", "Test"}), "qa": frozenset({"Programmer", "Test"}),
                        "code": frozenset()}
"""Operators that are flagged (and penalised, not blocked) when a workflow uses them on a domain."""

SYSTEM_PROMPT = (
    "You write Python workflows that solve problems by calling operators. Operators are async; await them. "
    "They return dicts:\n"
    "- Custom(input, instruction) -> response\n"
    "- AnswerGenerate(input) -> thought, answer\n"
    "- Programmer(problem, analysis) -> code, output (code problems)\n"
    "- Test(problem, solution, entry_point) -> result, solution (code problems)\n"
    "- Review(problem, solution) -> review_result, feedback\n"
    "- Revise(problem, solution, feedback) -> solution\n"
    "- ScEnsemble(solutions) -> response (the most common answer)\n"
    "Write exactly one class Workflow with `async def __call__(self, problem)` that returns the answer. "
    "No imports; call operators by name with keyword arguments."
)
EXAMPLE_WORKFLOW = ('class Workflow:\n    async def __call__(self, problem):\n'
                    '        solution = await AnswerGenerate(input=problem)\n        return solution["answer"]\n')
INSTRUCTION = "Write the Workflow class for this {domain} problem in one ```python block."


@dataclass
class WorkflowScore:
    """How one completion's workflow did on one problem."""

    outcome: WorkflowOutcome
    tier: float
    """The domain tier of the credited answer (0 for a fallback or a runtime error)."""
    reward: float
    """The tier minus the flagged penalties, floored at 0 and snapped to a tier."""
    operator_mismatch: bool

    @property
    def correct(self) -> bool:
        """AFlow's notion: a credited answer with reward >= 0.7."""
        return self.outcome.credited and self.reward >= 0.7


def tier(domain: str, answer: str, example: Example, sandbox_seconds: float = 5.0) -> float:
    """The 5-tier reward of a workflow's answer before penalties (math / QA / code by the example's domain)."""
    from palaestra.tasks.mixture import domain_tier_reward

    columns = {key: [value] for key, value in example.meta.items() if key in ("tests", "asserts", "entry_point", "public", "answers")}
    return domain_tier_reward([answer], [example.answer], [domain], sandbox_seconds=sandbox_seconds, **columns)[0]


def make_backend(executor_config, *, policy_generator=None):
    """The executor backend a :class:`palaestra.config.ExecutorConfig` describes.

    ``policy_generator`` (the recipe's :class:`~palaestra.rollout.HFGenerator` on the policy) is needed for
    ``backend=policy``; ``backend=embedded`` loads its own copy of the embedded model.
    """
    import os

    backend = executor_config.backend
    if backend == "scripted":
        return ScriptedBackend(dict(executor_config.replies), default=executor_config.default_reply)
    if backend == "url":
        key = os.environ.get(executor_config.api_key_env) if executor_config.api_key_env else None
        return OpenAIBackend(executor_config.url, executor_config.model, api_key=key)
    from palaestra.rollout import HFGenerator

    if backend == "policy":
        if policy_generator is None:
            raise ValueError("task.workflow.executor.backend=policy needs the policy: call WorkflowTask.bind first")
        generator = HFGenerator(policy_generator.model, policy_generator.tokenizer,
                                max_prompt_length=executor_config.max_prompt_length, precision=policy_generator.precision)
        return GeneratorBackend(generator, adapter_off=True)
    import torch

    from palaestra.models import load_model_and_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_and_tokenizer(executor_config.model, device=device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return GeneratorBackend(HFGenerator(model, tokenizer, max_prompt_length=executor_config.max_prompt_length))


class WorkflowTask(Task):
    """A task whose completions are workflows; see the module docstring."""

    def __init__(self, base: Task, *, backend_factory: Callable[..., object], max_calls: int = 6,
                 max_tokens: int = 4096, timeout_s: float = 60.0, sandbox_seconds: float = 5.0,
                 isolation: str = "process", memory_mb: int = 1024, experience_size: int = 8, experience_shots: int = 1,
                 executor_max_tokens: int = 128,
                 executor_temperature: float = 0.0, cache_size: int = 4096, score_cache_size: int = 4096,
                 executor_cost_per_million_tokens: float = 0.0):
        super().__init__(name=base.name, train=base.train, test=base.test, instruction=INSTRUCTION,
                         system_prompt=SYSTEM_PROMPT, dataset_version=f"workflow:{base.dataset_version}",
                         verifier=lambda completion, example: self.score([completion], [example])[0].correct)
        self.base = base
        self.backend_factory = backend_factory
        self.executor_settings = dict(max_tokens=executor_max_tokens, temperature=executor_temperature, cache_size=cache_size,
                                      cost_per_million_tokens=executor_cost_per_million_tokens)
        self.limits = dict(max_calls=max_calls, max_tokens=max_tokens, timeout_s=timeout_s, sandbox_seconds=sandbox_seconds,
                           isolation=isolation, memory_mb=memory_mb)
        self.experience = ExperienceBuffer(capacity=experience_size)
        self.experience_shots = experience_shots
        self._runner: WorkflowRunner | None = None
        self._policy_generator = None
        self._scores: OrderedDict[tuple, WorkflowScore] = OrderedDict()
        self._score_cache_size = score_cache_size
        self._train_questions = {example.question for example in base.train}
        self._by_question = {example.question: example for example in [*base.train, *base.test]}

    # ---- the recipe's hooks

    def bind(self, generator) -> None:
        """Give the task the policy's generator (used by the ``policy`` executor backend)."""
        self._policy_generator = generator

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the experience buffer."""
        return {"experience": self.experience.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state and "experience" in state:
            self.experience.load_state_dict(state["experience"])

    @property
    def runner(self) -> WorkflowRunner:
        """The workflow runner, its executor backend made on first use (a model load for in-process backends)."""
        if self._runner is None:
            backend = self.backend_factory(policy_generator=self._policy_generator)
            self._runner = WorkflowRunner(Executor(backend, **self.executor_settings), **self.limits)
        return self._runner

    # ---- prompts and columns

    def domain(self, example: Example) -> str:
        return example.meta.get("domain", "math")

    def prompt(self, example: Example) -> list[dict]:
        """System: the operators. User: earlier good workflows of this domain (or a basic one), the problem."""
        domain = self.domain(example)
        shots = self.experience.shots(domain, self.experience_shots) if self.experience_shots else []
        examples = [shot.workflow for shot in shots] or [EXAMPLE_WORKFLOW]
        shown = "\n".join(f"A workflow that {'solved a similar problem' if shots else 'answers directly'}:\n"
                          f"```python\n{code.strip()}\n```" for code in examples)
        user = f"{shown}\n\nProblem ({domain}):\n{example.question}\n\n{self.instruction.format(domain=domain)}"
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]

    def columns(self, examples) -> dict[str, list]:
        """The base columns plus ``example`` (the problems) and ``workflow_task`` (this task), which the
        workflow rewards read."""
        columns = super().columns(examples)
        columns["example"] = list(examples)
        columns["workflow_task"] = [self] * len(examples)
        return columns

    # ---- evaluation (the recipe merges these into its evaluation figures)

    def evaluation_figures(self, samples: list[dict]) -> dict[str, float]:
        """Per-domain workflow figures (:mod:`palaestra.workflows.evaluation`) of an evaluation's samples
        (``question`` and ``completion`` each); the scores come from the cache the rewards filled."""
        from palaestra.workflows.evaluation import workflow_figures

        examples = [self._by_question[sample["question"]] for sample in samples]
        scores = self.score([sample["completion"] for sample in samples], examples)
        return workflow_figures(scores, [self.domain(example) for example in examples])

    def plot_outcomes(self, before: dict, after: dict, path):
        """The before/after plot of outcome shares per domain; returns its path."""
        from palaestra.workflows.evaluation import plot_outcome_shares

        return plot_outcome_shares(before, after, path)

    # ---- scoring

    def score(self, completions: list[str], examples: list[Example]) -> list[WorkflowScore]:
        """Run (or recall) each completion's workflow on its example and score it; all new runs at once."""
        keys = [(completion, example.question, self.domain(example)) for completion, example in zip(completions, examples)]
        missing = list(dict.fromkeys(key for key in keys if key not in self._scores))
        if missing:
            by_key = {key: example for key, example in zip(keys, examples)}
            problems = [Problem(by_key[key].question, key[2], by_key[key].meta) for key in missing]
            outcomes = self.runner.run([key[0] for key in missing], problems)
            _log_outcomes(outcomes)
            for key, outcome in zip(missing, outcomes):
                score = self._score(outcome, by_key[key])
                self._scores[key] = score
                if score.correct and key[1] in self._train_questions:  # held-out problems never reach prompts
                    self.experience.add(key[2], key[1], outcome.validation.code, score.reward, outcome.answer)
            while len(self._scores) > self._score_cache_size:
                self._scores.popitem(last=False)
        return [self._scores[key] for key in keys]

    def _score(self, outcome: WorkflowOutcome, example: Example) -> WorkflowScore:
        from palaestra.rewards.tiered import _apply_penalties

        domain = self.domain(example)
        mismatch = bool(outcome.validation.operators & MISMATCHED_OPERATORS.get(domain, frozenset()))
        if not outcome.credited:
            return WorkflowScore(outcome, 0.0, 0.0, mismatch)
        value = tier(domain, outcome.answer, example, self.limits["sandbox_seconds"])
        flags = {"operator_mismatch": [mismatch], "validation_failed": [outcome.validation.validation_failed],
                 "runtime_error": [bool(outcome.runtime_error)]}
        return WorkflowScore(outcome, value, _apply_penalties([value], flags)[0], mismatch)


def _log_outcomes(outcomes: list[WorkflowOutcome]) -> None:
    """One line per batch in train.log (how the workflows ended); each repair, fallback and runtime error at debug level."""
    from collections import Counter

    kinds = Counter(outcome.kind for outcome in outcomes)
    log.info("workflows: %d run, %s", len(outcomes), ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())),
             extra={"console": False})  # train.log only: the progress bar stays readable
    for outcome in outcomes:
        v = outcome.validation
        if v.repaired:
            log.debug("workflow repaired: %s", "; ".join(v.repairs))
        elif v.fallback:
            log.debug("workflow replaced by the fallback: %s", "; ".join(v.errors))
        if outcome.runtime_error:
            log.debug("workflow runtime error: %s", outcome.runtime_error)


assert set(MISMATCHED_OPERATORS["math"]) <= set(OPERATORS)
