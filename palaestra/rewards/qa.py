"""Question-answering rewards: partial credit for an answer that overlaps the gold span (SQuAD's token F1).

Exact match is all-or-nothing, so a small model that answers "the bitwise AND" for "the bitwise AND of
its arguments" earns nothing from it; token F1 gives it credit in proportion to the words it got right,
a denser signal for GRPO on open-ended answers (closed-book docs QA, ``task=docs_qa``).
"""

from __future__ import annotations

from palaestra.rewards.tiered import token_f1
from palaestra.tasks.answers import extract_tagged_answer

__all__ = ["qa_f1_reward"]


def qa_f1_reward(completions: list[str], answers: list | None = None, answer: list | None = None,
                 **columns) -> list[float]:
    """SQuAD token F1 between each completion's answer and its best accepted span, in [0, 1].

    The answer is the text of the last ``<answer>...</answer>`` block, else the whole completion; both
    sides are lower-cased, stripped of punctuation and of the articles a / an / the, and split on
    whitespace. ``answers`` (the QA task's column) holds each example's accepted spans; an example
    without them (None, e.g. in a mixture) is scored against its ``answer``.

    >>> qa_f1_reward(["<answer>lambda forms</answer>", "Lambda forms, usually.", "no idea"],
    ...              answers=[["lambda forms"]] * 3)  # the second: p = 2/3, r = 1, f1 = 0.8
    [1.0, 0.8, 0.0]
    """
    if answers is None and answer is None:
        raise ValueError("qa_f1 needs the 'answers' or 'answer' column of a QA task")
    rewards = []
    for i, completion in enumerate(completions):
        spans = (answers[i] if answers is not None else None) or ([answer[i]] if answer is not None else [])
        tagged = extract_tagged_answer(completion)
        prediction = tagged if tagged is not None else completion
        rewards.append(max((token_f1(prediction, str(span)) for span in spans), default=0.0))
    return rewards
