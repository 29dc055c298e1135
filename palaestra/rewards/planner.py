"""A reward for the planner domain: the task metrics of palaestra.planner.metrics folded into one number.

The columns are those the planner dataset writes beside each row's chat messages (``household``,
``pantry``, ``constraints`` and ``plan``, the accepted plan); every metric re-checks the predicted
plan against the recipe catalogue, so a completion cannot score by *claiming* a cost or pantry use.
"""

from __future__ import annotations

from palaestra.planner.metrics import constraint_respect, edit_distance_score, leftovers, parse_plan, plan_alignment

__all__ = ["NO_PLAN_REWARD", "planner_quality_reward"]

NO_PLAN_REWARD = -1.0
"""The reward of a completion with no parseable plan: below every parseable plan's (at least -0.5)."""


def planner_quality_reward(
    completions: list[str], household: list, pantry: list, constraints: list, plan: list, **columns
) -> list[float]:
    """Score meal plans against each row's constraints and accepted plan.

    For a completion that contains a plan::

        reward = 1.0 * constraint_respect + 0.5 * plan_alignment + 0.5 * edit_distance_score - 0.5 * leftovers

    which lies in [-0.5, 2.0]; a completion with no parseable plan gets ``NO_PLAN_REWARD`` (-1.0).
    The hard constraints weigh most; closeness to the accepted plan and pantry use break ties.

    >>> row = dict(household=[{"members": [{"name": "Ana", "restrictions": []}]}],
    ...            pantry=[{"eggs": 1, "cheese": 1, "rice": 1}],
    ...            constraints=[{"meals": 1, "budget": 5, "max_minutes": 15}],
    ...            plan=[{"meals": [{"recipe": "omelette", "pantry": ["eggs", "cheese"]}], "cost": 2.0}])
    >>> columns = {key: value * 3 for key, value in row.items()}
    >>> texts = ['{"meals":[{"recipe":"omelette"}]}', '{"meals":[{"recipe":"tuna_salad"}]}', "no plan"]
    >>> [round(r, 4) for r in planner_quality_reward(texts, **columns)]
    [1.8333, 0.6667, -1.0]

    (The omelette keeps every constraint and matches the accepted plan but leaves the rice: 1 + 0.5
    + 0.5 - 0.5 / 3. The tuna salad keeps the constraints, matches nothing and leaves rice and
    cheese: 1 - 0.5 * 2 / 3.)
    """
    rewards = []
    for text, *fields in zip(completions, household, pantry, constraints, plan, strict=True):
        if parse_plan(text) is None:
            rewards.append(NO_PLAN_REWARD)
            continue
        example = dict(zip(("household", "pantry", "constraints", "plan"), fields))
        rewards.append(
            1.0 * constraint_respect(text, example)
            + 0.5 * plan_alignment(text, example)
            + 0.5 * edit_distance_score(text, example)
            - 0.5 * leftovers(text, example)
        )
    return rewards
