"""The planner domain's data: a small recipe catalogue and a generator of meal-planning examples.

An example is a household (members and their dietary restrictions), a pantry (ingredients with
quantities) and constraints (number of meals, budget, time limit per meal), with the *accepted plan*
a careful planner would write: distinct catalogue recipes that respect every restriction, the
budget and the time limit, using pantry items first. Plans are short JSON so a small model can
learn them on a CPU.

Cost model: one unit of each ingredient feeds the whole household for one meal. A pantry unit is
free; a bought unit costs its price per member. ``make_planner_dataset`` writes dated folders
(``datasets/planner/YYYY-MM-DD/``) as the planner template's offline replay expects.
"""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

from palaestra.planner.domain import (  # noqa: F401 - the catalogue is part of this module's API
    INGREDIENTS, RECIPES, RESTRICTIONS, Recipe, household_restrictions, plan_cost, recipe_allowed,
)

__all__ = [
    "GENERATOR_VERSION", "INGREDIENTS", "RECIPES", "RESTRICTIONS", "SPLITS", "SYSTEM_PROMPT",
    "Recipe", "household_restrictions", "load_planner_split", "make_example",
    "make_planner_dataset", "plan_cost", "plan_meals", "recipe_allowed",
]

GENERATOR_VERSION = "1"
SPLITS = ("train", "val", "test")

SYSTEM_PROMPT = (
    "You plan household meals from the house recipe catalogue. Respect every dietary restriction, "
    "the meal count, the budget and the time limit; use pantry items first. Answer with compact "
    'JSON: {"meals":[{"recipe":NAME,"pantry":[ITEMS USED]}],"cost":TOTAL}.'
)
_NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana")


def plan_meals(household: dict, pantry: dict[str, int], constraints: dict) -> dict | None:
    """The accepted plan: greedy on pantry use, cheapest first on ties; None if none fits."""
    members, meals = len(household["members"]), constraints["meals"]
    restrictions = household_restrictions(household)
    options = sorted(r for r, rec in RECIPES.items()
                     if recipe_allowed(rec, restrictions, constraints["max_minutes"]))
    full_price = {o: plan_cost([o], {}, members)[0] for o in options}
    chosen: list[str] = []
    for slot in range(meals):
        spent, _ = plan_cost(chosen, pantry, members)
        best = None
        for name in options:
            if name in chosen:
                continue
            cost, used = plan_cost([*chosen, name], pantry, members)
            # The rest of the plan must still fit: the cheapest other options at full price.
            # Full prices are an upper bound, so passing this check means the plan can be finished.
            rest = sorted(p for o, p in full_price.items() if o not in chosen and o != name)
            need = meals - slot - 1
            if len(rest) < need or cost + sum(rest[:need]) > constraints["budget"]:
                continue
            key = (-len(used[-1]), cost - spent, name)
            best = key if best is None or key < best else best
        if best is None:
            return None
        chosen.append(best[2])
    cost, used = plan_cost(chosen, pantry, members)
    return {"meals": [{"recipe": r, "pantry": u} for r, u in zip(chosen, used)], "cost": cost}


def _sample_input(rng: random.Random) -> tuple[dict, dict[str, int], dict]:
    members = []
    for name in sorted(rng.sample(_NAMES, rng.randint(1, 4))):
        roll = rng.random()
        count = 0 if roll < 0.55 else 1 if roll < 0.9 else 2
        restrictions = sorted(rng.sample(sorted(RESTRICTIONS), count))
        members.append({"name": name, "restrictions": restrictions})
    household = {"members": members}
    meals = rng.randint(2, 4)
    constraints = {"meals": meals, "budget": round(len(members) * meals * rng.uniform(2.0, 6.0)),
                   "max_minutes": rng.choice([20, 30, 45, 60])}
    # Stock the pantry partly from recipes the household can eat, so using it is a real choice.
    allowed = [r for r in RECIPES.values() if recipe_allowed(r, household_restrictions(household))]
    stock = {i for r in rng.sample(allowed, min(2, len(allowed))) for i in r.ingredients
             if rng.random() < 0.6}
    stock |= set(rng.sample(sorted(INGREDIENTS), rng.randint(1, 3)))
    pantry = {i: rng.randint(1, 2) for i in sorted(stock)}
    return household, pantry, constraints


def _user_text(household: dict, pantry: dict[str, int], constraints: dict) -> str:
    people = ", ".join(
        m["name"] + (f" ({', '.join(m['restrictions'])})" if m["restrictions"] else "")
        for m in household["members"]
    )
    stock = ", ".join(f"{item} x{qty}" for item, qty in pantry.items())
    return (f"Household: {people}\nPantry: {stock}\nConstraints: {constraints['meals']} meals, "
            f"budget {constraints['budget']}, max {constraints['max_minutes']} min per meal")


def make_example(household: dict, pantry: dict[str, int], constraints: dict, plan: dict) -> dict:
    """One dataset row: chat messages plus the structured columns the metrics read."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": _user_text(household, pantry, constraints)},
            {"role": "assistant", "content": json.dumps(plan, separators=(",", ":"))},
        ],
        "household": household, "pantry": pantry, "constraints": constraints, "plan": plan,
    }


def make_planner_dataset(root: Path, date: str = "2026-01-15", n_train: int = 400, n_val: int = 50,
                         n_test: int = 50, seed: int = 0, *, preferences: bool = True) -> Path:
    """Write ``root/datasets/planner/<date>/{train,val,test}.jsonl`` and ``manifest.json``.

    No two examples share a user message, so the splits never overlap. With ``preferences`` also
    ``preferences_train.jsonl`` and ``preferences_val.jsonl``: one (accepted plan, corrupted plan)
    pair per train / val example (``palaestra.planner.preferences``; none from test). Returns the
    dated folder.
    """
    datetime.date.fromisoformat(date)  # a clear ValueError for anything but YYYY-MM-DD
    counts = {"train": n_train, "val": n_val, "test": n_test}
    total = sum(counts.values())
    rng, seen, rows = random.Random(seed), set(), []
    for _ in range(50 * (total + 10)):
        if len(rows) == total:
            break
        household, pantry, constraints = _sample_input(rng)
        plan = plan_meals(household, pantry, constraints)
        example = None if plan is None else make_example(household, pantry, constraints, plan)
        if example is not None and example["messages"][1]["content"] not in seen:
            seen.add(example["messages"][1]["content"])
            rows.append(example)
    if len(rows) < total:
        raise RuntimeError(f"could not generate {total} distinct planner examples")
    folder = Path(root) / "datasets" / "planner" / date
    folder.mkdir(parents=True, exist_ok=True)
    ends = {"train": n_train, "val": n_train + n_val, "test": total}
    chunks = {split: rows[ends[split] - counts[split] : ends[split]] for split in SPLITS}
    for split, chunk in chunks.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chunk))
    if preferences:
        from palaestra.planner.preferences import write_preference_files  # it reads the domain, not this module

        write_preference_files(folder, {"train": chunks["train"], "val": chunks["val"]}, seed=seed)
    manifest = {"task": "planner", "date": date, "seed": seed, "counts": counts,
                "generator_version": GENERATOR_VERSION, "recipes": len(RECIPES)}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def load_planner_split(folder: Path | str, split: str) -> list[dict]:
    """Read one split of a dated planner folder; a clear one-line error if it is missing."""
    folder = Path(folder)
    if split not in SPLITS:
        raise ValueError(f"planner split must be one of {SPLITS}, got {split!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"planner dataset folder not found: {folder}")
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"planner split file not found: {path}")
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
