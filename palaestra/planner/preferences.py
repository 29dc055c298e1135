"""Planner preference pairs: the accepted plan against a plan the planner's own checks reject.

For every example the *chosen* answer is the accepted plan (the assistant message) and the
*rejected* one is that plan with one deliberate defect, picked by a seeded RNG among those that
apply to the example:

- ``restricted_recipe``: a meal swapped for a recipe the household's restrictions forbid;
- ``slow_recipe``: a meal swapped for an allowed recipe over the time limit;
- ``extra_meal`` / ``missing_meal``: one meal too many / too few;
- ``over_budget``: meals swapped for dearer allowed recipes until the plan costs more than the budget;
- ``unknown_recipe``: a dish that is not in the catalogue;
- ``wrong_cost``: the right meals with a stated cost that the catalogue does not give;
- ``invalid_json``: the plan cut off mid-way, so it does not parse.

Apart from the defect the rejected plan is honest (pantry use and cost recomputed), so a reward
model has to learn the constraint, not a formatting tell. Every rejected plan is checked with
:func:`plan_problems` (the metrics' ``constraint_violations`` plus the stated-cost check) and
never written without a problem.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from palaestra.planner.domain import RECIPES, household_restrictions, plan_cost, recipe_allowed
from palaestra.planner.metrics import constraint_violations, parse_plan

__all__ = ["CORRUPTIONS", "corrupt_plan", "make_preference_pairs", "plan_problems", "write_preference_files"]

PREFERENCE_FILES = {"train": "preferences_train.jsonl", "val": "preferences_val.jsonl"}
"""Chat split -> the preference file made from it (the test split gets none: it stays unseen)."""

_UNKNOWN_DISHES = ("mystery_casserole", "chef_special", "dragon_stew", "surprise_bake", "leftover_pie")


def _dump(plan: dict) -> str:
    return json.dumps(plan, separators=(",", ":"))


def _honest_plan(recipes: list[str], example: dict) -> dict:
    """A plan of ``recipes`` with the pantry use and cost the catalogue gives (unknown dishes cost 0)."""
    known = [r for r in recipes if r in RECIPES]
    cost, used = plan_cost(known, example["pantry"], len(example["household"]["members"]))
    pantry = iter(used)
    meals = [{"recipe": r, "pantry": next(pantry) if r in RECIPES else []} for r in recipes]
    return {"meals": meals, "cost": cost}


def _recipes(example: dict) -> list[str]:
    return [meal["recipe"] for meal in example["plan"]["meals"]]


def _swap(example: dict, rng: random.Random, candidates: list[str]) -> str | None:
    names = _recipes(example)
    candidates = [c for c in candidates if c not in names]
    if not candidates or not names:
        return None
    names[rng.randrange(len(names))] = rng.choice(candidates)
    return _dump(_honest_plan(names, example))


def _restricted_recipe(example: dict, rng: random.Random) -> str | None:
    restrictions = household_restrictions(example["household"])
    return _swap(example, rng, sorted(n for n, r in RECIPES.items() if not recipe_allowed(r, restrictions)))


def _slow_recipe(example: dict, rng: random.Random) -> str | None:
    restrictions, limit = household_restrictions(example["household"]), example["constraints"]["max_minutes"]
    return _swap(example, rng, sorted(n for n, r in RECIPES.items() if recipe_allowed(r, restrictions) and r.minutes > limit))


def _allowed(example: dict) -> list[str]:
    restrictions = household_restrictions(example["household"])
    return sorted(n for n, r in RECIPES.items() if recipe_allowed(r, restrictions, example["constraints"]["max_minutes"]))


def _extra_meal(example: dict, rng: random.Random) -> str | None:
    names = _recipes(example)
    spare = [n for n in _allowed(example) if n not in names]
    if not spare:
        return None
    names.insert(rng.randrange(len(names) + 1), rng.choice(spare))
    return _dump(_honest_plan(names, example))


def _missing_meal(example: dict, rng: random.Random) -> str | None:
    names = _recipes(example)
    if len(names) < 2:
        return None
    del names[rng.randrange(len(names))]
    return _dump(_honest_plan(names, example))


def _over_budget(example: dict, rng: random.Random) -> str | None:
    names, members = _recipes(example), len(example["household"]["members"])
    dear = sorted((n for n in _allowed(example) if n not in names), key=lambda n: (-plan_cost([n], {}, members)[0], n))
    slots = list(range(len(names)))
    rng.shuffle(slots)
    for slot, name in zip(slots, dear):  # dearest first, into random slots, until the budget breaks
        names[slot] = name
        plan = _honest_plan(names, example)
        if plan["cost"] > example["constraints"]["budget"]:
            return _dump(plan)
    return None


def _unknown_recipe(example: dict, rng: random.Random) -> str | None:
    names = _recipes(example)
    names[rng.randrange(len(names))] = rng.choice(_UNKNOWN_DISHES)
    return _dump(_honest_plan(names, example))


def _wrong_cost(example: dict, rng: random.Random) -> str | None:
    plan = json.loads(json.dumps(example["plan"]))
    true_cost = plan["cost"]
    plan["cost"] = round(max(0.0, true_cost + rng.choice([-1, 1]) * rng.choice([1.0, 2.5, 4.0, 7.5])), 2)
    if plan["cost"] == true_cost:
        plan["cost"] = round(true_cost + 3.0, 2)
    return _dump(plan)


def _invalid_json(example: dict, rng: random.Random) -> str | None:
    text = _dump(example["plan"])
    return text[: rng.randrange(len(text) // 3, len(text) - 1)]


CORRUPTIONS: dict[str, Callable[[dict, random.Random], str | None]] = {
    "restricted_recipe": _restricted_recipe,
    "slow_recipe": _slow_recipe,
    "extra_meal": _extra_meal,
    "missing_meal": _missing_meal,
    "over_budget": _over_budget,
    "unknown_recipe": _unknown_recipe,
    "wrong_cost": _wrong_cost,
    "invalid_json": _invalid_json,
}
"""Corruption name -> ``(example, rng) -> rejected plan text``, or None where it cannot apply."""


def plan_problems(text: str, example: dict) -> list[str]:
    """The planner's checks on a plan text: hard-constraint violations, then a stated cost that is wrong.

    >>> from palaestra.planner.data import make_example
    >>> example = make_example({"members": [{"name": "Ana", "restrictions": []}]}, {},
    ...                        {"meals": 1, "budget": 10, "max_minutes": 30}, {"meals": [{"recipe": "omelette", "pantry": []}], "cost": 4.5})
    >>> plan_problems('{"meals":[{"recipe":"omelette","pantry":[]}],"cost":4.5}', example)
    []
    >>> plan_problems('{"meals":[{"recipe":"omelette","pantry":[]}],"cost":2}', example)
    ['stated cost 2.0, the catalogue gives 4.5']
    """
    problems = constraint_violations(text, example)
    plan = parse_plan(text)
    if plan is not None and not problems:
        cost, _ = plan_cost([m["recipe"] for m in plan["meals"]], example["pantry"], len(example["household"]["members"]))
        if plan["cost"] is None or abs(plan["cost"] - cost) > 1e-6:
            problems.append(f"stated cost {plan['cost']}, the catalogue gives {cost}")
    return problems


def corrupt_plan(example: dict, rng: random.Random) -> tuple[str, str]:
    """``(kind, rejected text)``: a corruption drawn with ``rng`` among those that apply and break a check."""
    kinds = list(CORRUPTIONS)
    rng.shuffle(kinds)
    for kind in kinds:
        rejected = CORRUPTIONS[kind](example, rng)
        if rejected is not None and plan_problems(rejected, example):
            return kind, rejected
    raise ValueError(f"no corruption applies to the example {example['messages'][1]['content']!r}")


def make_preference_pairs(examples: list[dict], seed: int = 0) -> list[dict]:
    """One pair per example: ``{"messages": [system, user], "chosen", "rejected", "kind"}``, reproducible by ``seed``."""
    rng = random.Random(seed)
    pairs = []
    for example in examples:
        kind, rejected = corrupt_plan(example, rng)
        chosen = example["messages"][-1]["content"]
        if plan_problems(chosen, example):
            raise ValueError(f"the accepted plan breaks a check: {plan_problems(chosen, example)[0]}")
        pairs.append({"messages": example["messages"][:-1], "chosen": chosen, "rejected": rejected, "kind": kind})
    return pairs


def write_preference_files(folder: str | Path, splits: dict[str, list[dict]], seed: int = 0) -> dict[str, Path]:
    """Write ``preferences_train.jsonl`` / ``preferences_val.jsonl`` from the train / val chat splits.

    ``splits`` maps split name to its examples; only train and val make pairs (the test split is
    kept out so that no preference signal ever touches it). Each split draws from its own seeded RNG.
    """
    written = {}
    for index, (split, file_name) in enumerate(PREFERENCE_FILES.items()):
        if split not in splits:
            continue
        pairs = make_preference_pairs(splits[split], seed=seed * 1009 + index)
        path = Path(folder) / file_name
        path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
        written[split] = path
    return written
