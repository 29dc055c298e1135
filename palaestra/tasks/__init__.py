"""Single-turn tasks: examples plus a verifier, one builder per dataset family.

``TASK_BUILDERS`` maps a task config's ``source`` to the function that builds the ``Task``.
"""

from palaestra.tasks.answers import (
    answers_match,
    extract_answer,
    extract_last_number,
    extract_tagged_answer,
    numbers_equal,
)
from palaestra.tasks.base import Example, Task
from palaestra.tasks.gsm8k import build_gsm8k_task
from palaestra.tasks.reasoning_gym_tasks import build_reasoning_gym_task

TASK_BUILDERS = {
    "reasoning_gym": build_reasoning_gym_task,
    "gsm8k": build_gsm8k_task,
}

__all__ = [
    "TASK_BUILDERS",
    "Example",
    "Task",
    "answers_match",
    "build_gsm8k_task",
    "build_reasoning_gym_task",
    "extract_answer",
    "extract_last_number",
    "extract_tagged_answer",
    "numbers_equal",
]
