"""Build a :class:`Task` from its config section (the one place that maps config to builders)."""

from __future__ import annotations

from palaestra.config import ConfigError
from palaestra.tasks.base import Task
from palaestra.tasks.gsm8k import build_gsm8k_task
from palaestra.tasks.reasoning_gym_tasks import build_reasoning_gym_task


def build_task(config) -> Task:
    """Examples and verifier for ``config`` (a :class:`palaestra.config.TaskConfig`)."""
    common = dict(
        train_size=config.train_size, test_size=config.test_size, seed=config.seed,
        instruction=config.instruction, system_prompt=config.system_prompt,
    )
    try:
        if config.source == "reasoning_gym":
            task = build_reasoning_gym_task(config.name, dataset=config.dataset, params=dict(config.params), **common)
        elif config.source == "gsm8k":
            task = build_gsm8k_task(config.path, test_path=config.test_path, **common)
        else:
            raise ConfigError(f"task.source={config.source!r} is unknown; use reasoning_gym or gsm8k")
    except (ValueError, TypeError, FileNotFoundError) as error:  # bad data or bad generator arguments
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"task {config.name!r}: {message}") from None
    task.template = config.template
    return task
