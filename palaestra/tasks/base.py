"""What a single-turn task is: problems (``Example``) plus a verifier (``Task.is_correct``).

A task knows how to turn an example into chat messages, how to judge a completion, and which
per-example columns the reward functions receive. Each dataset family has one builder file
(``reasoning_gym_tasks.py``, ``gsm8k.py``) that returns a ``Task``; recipes only see this class.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from palaestra.tasks.answers import answers_match, extract_answer

__all__ = ["Example", "Task", "default_verifier", "split_examples"]


@dataclass(frozen=True)
class Example:
    """One problem."""

    question: str
    """The problem text as shown to the model."""
    answer: str
    """The gold answer, as a string."""
    meta: dict = field(default_factory=dict)
    """Extra columns passed to reward functions (e.g. the reasoning-gym entry under "entry")."""


def split_examples(examples: list[Example], test_size: int, train_size: int | None, seed: int,
                   what: str = "examples") -> tuple[list[Example], list[Example]]:
    """(train, test) of a problem file: shuffled with ``seed``, the first ``test_size`` held out, the rest
    (up to ``train_size``) to train on. Too few examples for both is a ValueError naming ``what``.

    >>> train, test = split_examples([Example(str(i), str(i)) for i in range(5)], 2, 2, seed=0)
    >>> len(train), len(test), set(e.question for e in train) & set(e.question for e in test)
    (2, 2, set())
    """
    if len(examples) <= test_size:
        raise ValueError(f"{len(examples)} {what} cannot give {test_size} test problems and a training set")
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    test, train = examples[:test_size], examples[test_size:]
    return (train[:train_size] if train_size is not None else train), test


def default_verifier(completion: str, example: Example) -> bool:
    """Lenient check: the tagged answer (or else the last number) equals the gold answer."""
    return answers_match(extract_answer(completion), example.answer)


@dataclass
class Task:
    """A train/test set of examples with the prompt format and the verifier that go with it."""

    name: str
    """Short name, used in logs and run folders."""
    train: list[Example]
    """Training problems."""
    test: list[Example]
    """Held-out problems; never shares a question with ``train``."""
    instruction: str
    """Appended to every question in the user message (e.g. how to format the answer)."""
    system_prompt: str | None
    """Optional system message put before the user message."""
    dataset_version: str
    """Identifies the exact data, e.g. "reasoning_gym-0.1.25:chain_sum:seed=0" or a file hash."""
    verifier: Callable[[str, Example], bool] = default_verifier
    """``(completion, example) -> bool``: what counts as a correct answer for accuracy."""
    template: str = "{question}\n\n{instruction}"
    """The user message, formatted with ``question`` and ``instruction``."""

    def prompt(self, example: Example) -> list[dict]:
        """Chat messages for one example: optional system message, then question + instruction."""
        user = self.template.format(question=example.question, instruction=self.instruction).strip()
        messages = [{"role": "user", "content": user}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def is_correct(self, completion: str, example: Example) -> bool:
        """The verifier used for accuracy."""
        return bool(self.verifier(completion, example))

    def columns(self, examples: Sequence[Example]) -> dict[str, list]:
        """Per-example columns passed as ``**kwargs`` to reward functions.

        Always ``answer`` and ``prompt`` (the chat messages, which a reward model scores); plus
        every ``meta`` key that any of the examples has (None where an example lacks it), so a
        batch always has the same keys.
        """
        columns: dict[str, list] = {"answer": [example.answer for example in examples],
                                    "prompt": [self.prompt(example) for example in examples]}
        keys = sorted({key for example in examples for key in example.meta})
        for key in keys:
            if key in ("answer", "prompt"):
                raise ValueError(f"Example.meta may not use the key {key!r}; the task fills it")
            columns[key] = [example.meta.get(key) for example in examples]
        return columns

    # ---- the hooks the recipes call on every task; a plain task has nothing to do in them (the
    # workflow task binds its executor, keeps its experience buffer and adds per-domain figures)

    def bind(self, generator) -> None:
        """Receive the policy's generator before training or evaluation (nothing to do here)."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the task (nothing here)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` gave (nothing here)."""

    def evaluation_figures(self, samples: list[dict]) -> dict[str, float]:
        """Figures beyond accuracy and reward for an evaluation's samples (none here)."""
        return {}

    def plot_outcomes(self, before: dict, after: dict, path):
        """A before/after plot of the evaluation figures; its path, or None when the task has none."""
        return None
