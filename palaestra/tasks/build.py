"""Build a :class:`Task` from its config section (the one place that maps config to builders)."""

from __future__ import annotations

from palaestra.config.errors import ConfigError
from palaestra.tasks.base import Task
from palaestra.tasks.gsm8k import build_gsm8k_task
from palaestra.tasks.reasoning_gym_tasks import build_reasoning_gym_task

DEFAULT_INSTRUCTIONS = {
    "reasoning_gym": "Give the final number inside <answer></answer>.",
    "gsm8k": "Give the final number inside <answer></answer>.",
    "code": "Write the Python program in one ```python block.",
    "qa": "Answer with the shortest span of the passage that answers the question, inside <answer></answer>.",
}
"""The instruction of a mixture component that sets none."""


def build_task(config) -> Task:
    """Examples and verifier for ``config`` (a :class:`palaestra.config.TaskConfig`); a workflow task around
    them when ``config.workflow.enabled``."""
    common = dict(
        train_size=config.train_size, test_size=config.test_size, seed=config.seed,
        instruction=config.instruction, system_prompt=config.system_prompt,
    )
    try:
        if config.source == "mixture":
            task = _build_mixture(config)
        elif config.source in ("reasoning_gym", "gsm8k", "code", "qa"):
            task = _build_source(config.name, config.source, dataset=config.dataset, params=dict(config.params),
                                 path=config.path, test_path=config.test_path, show_passage=config.show_passage,
                                 **common)
        else:
            raise ConfigError(f"task.source={config.source!r} is unknown; use reasoning_gym, gsm8k, code, qa or mixture")
    except (ValueError, TypeError, FileNotFoundError) as error:  # bad data or bad generator arguments
        if isinstance(error, ConfigError):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"task {config.name!r}: {message}") from None
    if not task.train:  # e.g. a small file whose examples all went to the test split
        raise ConfigError(f"task {config.name!r} has no training examples beside its {len(task.test)} test examples; "
                          "give more examples or lower task.test_size")
    task.template = config.template
    for component in getattr(task, "components", {}).values():
        component.template = config.template
    if config.workflow.enabled:
        task = _workflow_task(task, config.workflow)
    return task


def _build_source(name: str, source: str, *, dataset, params, path, test_path, show_passage: bool = True,
                  **common) -> Task:
    if source == "reasoning_gym":
        return build_reasoning_gym_task(name, dataset=dataset, params=params, **common)
    if source == "gsm8k":
        return build_gsm8k_task(path, test_path=test_path, name=name, **common)
    if source == "code":
        from palaestra.tasks.code import build_code_task

        return build_code_task(path, name=name, **common)
    from palaestra.tasks.qa import build_qa_task

    return build_qa_task(path, name=name, show_passage=show_passage, **common)


def _build_mixture(config) -> Task:
    """Every component built on its own (its whole pool; a generator makes its share), then mixed by ratio."""
    from palaestra.tasks.mixture import _share, domain_of, mix

    ratios = {name: part.ratio for name, part in config.components.items()}
    train_counts, test_counts = _share(config.train_size, ratios), _share(config.test_size, ratios, minimum=1)
    built = {}
    for index, (name, part) in enumerate(config.components.items()):
        # a generator makes exactly its share; a file is read whole (train_size None) and split
        train_size = train_counts[name] if part.source == "reasoning_gym" else None
        task = _build_source(name, part.source, dataset=part.dataset, params=dict(part.params), path=part.path,
                             test_path=part.test_path, train_size=max(1, train_size) if train_size is not None else None,
                             test_size=test_counts[name], seed=config.seed + index,
                             instruction=part.instruction or DEFAULT_INSTRUCTIONS[part.source],
                             system_prompt=config.system_prompt)
        built[name] = (task, part.ratio, domain_of(part.source, part.domain))
    return mix(config.name, built, train_size=config.train_size, test_size=config.test_size,
               system_prompt=config.system_prompt)


def _workflow_task(task: Task, flow) -> Task:
    from functools import partial

    from palaestra.workflows.task import WorkflowTask, make_backend

    executor = flow.executor
    return WorkflowTask(task, backend_factory=partial(make_backend, executor), max_calls=flow.max_calls,
                        max_tokens=flow.max_tokens, timeout_s=flow.timeout_s, sandbox_seconds=flow.sandbox_seconds,
                        isolation=flow.isolation, memory_mb=flow.memory_mb, experience_size=flow.experience_size, experience_shots=flow.experience_shots,
                        executor_max_tokens=executor.max_tokens, executor_temperature=executor.temperature,
                        cache_size=executor.cache_size, executor_cost_per_million_tokens=executor.cost_per_million_tokens)
