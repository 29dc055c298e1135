"""A user reward plugged in by import path (``task.rewards=[tests.recipes.rewards:digit_share]``).

The tiny random model never answers a question correctly, so correctness alone would give GRPO no
signal in recipe tests; the share of digits in a completion varies from sample to sample.
"""


def digit_share(completions: list[str], **columns) -> list[float]:
    """Fraction of characters that are digits.

    >>> digit_share(["a1", "22", ""])
    [0.5, 1.0, 0.0]
    """
    return [sum(ch.isdigit() for ch in text) / len(text) if text else 0.0 for text in completions]


def nan_for_the_second(completions: list[str], **columns) -> list[float]:
    """A broken reward for the tests: NaN for the second completion of every batch."""
    return [float("nan") if i == 1 else 0.0 for i in range(len(completions))]


def one_value_short(completions: list[str], **columns) -> list[float]:
    """A broken reward for the tests: one value fewer than the completions."""
    return [0.0] * (len(completions) - 1)


def raising(completions: list[str], **columns) -> list[float]:
    """A broken reward for the tests: it raises (a bug in user code)."""
    raise KeyError("answer_column_missing")


def settled_for_even_answers(completions: list[str], answer: list[str], **columns) -> list[float]:
    """1 for every completion of a prompt whose answer is even (a group with nothing to learn), else the
    completion's length in characters / 100 (different within a group): about half the groups are settled.

    >>> settled_for_even_answers(["ab", "abcd"], answer=["4", "7"])
    [1.0, 0.04]
    """
    return [1.0 if int(target) % 2 == 0 else len(text) / 100 for text, target in zip(completions, answer)]
