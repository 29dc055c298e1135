"""GSM8K from a local JSONL file in the official format.

Each line is ``{"question": "...", "answer": "...reasoning...\\n#### 72"}``; the gold answer is the
text after ``####`` with thousands commas removed. palaestra never downloads data: point
``task.path`` (and optionally ``task.test_path``) at files you already have.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from palaestra.config.errors import ConfigError
from palaestra.tasks.base import Example, Task, default_verifier

__all__ = ["build_gsm8k_task", "load_gsm8k"]


def build_gsm8k_task(
    path: str | Path,
    *,
    train_size: int | None,
    test_size: int,
    seed: int,
    instruction: str,
    system_prompt: str | None,
    test_path: str | Path | None = None,
    name: str = "gsm8k",
) -> Task:
    """Load GSM8K train and test splits that never share a question.

    Args:
        path: the JSONL file to train on (and to split, when there is no ``test_path``).
        train_size: number of training examples (None: all that remain).
        test_size: number of test examples.
        seed: seed of the shuffle that picks the examples.
        instruction, system_prompt: see ``Task``.
        test_path: a separate JSONL test file; its first ``test_size`` lines are the test split.
        name: the task's name (for logs).

    With no ``test_path`` the file is shuffled with ``seed`` and the test split is taken first, so
    the test set stays the same whatever ``train_size`` is.
    """
    examples = load_gsm8k(path, field="path")
    digest = hashlib.sha256(Path(path).read_bytes())
    rng = random.Random(seed)
    if test_path is None:
        rng.shuffle(examples)
        test, pool = examples[:test_size], examples[test_size:]
    else:
        test = load_gsm8k(test_path, field="test_path")[:test_size]
        digest.update(Path(test_path).read_bytes())
        pool = examples
        rng.shuffle(pool)
    # Duplicated questions exist in the wild; the test split wins, so no question is in both.
    test_questions = {example.question for example in test}
    train = [example for example in pool if example.question not in test_questions]
    if train_size is not None:
        train = train[:train_size]
    return Task(
        name=name,
        train=train,
        test=test,
        instruction=instruction,
        system_prompt=system_prompt,
        dataset_version=digest.hexdigest()[:12],
        verifier=default_verifier,
    )


def load_gsm8k(path: str | Path, field: str = "path") -> list[Example]:
    """Read a GSM8K-format JSONL file into examples (blank lines are skipped).

    ``field`` names the config key in the error message, so the user knows what to fix.
    Raises FileNotFoundError for a missing file, and a one-line ConfigError (a ValueError) naming the
    file (and line) for bytes that are not UTF-8, a malformed line or a file without examples.
    """
    from palaestra.data.jsonl import read_jsonl  # here: palaestra.data imports torch, and the CLI imports this module

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"task.{field}={path} does not exist; point it at a GSM8K-format JSONL file"
        )
    examples = [_parse_record(record, where) for where, record in read_jsonl(path, "GSM8K")]
    if not examples:
        raise ConfigError(f'GSM8K file {path} holds no examples; give one {{"question": ..., "answer": "... #### <number>"}} '
                          'object a line')
    return examples


def _parse_record(record: dict, where: str) -> Example:
    if not isinstance(record.get("question"), str):
        raise ConfigError(f'{where}: expected an object with string fields "question" and "answer"')
    solution = record.get("answer")
    if not isinstance(solution, str) or "####" not in solution:
        raise ConfigError(f'{where}: "answer" must be a string ending in "#### <number>"')
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise ConfigError(f'{where}: nothing after "####" in "answer"')
    return Example(question=record["question"], answer=gold, meta={"solution": solution})
