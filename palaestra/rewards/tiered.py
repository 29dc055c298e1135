"""The AFlow 5-tier rewards: coarse levels {0, 0.2, 0.4, 0.7, 1.0} for math, code and QA.

A few well-separated levels give GRPO a clear ranking inside a group without rewarding noise in
the last digits. Each reward first picks its tier, then subtracts the penalties flagged by the
optional boolean columns (the workflow validator's findings):

    operator_mismatch -0.4    validation_failed -0.2    runtime_error -0.3

floors the result at 0 and snaps it back to the nearest tier (ties go down), so every reward this
module returns is one of the five levels. A reward >= 0.7 counts as correct in AFlow.
"""

from __future__ import annotations

from collections import Counter

from palaestra.tasks.answers import (
    extract_answer,
    extract_last_number,
    extract_tagged_answer,
    normalize_text,
    parse_number,
)

__all__ = ["TIERS", "snap_to_tier", "tiered_code_reward", "tiered_math_reward", "tiered_qa_reward"]

TIERS = (0.0, 0.2, 0.4, 0.7, 1.0)
PENALTIES = {"operator_mismatch": 0.4, "validation_failed": 0.2, "runtime_error": 0.3}


def snap_to_tier(x: float) -> float:
    """The tier nearest to ``x`` (clamped to [0, 1]; a tie goes to the lower tier).

    >>> [snap_to_tier(x) for x in (-1.0, 0.1, 0.3, 0.6, 0.8, 0.9, 2.0)]
    [0.0, 0.0, 0.2, 0.7, 0.7, 1.0, 1.0]
    """
    # Rounded distances keep float noise (1.0 - 0.7 = 0.30000000000000004) from breaking a tie.
    x = min(max(x, 0.0), 1.0)
    return min(TIERS, key=lambda tier: (round(abs(tier - x), 9), tier))


def _apply_penalties(tiers: list[float], columns: dict) -> list[float]:
    """Subtract the flagged penalties, floor at 0 and snap back onto a tier."""
    rewards = []
    for i, tier in enumerate(tiers):
        penalty = sum(
            amount for name, amount in PENALTIES.items()
            if columns.get(name) is not None and columns[name][i]
        )
        rewards.append(snap_to_tier(max(tier - penalty, 0.0)))
    return rewards


def _math_tier(completion: str, truth: str) -> float:
    extracted = extract_answer(completion)
    guess = parse_number(extracted)
    if guess is None:  # "<answer>x = 4</answer>": fall back to the last number inside the answer
        guess = parse_number(extract_last_number(extracted or ""))
    if guess is None:
        return 0.0
    true_value = parse_number(truth)
    if true_value is None:
        return 0.2  # a well-formed answer to a question we cannot check numerically
    # Relative error; with a true answer of 0 the absolute error stands in (no division by zero).
    error = abs(guess - true_value) / abs(true_value) if true_value != 0 else abs(guess)
    if error < 1e-4:
        return 1.0
    if error < 0.05:
        return 0.7
    if error < 0.5:
        return 0.4
    return 0.2


def tiered_math_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """Math tier by relative error of the answer: < 1e-4 -> 1.0, < 5% -> 0.7, < 50% -> 0.4,
    any other number -> 0.2, no number -> 0; then the penalties.

    >>> tiered_math_reward(["<answer>100</answer>", "103", "140", "900", "none"], ["100"] * 5)
    [1.0, 0.7, 0.4, 0.2, 0.0]
    """
    tiers = [_math_tier(text, truth) for text, truth in zip(completions, answer, strict=True)]
    return _apply_penalties(tiers, kwargs)


def tiered_code_reward(completions: list[str], pass_rate: list[float], **kwargs) -> list[float]:
    """Code tier by the fraction of tests passed: >= 0.99 -> 1.0, >= 0.75 -> 0.7, >= 0.5 -> 0.4,
    >= 0.2 -> 0.2, else 0; then the penalties.

    >>> tiered_code_reward(["c"] * 5, pass_rate=[1.0, 0.8, 0.5, 0.2, 0.1])
    [1.0, 0.7, 0.4, 0.2, 0.0]
    """
    if len(pass_rate) != len(completions):
        raise ValueError(f"pass_rate has {len(pass_rate)} values, completions {len(completions)}")
    return _apply_penalties([_code_tier(float(rate or 0.0)) for rate in pass_rate], kwargs)


def _code_tier(rate: float) -> float:
    for threshold, tier in ((0.99, 1.0), (0.75, 0.7), (0.5, 0.4), (0.2, 0.2)):
        if rate >= threshold:
            return tier
    return 0.0


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD token F1 between two answers after ``normalize_text``.

    >>> round(token_f1("the big red dog", "red dog"), 3)  # p = 2/3, r = 1, f1 = 2pr/(p+r) = 0.8
    0.8
    """
    pred_tokens, true_tokens = normalize_text(prediction).split(), normalize_text(truth).split()
    common = sum((Counter(pred_tokens) & Counter(true_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(true_tokens)
    return 2 * precision * recall / (precision + recall)


def _qa_tier(completion: str, truth: str) -> float:
    tagged = extract_tagged_answer(completion)
    prediction = normalize_text(tagged if tagged is not None else completion)
    gold = normalize_text(truth)
    if not prediction or not gold:
        return 0.0
    if prediction == gold:
        return 1.0
    f1 = token_f1(prediction, gold)
    # Containment is of whole words: "4" is not contained in "14".
    contained = f" {gold} " in f" {prediction} " or f" {prediction} " in f" {gold} "
    if contained or f1 > 0.75:
        return 0.7
    return 0.4 if f1 > 0.5 else 0.2 if f1 > 0.2 else 0.0


def tiered_qa_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """QA tier: exact match (normalized) -> 1.0; containment either way or token F1 > 0.75 -> 0.7;
    F1 > 0.5 -> 0.4; F1 > 0.2 -> 0.2; else 0; then the penalties. The answer is the tagged one
    when present, else the whole completion.

    >>> tiered_qa_reward(["<answer>Paris</answer>", "It is Paris, France", "x"], ["paris"] * 3)
    [1.0, 0.7, 0.0]
    """
    tiers = [_qa_tier(text, truth) for text, truth in zip(completions, answer, strict=True)]
    return _apply_penalties(tiers, kwargs)
