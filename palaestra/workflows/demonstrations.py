"""Demonstration workflows: a warm start that teaches a small policy the operator interface.

A small model shown the operator list and one example does not write a ``Workflow`` class: it
writes plain functions, ``__init__`` methods and prose, so every workflow of a GRPO group falls back
to the default, every one earns 0 and GRPO has nothing to compare. A short SFT on demonstrations
fixes the *form*; which workflow suits which domain is left to GRPO.

:func:`demonstration_workflow` draws a workflow from a family of :data:`PATTERNS` (answer directly,
a custom instruction, plan then answer, review and revise, a self-consistency ensemble, a program,
a drafted program checked by ``Test``), with varied variable names, instructions and ensemble sizes.
The draw does not look at the problem's domain: a demonstration of ``Programmer`` on a math problem
is as likely as on a code problem, so a preference for a domain's operators can only come from
the reward, never from the demonstrations.

:func:`write_demonstrations` writes chat JSONL for the SFT recipe: the *same* prompt the workflow
task shows during GRPO (:meth:`~palaestra.workflows.task.WorkflowTask.prompt`), one assistant reply
per demonstration, for training problems only. ``palaestra pipeline aflow`` runs it as its data
stage, then SFT, then GRPO.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

__all__ = ["PATTERNS", "demonstration_workflow", "write_demonstrations"]

_NAMES = ("solution", "result", "draft", "attempt", "response", "output")
_INSTRUCTIONS = (
    "Solve the problem step by step and give the final answer.",
    "Answer the question as briefly as possible.",
    "Think carefully, then reply with the answer only.",
    "Write a Python function that solves this task. Reply with the code only.",
    "Read the text and answer with the exact words that answer the question.",
)
_ANALYSES = ("", "Compute the answer step by step.", "Parse the input, compute, print the result.")


def _direct(rng: random.Random) -> list[str]:
    name = rng.choice(_NAMES)
    return [f"{name} = await AnswerGenerate(input=problem)", f'return {name}["answer"]']


def _custom(rng: random.Random) -> list[str]:
    name = rng.choice(_NAMES)
    return [f"{name} = await Custom(input=problem, instruction={rng.choice(_INSTRUCTIONS)!r})", f'return {name}["response"]']


def _plan_then_answer(rng: random.Random) -> list[str]:
    return ['plan = await Custom(input=problem, instruction="List the steps needed to solve this.")',
            'solution = await AnswerGenerate(input=problem + "\\n" + plan["response"])', 'return solution["answer"]']


def _review_revise(rng: random.Random) -> list[str]:
    name = rng.choice(_NAMES)
    return [f"{name} = await AnswerGenerate(input=problem)",
            f'review = await Review(problem=problem, solution={name}["answer"])',
            'if review["review_result"]:', f'    return {name}["answer"]',
            f'revised = await Revise(problem=problem, solution={name}["answer"], feedback=review["feedback"])',
            'return revised["solution"]']


def _ensemble(rng: random.Random) -> list[str]:
    count = rng.choice((2, 3, 4))
    if rng.random() < 0.5:
        call, key = "AnswerGenerate(input=problem)", "answer"
    else:
        call, key = f"Custom(input=problem, instruction={rng.choice(_INSTRUCTIONS)!r})", "response"
    return ["solutions = []", f"for _ in range({count}):", f"    candidate = await {call}",
            f'    solutions.append(candidate["{key}"])',
            "best = await ScEnsemble(solutions=solutions, problem=problem)", 'return best["response"]']


def _program(rng: random.Random) -> list[str]:
    analysis = rng.choice(_ANALYSES)
    field = rng.choice(("output", "code"))
    return [f"program = await Programmer(problem=problem, analysis={analysis!r})", f'return program["{field}"]']


def _draft_and_test(rng: random.Random) -> list[str]:
    name = rng.choice(_NAMES)
    return [f'{name} = await Custom(input=problem, instruction="Write a Python program that solves this task. '
            'Reply with the code only.")',
            f'checked = await Test(problem=problem, solution={name}["response"])', 'return checked["solution"]']


PATTERNS = {"direct": _direct, "custom": _custom, "plan_then_answer": _plan_then_answer,
            "review_revise": _review_revise, "ensemble": _ensemble, "program": _program,
            "draft_and_test": _draft_and_test}
"""Pattern name -> a function of a random generator giving the lines of ``__call__``'s body."""


def demonstration_workflow(rng: random.Random, pattern: str | None = None) -> str:
    """One demonstration: a ``Workflow`` class of a random (or the named) pattern, in a fenced block.

    >>> print(demonstration_workflow(random.Random(0), "direct"))
    ```python
    class Workflow:
        async def __call__(self, problem):
            attempt = await AnswerGenerate(input=problem)
            return attempt["answer"]
    ```
    """
    make = PATTERNS[pattern] if pattern else PATTERNS[rng.choice(sorted(PATTERNS))]
    body = "\n".join(f"        {line}" for line in make(rng))
    return f"```python\nclass Workflow:\n    async def __call__(self, problem):\n{body}\n```"


def write_demonstrations(task, folder: str | Path, *, per_problem: int = 1, val_fraction: float = 0.1,
                         seed: int = 0) -> Path:
    """Write ``train.jsonl`` and ``val.jsonl`` of demonstrations for ``task``'s training problems (a
    :class:`~palaestra.workflows.task.WorkflowTask`) into ``folder``; return ``folder``.

    Each line is ``{"messages": [system, user, assistant]}``: the task's own prompt for the problem and
    one demonstration. The validation share is whole problems, never a problem that is also trained on.
    Each file is written to a temporary name and renamed, so a folder never holds half a file.
    """
    if per_problem < 1:
        raise ValueError(f"per_problem must be at least 1, got {per_problem}")
    rng = random.Random(seed)
    problems = list({example.question: example for example in task.train}.values())  # a mixture repeats small pools
    rng.shuffle(problems)
    held = max(1, round(len(problems) * val_fraction)) if len(problems) > 1 else 0
    splits = {"val.jsonl": problems[:held], "train.jsonl": problems[held:]}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, examples in splits.items():
        lines = [json.dumps({"messages": [*task.prompt(example),
                                          {"role": "assistant", "content": demonstration_workflow(rng)}]})
                 for example in examples for _ in range(per_problem)]
        temporary = folder / f".{file_name}.tmp-{os.getpid()}"
        temporary.write_text("".join(line + "\n" for line in lines))
        os.replace(temporary, folder / file_name)
    return folder
