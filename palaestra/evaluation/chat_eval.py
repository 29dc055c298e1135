"""Generation metrics on chat data: answer each row's prompt greedily, score against its reference.

A chat row is ``{"messages": [system?, user, assistant]}`` (the planner dataset adds structured
columns) or ``{"prompt": ..., "completion": ...}``. The prompt is every message before the last
assistant message, rendered with the tokenizer's chat template; the reference is that assistant
message. For ``data_name == "planner"`` the score is the planner task metrics (hard constraints
re-checked against the catalogue); for any other data it is exact match after whitespace
normalisation.

    metrics = evaluate_chat(model, tokenizer, test_rows, "planner", max_new_tokens=256)

To log what the model wrote, generate once and score the same answers::

    answers = generate_answers(model, tokenizer, rows, max_new_tokens=256, batch_size=8)
    metrics, table = chat_metrics(answers, rows, "planner"), prediction_rows(answers, rows, "planner")
"""

from __future__ import annotations

from tqdm.auto import tqdm

from palaestra.planner.metrics import (
    aggregate_planner_metrics,
    constraint_violations,
    edit_distance_score,
    leftovers,
    plan_alignment,
)
from palaestra.rollout import HFGenerator, SamplingParams

__all__ = [
    "chat_metrics", "evaluate_chat", "exact_match", "generate_answers", "normalise_whitespace", "prediction_rows",
    "prompt_messages", "reference_answer",
]

PLANNER_COLUMNS = ("household", "pantry", "constraints", "plan")
"""Columns a planner row needs besides its messages (the metrics re-check plans against them)."""


def prompt_messages(example: dict) -> list[dict]:
    """The messages the model answers: all before the last assistant message.

    >>> prompt_messages({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    [{'role': 'user', 'content': 'hi'}]
    >>> prompt_messages({"prompt": "2+2?", "completion": "4"})
    [{'role': 'user', 'content': '2+2?'}]
    """
    if "messages" in example:
        messages = example["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        return [dict(m) for m in messages[:last]]
    prompt = example["prompt"]
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def reference_answer(example: dict) -> str:
    """The accepted answer: the last assistant message, or the ``completion`` column."""
    if "messages" in example:
        answers = [m["content"] for m in example["messages"] if m["role"] == "assistant"]
        return answers[-1] if answers else ""
    completion = example.get("completion", "")
    return completion if isinstance(completion, str) else completion[-1]["content"]


def normalise_whitespace(text: str) -> str:
    """Runs of whitespace -> one space, ends stripped.

    >>> normalise_whitespace("  a\\n  b\\tc ")
    'a b c'
    """
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the texts are equal up to whitespace, else 0.0."""
    return float(normalise_whitespace(prediction) == normalise_whitespace(reference))


def generate_answers(
    model,
    tokenizer,
    examples: list[dict],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    *,
    max_prompt_length: int = 4096,
    precision: str = "fp32",
    show_progress: bool = False,
) -> list[str]:
    """Greedy answers to each row's prompt, ``batch_size`` prompts at a time (left-padded).

    Prompts longer than ``max_prompt_length`` tokens keep their last tokens; ``precision="bf16"``
    decodes under bf16 autocast. The model goes back to the train/eval mode it was in and the
    tokenizer to its padding side, so this can run in the middle of training.
    """
    if batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be positive")
    padding_side = tokenizer.padding_side
    generator = HFGenerator(model, tokenizer, max_prompt_length=max_prompt_length, precision=precision)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    answers: list[str] = []
    starts = range(0, len(examples), batch_size)
    try:
        with generator.reusing_weights():
            for start in tqdm(starts, desc="generate", disable=not show_progress, leave=False):
                chunk = examples[start : start + batch_size]
                answers.extend(generator.generate([prompt_messages(e) for e in chunk], 1, sampling).texts)
    finally:
        tokenizer.padding_side = padding_side
    return answers


def _check_planner_rows(examples: list[dict]) -> None:
    for index, example in enumerate(examples):
        missing = [c for c in PLANNER_COLUMNS if c not in example]
        if missing:
            raise ValueError(f"planner row {index} lacks the columns {missing} that the planner metrics read")


def chat_metrics(predictions: list[str], examples: list[dict], data_name: str) -> dict[str, float]:
    """Task metrics of ``predictions``: the planner metrics for planner data, else ``exact_match``."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError("no examples to score")
    if data_name == "planner":
        _check_planner_rows(examples)
        return aggregate_planner_metrics(predictions, examples)
    matches = [exact_match(p, reference_answer(e)) for p, e in zip(predictions, examples)]
    return {"exact_match": sum(matches) / len(matches)}


def prediction_rows(predictions: list[str], examples: list[dict], data_name: str) -> list[dict]:
    """One row per example for an MLflow table: prompt, reference, prediction and its scores."""
    rows = []
    for index, (prediction, example) in enumerate(zip(predictions, examples)):
        prompt = prompt_messages(example)
        row = {"index": index, "prompt": prompt[-1]["content"] if prompt else "",
               "reference": reference_answer(example), "prediction": prediction}
        if data_name == "planner":
            problems = constraint_violations(prediction, example)
            row.update(constraint_respect=float(not problems), violations="; ".join(problems),
                       plan_alignment=plan_alignment(prediction, example),
                       edit_distance_score=edit_distance_score(prediction, example),
                       leftovers=leftovers(prediction, example))
        else:
            row["exact_match"] = exact_match(prediction, row["reference"])
        rows.append(row)
    return rows


def evaluate_chat(
    model,
    tokenizer,
    examples: list[dict],
    data_name: str,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    rows: list | None = None,
    precision: str = "fp32",
    show_progress: bool = False,
) -> dict[str, float]:
    """Generate greedy answers for ``examples`` and return their task metrics.

    If ``rows`` is a list, one row per example (see ``prediction_rows``) is appended to it, so a
    caller can log the predictions without generating twice.
    """
    answers = generate_answers(model, tokenizer, examples, max_new_tokens, batch_size, precision=precision,
                               show_progress=show_progress)
    if rows is not None:
        rows.extend(prediction_rows(answers, examples, data_name))
    return chat_metrics(answers, examples, data_name)
