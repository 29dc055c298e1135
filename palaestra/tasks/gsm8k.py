"""GSM8K from a local JSONL file in the official format.

Each line is ``{"question": "...", "answer": "...reasoning...\\n#### 72"}``; the gold answer is the
text after ``####`` with thousands commas removed. palaestra never downloads data: point
``task.path`` (and optionally ``task.test_path``) at files you already have.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

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
    Raises FileNotFoundError for a missing file and ValueError (with the line number) for a
    malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"task.{field}={path} does not exist; point it at a GSM8K-format JSONL file"
        )
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                examples.append(_parse_line(line, path, line_number))
    return examples


def _parse_line(line: str, path: Path, line_number: int) -> Example:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("question"), str):
        raise ValueError(f'{where}: expected an object with string fields "question" and "answer"')
    solution = record.get("answer")
    if not isinstance(solution, str) or "####" not in solution:
        raise ValueError(f'{where}: "answer" must be a string ending in "#### <number>"')
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise ValueError(f'{where}: nothing after "####" in "answer"')
    return Example(question=record["question"], answer=gold, meta={"solution": solution})
