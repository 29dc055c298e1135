"""The default rewards: is the answer right, and is it in the requested ``<answer>`` format.

Correctness uses exactly the same extraction and comparison as the task verifiers
(``palaestra.tasks.answers``), so the reward a sample earns and the accuracy it counts toward
always agree.
"""

from __future__ import annotations

import re

from palaestra.tasks.answers import answers_match, extract_answer

__all__ = ["answer_format_reward", "correctness_reward", "number_only_reward"]

_ANSWER_BLOCK = re.compile(r"<answer>.*?</answer>", flags=re.DOTALL | re.IGNORECASE)
_BARE_NUMBER = re.compile(r"^\s*-?\d[\d,]*(\.\d+)?\.?\s*$")


def correctness_reward(
    completions: list[str], answer: list[str], entry: list | None = None, **kwargs
) -> list[float]:
    """1.0 when the completion's answer is right, else 0.0.

    The answer is the last ``<answer>...</answer>`` block, or else the last number (lenient);
    it is compared with the gold ``answer`` as a number ("1,000" == "1000.0") or as normalized
    text. When the batch carries reasoning-gym ``entry`` columns, that dataset's own verifier
    decides instead (so a countdown expression other than the reference one still counts).

    >>> completions = ["so <answer>42</answer>", "it is 41", "1,000 apples"]
    >>> correctness_reward(completions, answer=["42", "42", "1000"])
    [1.0, 0.0, 1.0]
    """
    rewards = []
    for i, (completion, gold) in enumerate(zip(completions, answer, strict=True)):
        item = entry[i] if entry is not None else None
        if _is_reasoning_gym_entry(item):
            # Imported here so that rewards do not pull in reasoning-gym unless it is used.
            from palaestra.tasks.reasoning_gym_tasks import reasoning_gym_correct

            correct = reasoning_gym_correct(completion, item)
        else:
            correct = answers_match(extract_answer(completion), gold)
        rewards.append(1.0 if correct else 0.0)
    return rewards


def _is_reasoning_gym_entry(item) -> bool:
    return isinstance(item, dict) and "source_dataset" in item.get("metadata", {})


def answer_format_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 when the completion contains exactly one ``<answer>...</answer>`` block, else 0.0.

    >>> answer_format_reward(["<answer>1</answer>", "1", "<answer>1</answer><answer>2</answer>"])
    [1.0, 0.0, 0.0]
    """
    return [1.0 if len(_ANSWER_BLOCK.findall(text)) == 1 else 0.0 for text in completions]


def number_only_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 when the whole completion is one number (a final period allowed), else 0.0.

    The format of "Answer with a number." prompts.

    >>> number_only_reward(["42", " -7.", "1,000", "42 apples", "x = 3"])
    [1.0, 1.0, 1.0, 0.0, 0.0]
    """
    return [1.0 if _BARE_NUMBER.match(text) else 0.0 for text in completions]
