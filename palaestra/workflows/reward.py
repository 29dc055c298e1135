"""Reward functions of the workflow task, in the plain ``(completions, **columns) -> list[float]`` form.

They read two columns that :class:`palaestra.workflows.task.WorkflowTask` adds: ``example`` (the
problems) and ``workflow_task`` (the task, which runs and caches the workflows). Name them in
``task.rewards`` by import path, e.g. ``palaestra.workflows.reward:workflow_reward``.

- :func:`workflow_reward`: the domain's 5-tier reward of the workflow's answer minus the penalties
  (the training signal);
- :func:`workflow_valid`: 1.0 when the policy's code passed validation as written (the format
  reward; also logged as the validity rate);
- :func:`workflow_clean`: 1.0 when it also ran to an answer without repair or runtime error;
- :func:`workflow_fallback`: 1.0 when the default workflow had to stand in.

The last three carry weight 0 in ``experiment=aflow``: logged under ``reward/<name>/mean`` every step.
"""

from __future__ import annotations

from palaestra.workflows.validator import validate_workflow

__all__ = ["workflow_clean", "workflow_fallback", "workflow_reward", "workflow_valid"]


def _scores(completions, example, workflow_task):
    if not workflow_task or workflow_task[0] is None:
        raise ValueError("workflow rewards need a workflow task (task.workflow.enabled=true)")
    return workflow_task[0].score(list(completions), list(example))


def workflow_reward(completions: list[str], example: list, workflow_task: list, **columns) -> list[float]:
    """Tier of the executed workflow's answer minus penalties, floored at 0; 0 for a fallback."""
    return [score.reward for score in _scores(completions, example, workflow_task)]


def workflow_valid(completions: list[str], example: list | None = None, **columns) -> list[float]:
    """1.0 when the completion's workflow passes every static check without repair (no execution).

    >>> workflow_valid(["class Workflow:\\n    async def __call__(self, problem):\\n        return problem", "hi"])
    [1.0, 0.0]
    """
    domains = [e.meta.get("domain", "math") for e in example] if example else ["math"] * len(completions)
    return [0.0 if validate_workflow(text, domain).validation_failed else 1.0
            for text, domain in zip(completions, domains)]


def workflow_clean(completions: list[str], example: list, workflow_task: list, **columns) -> list[float]:
    """1.0 when the policy's own code ran to an answer with no repair and no runtime error."""
    return [1.0 if score.outcome.kind == "clean" else 0.0 for score in _scores(completions, example, workflow_task)]


def workflow_fallback(completions: list[str], example: list, workflow_task: list, **columns) -> list[float]:
    """1.0 when the default workflow stood in for the policy's (its answer earns nothing)."""
    return [1.0 if score.outcome.validation.fallback else 0.0 for score in _scores(completions, example, workflow_task)]
