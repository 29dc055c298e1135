"""Reward functions: plain ``(completions, **columns) -> list[float]`` functions.

``columns`` are the task's per-example columns (always ``answer``; others such as ``entry`` or
``pass_rate`` when the task provides them); each function takes what it needs and ignores the
rest. ``REWARD_FUNCTIONS`` is the table config names resolve against; user code plugs in with an
import path, ``"my_package.my_module:my_reward"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from palaestra.plugins import lookup
from palaestra.rewards.correctness import answer_format_reward, correctness_reward, number_only_reward
from palaestra.rewards.qa import qa_f1_reward
from palaestra.rewards.tiered import (
    snap_to_tier,
    tiered_code_reward,
    tiered_math_reward,
    tiered_qa_reward,
)
from palaestra.rewards.tunix_gsm8k import (
    tunix_answer,
    tunix_approx_format,
    tunix_exact_format,
    tunix_number,
)

RewardFunction = Callable[..., list[float]]


def planner_quality_reward(completions: list[str], **columns) -> list[float]:
    """The meal-planner domain's reward, :func:`palaestra.rewards.planner.planner_quality_reward`; the
    planner package is imported on the first call only (the library does not depend on the domain)."""
    from palaestra.rewards.planner import planner_quality_reward as reward

    return reward(completions, **columns)


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "correctness": correctness_reward,
    "answer_format": answer_format_reward,
    "number_only": number_only_reward,
    "tunix_exact_format": tunix_exact_format,
    "tunix_approx_format": tunix_approx_format,
    "tunix_answer": tunix_answer,
    "tunix_number": tunix_number,
    "tiered_math": tiered_math_reward,
    "tiered_code": tiered_code_reward,
    "tiered_qa": tiered_qa_reward,
    "qa_f1": qa_f1_reward,
    "planner_quality": planner_quality_reward,
}

__all__ = [
    "REWARD_FUNCTIONS",
    "RewardFunction",
    "answer_format_reward",
    "RewardError",
    "RewardFailed",
    "checked_rewards",
    "combine_rewards",
    "correctness_reward",
    "number_only_reward",
    "planner_quality_reward",
    "qa_f1_reward",
    "resolve_reward",
    "snap_to_tier",
    "tiered_code_reward",
    "tiered_math_reward",
    "tiered_qa_reward",
    "tunix_answer",
    "tunix_approx_format",
    "tunix_exact_format",
    "tunix_number",
]


def resolve_reward(name: str) -> RewardFunction:
    """The reward function called ``name`` in ``REWARD_FUNCTIONS``, or at "package.module:function".

    ``"reward_model:<folder>"`` scores with a trained reward model (it needs a ``prompt`` column).

    >>> resolve_reward("correctness") is correctness_reward
    True
    """
    if name.startswith("reward_model:"):
        from palaestra.rewards.reward_model import reward_model_function

        return reward_model_function(name.split(":", 1)[1])
    function = lookup(name, REWARD_FUNCTIONS, "reward")
    if not callable(function):
        raise ValueError(f"reward {name!r} is not a function")
    return function


def combine_rewards(
    completions: list[str], columns: dict[str, list], weights: dict[str, float]
) -> tuple[list[float], dict[str, list[float]]]:
    """Score ``completions`` with every reward in ``weights`` and sum them, weighted.

    Returns ``(total, components)``: ``total[i] = sum over names of weights[name] *
    components[name][i]``; ``components`` holds each reward's unweighted values (to log under
    ``reward/<name>``), also for a weight of 0.

    >>> total, parts = combine_rewards(["<answer>4</answer>", "5"], {"answer": ["4", "4"]},
    ...                                {"correctness": 1.0, "answer_format": 0.5})
    >>> total, parts["answer_format"]
    ([1.5, 0.0], [1.0, 0.0])
    """
    total = [0.0] * len(completions)
    components: dict[str, list[float]] = {}
    for name, weight in weights.items():
        try:
            returned = list(resolve_reward(name)(completions, **columns))
        except Exception as error:  # user code: the command shows its traceback under this line
            raise RewardFailed(f"reward {name!r} raised on a batch of {len(completions)} completions "
                               f"({type(error).__name__}); its traceback:") from error
        components[name] = checked_rewards(name, returned, completions)
        total = [running + weight * value for running, value in zip(total, components[name])]
    return total, components


class RewardFailed(RuntimeError):
    """A reward function raised; the exception it raised is ``__cause__`` (the command prints its traceback)."""


class RewardError(ValueError):
    """A reward function returned something a reward cannot be; the message names the reward and the example."""


def checked_rewards(name: str, returned: list, completions: list[str]) -> list[float]:
    """``returned`` as floats, one finite number per completion, else a :class:`RewardError` (before any update).

    >>> checked_rewards("digits", [1, 0.5], ["a", "b"])
    [1.0, 0.5]
    >>> checked_rewards("digits", [1.0, float("nan")], ["12", "ab"])
    Traceback (most recent call last):
    ...
    palaestra.rewards.RewardError: reward 'digits' gave nan for completion 1 ('ab'); a reward must be a finite number for every completion
    """
    if len(returned) != len(completions):
        raise RewardError(f"reward {name!r} gave {len(returned)} values for {len(completions)} completions; it must "
                          "return one number per completion, in order")
    values = []
    for index, value in enumerate(returned):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise RewardError(f"reward {name!r} gave {value!r} for completion {index} ({completions[index][:80]!r}); "
                              "a reward must be a finite number for every completion")
        values.append(number)
    return values
