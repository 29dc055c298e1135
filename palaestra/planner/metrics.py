"""Task metrics for the planner domain and the offline-replay gate that uses them.

Every metric is a pure function of a predicted plan (the model's text) and the example it answers;
the hard ones re-check the plan against the catalogue, so a model cannot pass by *claiming* a cost
or pantry use. The gate follows the planner template's pass rule: hard constraints fully respected,
and quality metrics not worse than the baseline version's (soft ones within a tolerance).

Metrics and their direction:

- ``constraint_respect`` (hard, higher is better): 1 if the plan keeps every hard constraint.
- ``plan_alignment`` (higher): Jaccard overlap of predicted and accepted recipe names.
- ``edit_distance_score`` (higher): 1 - normalised Levenshtein distance of the meal sequences.
- ``diversity`` (higher, over a batch): distinct recipes / meals.
- ``leftovers`` (lower is better): fraction of pantry items the plan leaves unused.
"""

from __future__ import annotations

import json

from palaestra.planner.domain import RECIPES, household_restrictions, plan_cost, recipe_allowed

__all__ = [
    "LOWER_IS_BETTER", "SOFT_METRICS", "aggregate_planner_metrics", "constraint_respect",
    "constraint_violations", "diversity", "edit_distance_score", "leftovers", "parse_plan",
    "passes_gate", "plan_alignment",
]

SOFT_METRICS = ("plan_alignment", "edit_distance_score", "diversity", "leftovers")
LOWER_IS_BETTER = ("leftovers",)


def parse_plan(text: str) -> dict | None:
    """The first JSON object in ``text`` that looks like a plan, normalised; None if there is none.

    >>> parse_plan('Plan: {"meals":[{"recipe":"omelette"}],"cost":3}')
    {'meals': [{'recipe': 'omelette', 'pantry': []}], 'cost': 3.0}
    >>> parse_plan('{"meals": "omelette"}') is None
    True
    """
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            obj = None
        plan = _normalise(obj)
        if plan is not None:
            return plan
        start = text.find("{", start + 1)
    return None


def _normalise(obj: object) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("meals"), list):
        return None
    meals = []
    for meal in obj["meals"]:
        if not isinstance(meal, dict) or not isinstance(meal.get("recipe"), str):
            return None
        pantry = meal.get("pantry", [])
        if not isinstance(pantry, list) or not all(isinstance(p, str) for p in pantry):
            return None
        meals.append({"recipe": meal["recipe"], "pantry": list(pantry)})
    cost = obj.get("cost")
    is_number = isinstance(cost, (int, float)) and not isinstance(cost, bool)
    return {"meals": meals, "cost": float(cost) if is_number else None}


def _recipes(plan: dict) -> list[str]:
    return [meal["recipe"] for meal in plan["meals"]]


def constraint_violations(text: str, example: dict) -> list[str]:
    """Why the predicted plan breaks the example's hard constraints; empty if it keeps them all."""
    plan = parse_plan(text)
    if plan is None:
        return ["unparseable plan"]
    names, constraints = _recipes(plan), example["constraints"]
    problems = []
    if len(names) != constraints["meals"]:
        problems.append(f"{len(names)} meals, asked for {constraints['meals']}")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        problems.append(f"unknown recipes {unknown}")
    known = [n for n in names if n in RECIPES]
    restrictions = household_restrictions(example["household"])
    banned = [n for n in known if not recipe_allowed(RECIPES[n], restrictions)]
    if banned:
        problems.append(f"recipes {banned} break restrictions {restrictions}")
    slow = [n for n in known if RECIPES[n].minutes > constraints["max_minutes"]]
    if slow:
        problems.append(f"recipes {slow} take over {constraints['max_minutes']} min")
    # Cost is recomputed from the catalogue; the plan's own "cost" field is not trusted.
    cost, _ = plan_cost(known, example["pantry"], len(example["household"]["members"]))
    if cost > constraints["budget"] + 1e-9:
        problems.append(f"cost {cost} over budget {constraints['budget']}")
    return problems


def constraint_respect(text: str, example: dict) -> float:
    """1.0 if the plan keeps meal count, recipes, restrictions, time and budget; else 0.0."""
    return 0.0 if constraint_violations(text, example) else 1.0


def plan_alignment(text: str, example: dict) -> float:
    """Jaccard |P & A| / |P | A| of predicted and accepted recipe names; 0 if unparseable."""
    plan = parse_plan(text)
    if plan is None:
        return 0.0
    predicted, accepted = set(_recipes(plan)), set(_recipes(example["plan"]))
    union = predicted | accepted
    return len(predicted & accepted) / len(union) if union else 1.0


def _levenshtein(a: list[str], b: list[str]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def edit_distance_score(text: str, example: dict) -> float:
    """1 - lev(P, A) / max(|P|, |A|) over the meal-name sequences (0 if unparseable)."""
    plan = parse_plan(text)
    if plan is None:
        return 0.0
    predicted, accepted = _recipes(plan), _recipes(example["plan"])
    longest = max(len(predicted), len(accepted))
    return 1.0 - _levenshtein(predicted, accepted) / longest if longest else 1.0


def diversity(predictions: list[str]) -> float:
    """Distinct recipes / meals over all parseable predictions of a batch (0 if no meals)."""
    names = [n for text in predictions if (plan := parse_plan(text)) for n in _recipes(plan)]
    return len(set(names)) / len(names) if names else 0.0


def leftovers(text: str, example: dict) -> float:
    """Fraction of pantry items no planned recipe uses; lower is better (1 if unparseable)."""
    pantry = [item for item, qty in example["pantry"].items() if qty > 0]
    if not pantry:
        return 0.0
    plan = parse_plan(text)
    if plan is None:
        return 1.0
    used = {i for n in _recipes(plan) if n in RECIPES for i in RECIPES[n].ingredients}
    return sum(item not in used for item in pantry) / len(pantry)


def aggregate_planner_metrics(predictions: list[str], examples: list[dict]) -> dict[str, float]:
    """Mean of each per-example metric over a batch, plus ``diversity`` and ``parse_rate``."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError("no predictions to score")
    per_example = {
        "constraint_respect": constraint_respect,
        "plan_alignment": plan_alignment,
        "edit_distance_score": edit_distance_score,
        "leftovers": leftovers,
    }
    count = len(examples)
    metrics = {
        name: sum(fn(p, e) for p, e in zip(predictions, examples)) / count
        for name, fn in per_example.items()
    }
    metrics["diversity"] = diversity(predictions)
    metrics["parse_rate"] = sum(parse_plan(p) is not None for p in predictions) / count
    return metrics


def passes_gate(
    candidate: dict[str, float],
    baseline: dict[str, float] | None,
    *,
    hard: tuple[str, ...] = ("constraint_respect",),
    soft: tuple[str, ...] = SOFT_METRICS,
    soft_tolerance: float = 0.95,
    lower_is_better: tuple[str, ...] = LOWER_IS_BETTER,
) -> tuple[bool, list[str]]:
    """The offline-replay pass rule; returns (passed, reasons it failed).

    Hard metrics must equal 1.0. With a baseline, each soft metric must be within
    ``soft_tolerance`` of it: candidate >= tol * baseline when higher is better, and
    candidate <= baseline / tol when lower is better. Without a baseline only the hard rule applies.
    A soft metric the baseline lacks is not compared; one the candidate lacks fails.
    """
    reasons = []
    for name in hard:
        value = candidate.get(name)
        if value is None or value < 1.0 - 1e-9:
            reasons.append(f"hard metric {name} = {value}, must be 1.0")
    if baseline is not None:
        for name in soft:
            if name not in baseline:
                continue
            value, base = candidate.get(name), baseline[name]
            if value is None:
                reasons.append(f"soft metric {name} missing from the candidate")
            elif name in lower_is_better and value * soft_tolerance > base + 1e-12:
                reasons.append(f"{name} = {value:.4f} above baseline {base:.4f} / {soft_tolerance}")
            elif name not in lower_is_better and value < soft_tolerance * base - 1e-12:
                reasons.append(f"{name} = {value:.4f} below {soft_tolerance} x baseline {base:.4f}")
    return not reasons, reasons


PLAN_COLUMNS = ("household", "pantry", "constraints", "plan")
"""The columns a planner row carries (what the metrics read)."""


def planner_figures(predictions: list[str], rows: list[dict]) -> dict[str, float]:
    """``planner/<metric>`` of :func:`aggregate_planner_metrics` when every row is a planner row, else ``{}``:
    the ``data.metrics`` hook of conf/data/planner.yaml (PPO's held-out figures)."""
    if not rows or not all(all(k in row for k in PLAN_COLUMNS) for row in rows):
        return {}
    return {f"planner/{k}": v for k, v in aggregate_planner_metrics(predictions, rows).items()}

