"""Pulling the final answer out of a completion, and comparing answers.

This is the one place where palaestra decides what a model "answered": the task verifiers
(``Task.is_correct``) and the reward functions both call these helpers, so accuracy and reward
can never disagree about what was extracted. Extraction is lenient on purpose: a small model
that writes the right number without the requested ``<answer>`` tags is still counted as right
(the format is rewarded separately, by ``answer_format_reward``).
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "answers_match",
    "extract_answer",
    "extract_last_number",
    "extract_tagged_answer",
    "normalize_text",
    "numbers_equal",
    "parse_number",
]

# A number: optional sign, either 1,234,567-style thousands groups or plain digits, an optional
# decimal part; or a bare decimal like .5. Commas are dropped by the extractor.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")

# Two decimal answers closer than this count as equal: it absorbs float noise (2.4999999999 vs
# 2.5) without letting a wrong integer pass, however large the numbers are.
_ABS_TOLERANCE = Fraction(1, 10**6)


def extract_tagged_answer(text: str, tag: str = "answer") -> str | None:
    """Content of the last ``<tag>...</tag>`` block, stripped; None when there is none.

    >>> extract_tagged_answer("<answer>1</answer> then <answer> 2 </answer>")
    '2'
    """
    matches = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL | re.IGNORECASE)
    return matches[-1].strip() if matches else None


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands commas removed; None when there is none.

    A minus sign right after a digit or ``)`` is subtraction, not a sign: "5-3" ends in "3".

    >>> extract_last_number("so 1,234 - 5 = -3 or 2.5.")
    '2.5'
    >>> extract_last_number("no digits") is None
    True
    """
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    match = matches[-1]
    number = match.group(0).replace(",", "")
    before = text[match.start() - 1] if match.start() > 0 else ""
    if number.startswith("-") and (before.isalnum() or before == ")"):
        number = number[1:]
    return number


def extract_answer(text: str) -> str | None:
    """The tagged answer when the completion has one, otherwise its last number.

    >>> extract_answer("I think <answer>7</answer>")
    '7'
    >>> extract_answer("3 + 4 = 7")
    '7'
    """
    tagged = extract_tagged_answer(text)
    return tagged if tagged is not None else extract_last_number(text)


def parse_number(text: str | None) -> Fraction | None:
    """``text`` as an exact number ("1,234", "$2.50", "3/4", "-1e3", "40%"), or None.

    >>> parse_number("$1,234.50")
    Fraction(2469, 2)
    >>> parse_number("forty") is None
    True
    """
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace(" ", "").lstrip("$").rstrip(".%")
    if not cleaned:
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """True when both strings are numbers within 1e-6 of each other ("2.50" == "2.5").

    >>> numbers_equal("1,000", "1000.0"), numbers_equal("7", "8"), numbers_equal("x", "x")
    (True, False, False)
    """
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    return abs(x - y) <= _ABS_TOLERANCE


def normalize_text(text: str) -> str:
    """Lower-case, punctuation and articles removed, whitespace collapsed (SQuAD-style).

    >>> normalize_text("The  Eiffel Tower!")
    'eiffel tower'
    """
    text = re.sub(r"[^\w\s]", " ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answers_match(predicted: str | None, gold: str) -> bool:
    """Does an extracted answer equal the gold one, as numbers or as normalized text?

    When the gold answer is a number and the prediction is not a bare number ("$18 dollars"),
    the prediction's last number is compared: lenient, as the rest of this module.

    >>> answers_match("18 dollars", "18"), answers_match("Paris.", "paris")
    (True, True)
    >>> answers_match(None, "1")
    False
    """
    if predicted is None:
        return False
    if parse_number(gold) is not None:
        if numbers_equal(predicted, gold):
            return True
        return numbers_equal(extract_last_number(predicted), gold)
    return normalize_text(predicted) == normalize_text(gold)
