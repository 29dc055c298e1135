"""The four agent_tunix GSM8K rewards, with its exact values (summed, their maximum is 9.5).

The prompt asks for reasoning between ``<reasoning>`` and ``</reasoning>`` and then one number
between ``<answer>`` and ``</answer>``. The rewards, best case in brackets:

1. ``tunix_exact_format``: reasoning block, then answer block, nothing after          [3.0]
2. ``tunix_approx_format``: +0.5 per tag that appears exactly once, else -0.5        [2.0]
3. ``tunix_answer``: graded closeness of the answer block to the gold answer        [3.0]
4. ``tunix_number``: the first number after ``<answer>`` equals the gold as a float  [1.5]

Two deliberate improvements on the original, which change no score of a well-formed answer:
numbers may carry a minus sign or thousands commas (the original could never reward a negative
gold answer), and a gold answer of 0 is compared by equality rather than dividing by zero.
"""

from __future__ import annotations

import re

__all__ = ["tunix_answer", "tunix_approx_format", "tunix_exact_format", "tunix_number"]

_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")

# Optional whitespace, a non-empty reasoning block, anything, a non-empty answer block (captured),
# then only whitespace to the end of the completion.
_EXACT_FORMAT = re.compile(
    r"\s*<reasoning>.+?</reasoning>.*?<answer>(.+?)</answer>\s*", flags=re.DOTALL
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _float(text: str) -> float:
    """float() that also accepts thousands commas; raises ValueError like float()."""
    return float(text.strip().replace(",", ""))


def tunix_exact_format(completions: list[str], **kwargs) -> list[float]:
    """3.0 when the completion is a reasoning block then an answer block with nothing after, else 0.

    >>> tunix_exact_format(["<reasoning>r</reasoning><answer>4</answer>", "<answer>4</answer>"])
    [3.0, 0.0]
    """
    return [3.0 if _EXACT_FORMAT.fullmatch(text) else 0.0 for text in completions]


def tunix_approx_format(completions: list[str], **kwargs) -> list[float]:
    """Per tag (<reasoning>, </reasoning>, <answer>, </answer>): +0.5 if it appears exactly once,
    else -0.5; so from -2.0 to 2.0.

    >>> tunix_approx_format(["<reasoning>r</reasoning><answer>4</answer>", "<answer>4"])
    [2.0, -1.0]
    """
    return [sum(0.5 if text.count(tag) == 1 else -0.5 for tag in _TAGS) for text in completions]


def _answer_score(guess: str, truth: str) -> float:
    if guess == truth:
        return 3.0
    if guess.strip() == truth.strip():
        return 1.5
    try:
        guess_value, true_value = _float(guess), _float(truth)
    except ValueError:
        return -0.5  # unparseable
    if true_value == 0:
        return 0.5 if guess_value == 0 else -1.0  # the ratio is undefined; equal means within 10%
    ratio = guess_value / true_value
    if 0.9 <= ratio <= 1.1:
        return 0.5
    if 0.8 <= ratio <= 1.2:
        return 0.25
    return -1.0


def tunix_answer(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """Closeness of the exact-format answer block to the gold answer.

    3.0 exact; 1.5 equal after stripping spaces; else by ratio guess/truth: 0.5 in [0.9, 1.1],
    0.25 in [0.8, 1.2], -1.0 outside; -0.5 when not a number; 0 when the format does not match.

    >>> fmt = "<reasoning>r</reasoning><answer>{}</answer>"
    >>> tunix_answer([fmt.format(g) for g in ["10", " 10 ", "11", "12", "20", "ten"]], ["10"] * 6)
    [3.0, 1.5, 0.5, 0.25, -1.0, -0.5]
    """
    scores = []
    for text, truth in zip(completions, answer, strict=True):
        match = _EXACT_FORMAT.fullmatch(text)
        scores.append(0.0 if match is None else _answer_score(match.group(1), truth))
    return scores


def tunix_number(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.5 when the first number after ``<answer>`` equals the gold answer as a float, else 0.

    >>> tunix_number(["<answer>The answer is 1,234.0</answer>", "<answer>12</answer>", "12"],
    ...              ["1234", "13", "12"])
    [1.5, 0.0, 0.0]
    """
    scores = []
    for text, truth in zip(completions, answer, strict=True):
        _, tag, after = text.partition("<answer>")
        match = _NUMBER.search(after) if tag else None
        try:
            equal = match is not None and _float(match.group(0)) == _float(truth)
        except ValueError:
            equal = False
        scores.append(1.5 if equal else 0.0)
    return scores
