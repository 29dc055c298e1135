"""Unit tests for the planner domain: the generator, the dataset files, the metrics and the gate."""

import doctest
import json

import pytest

import palaestra.planner.metrics as metrics_module
from palaestra.planner import (
    RECIPES,
    aggregate_planner_metrics,
    constraint_respect,
    constraint_violations,
    diversity,
    edit_distance_score,
    leftovers,
    load_planner_split,
    make_planner_dataset,
    parse_plan,
    passes_gate,
    plan_alignment,
    plan_meals,
)
from palaestra.planner.data import RESTRICTIONS, plan_cost


def plan_text(*recipes: str, cost: float = 0.0) -> str:
    return json.dumps({"meals": [{"recipe": r, "pantry": []} for r in recipes], "cost": cost})


# ---------------------------------------------------------------- generator


def test_plan_meals_hand_worked():
    # Strictest household: vegetarian + nut_allergy + gluten_free + dairy_free, <= 30 min.
    # Allowed: chickpea_curry (30), tofu_scramble (15), coconut_tofu_rice (30).
    # Pantry {tofu, spinach}: tofu_scramble and coconut_tofu_rice both use 2 pantry items;
    #   tie -> cheaper purchase: coconut_tofu_rice buys rice 0.5 + coconut_milk 1.0 = 1.5,
    #   tofu_scramble buys mushroom 1.0 + pepper 1.0 = 2.0.
    # Meal 2, pantry now empty: chickpea_curry 1 + 0.5 + 1 + 1 + 0.5 = 4.0 < tofu_scramble 4.5.
    household = {"members": [{"name": "Ana", "restrictions": sorted(RESTRICTIONS)}]}
    pantry = {"spinach": 1, "tofu": 1}
    constraints = {"meals": 2, "budget": 5.5, "max_minutes": 30}
    plan = plan_meals(household, pantry, constraints)
    assert plan == {
        "meals": [
            {"recipe": "coconut_tofu_rice", "pantry": ["tofu", "spinach"]},
            {"recipe": "chickpea_curry", "pantry": []},
        ],
        "cost": 5.5,
    }
    # Budget 5: 1.5 + cheapest other at full price (4.0) = 5.5 > 5, and every other first
    # choice is dearer, so no plan fits.
    assert plan_meals(household, pantry, {**constraints, "budget": 5}) is None
    # Two members pay twice for what they buy: 2 * 5.5 = 11.
    two = {"members": household["members"] + [{"name": "Ben", "restrictions": []}]}
    assert plan_meals(two, pantry, {**constraints, "budget": 11})["cost"] == 11.0


def test_generator_is_deterministic(tmp_path):
    first = make_planner_dataset(tmp_path / "a", n_train=20, n_val=5, n_test=5, seed=3)
    second = make_planner_dataset(tmp_path / "b", n_train=20, n_val=5, n_test=5, seed=3)
    other = make_planner_dataset(tmp_path / "c", n_train=20, n_val=5, n_test=5, seed=4)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "manifest.json"):
        assert (first / name).read_text() == (second / name).read_text()
    assert (first / "train.jsonl").read_text() != (other / "train.jsonl").read_text()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_planner_dataset(tmp_path_factory.mktemp("root"), n_train=60, n_val=20, n_test=20)


def test_dataset_layout(dataset):
    assert dataset.parts[-3:] == ("datasets", "planner", "2026-01-15")
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 60, "val": 20, "test": 20}
    assert manifest["seed"] == 0 and manifest["generator_version"]
    users = {}
    for split, count in manifest["counts"].items():
        rows = load_planner_split(dataset, split)
        assert len(rows) == count
        for row in rows:
            assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
            assert parse_plan(row["messages"][2]["content"]) == row["plan"]
            assert {"household", "pantry", "constraints", "plan"} <= row.keys()
        users[split] = {row["messages"][1]["content"] for row in rows}
    # splits never share a prompt
    assert not (users["train"] & users["val"] or users["train"] & users["test"])
    assert not users["val"] & users["test"]


def test_accepted_plans_satisfy_constraints(dataset):
    for split in ("train", "val", "test"):
        for row in load_planner_split(dataset, split):
            plan, constraints = row["plan"], row["constraints"]
            names = [m["recipe"] for m in plan["meals"]]
            assert constraint_violations(row["messages"][2]["content"], row) == []
            # the same checks, spelt out without the metric
            assert len(names) == constraints["meals"] == len(set(names))
            banned = set().union(*(RESTRICTIONS[r] for m in row["household"]["members"]
                                   for r in m["restrictions"]))
            assert not any(RECIPES[n].flags & banned for n in names)
            assert all(RECIPES[n].minutes <= constraints["max_minutes"] for n in names)
            cost, used = plan_cost(names, row["pantry"], len(row["household"]["members"]))
            assert cost == plan["cost"] <= constraints["budget"]
            assert [m["pantry"] for m in plan["meals"]] == used
            # assistant answers stay short enough for a small model: under ~120 tokens
            assert len(row["messages"][2]["content"]) < 400


def test_load_planner_split_errors(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="planner dataset folder not found"):
        load_planner_split(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="planner split file not found"):
        load_planner_split(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_planner_split(dataset, "dev")
    with pytest.raises(ValueError):
        make_planner_dataset(tmp_path, date="15/01/2026", n_train=1, n_val=1, n_test=1)


# ---------------------------------------------------------------- metrics on a hand-made example

# Two members (Ana vegetarian, Ben nut allergy), pantry pasta, tomato x2, eggs, lentils.
# Accepted: pasta_pomodoro (pantry pasta, tomato; buys onion 0.5 + cheese 1.5 = 2.0 x 2 = 4.0)
#           omelette (pantry eggs; buys cheese 1.5 + spinach 1 + mushroom 1 = 3.5 x 2 = 7.0)
# total 11 == budget 11.
EXAMPLE = {
    "household": {"members": [{"name": "Ana", "restrictions": ["vegetarian"]},
                              {"name": "Ben", "restrictions": ["nut_allergy"]}]},
    "pantry": {"eggs": 1, "lentils": 1, "pasta": 1, "tomato": 2},
    "constraints": {"meals": 2, "budget": 11, "max_minutes": 30},
    "plan": {"meals": [{"recipe": "pasta_pomodoro", "pantry": ["pasta", "tomato"]},
                       {"recipe": "omelette", "pantry": ["eggs"]}], "cost": 11.0},
}
GOLD = plan_text("pasta_pomodoro", "omelette", cost=11)
SWAPPED = plan_text("omelette", "pasta_pomodoro", cost=11)
UNPARSEABLE = "I would cook pasta twice."


def test_parse_plan():
    assert doctest.testmod(metrics_module).failed == 0
    fenced = "Sure!\n```json\n" + GOLD + "\n```"
    assert [m["recipe"] for m in parse_plan(fenced)["meals"]] == ["pasta_pomodoro", "omelette"]
    assert parse_plan(UNPARSEABLE) is None
    assert parse_plan('{"meals": [{"dish": "omelette"}]}') is None
    assert parse_plan('{"meals": [') is None


def test_metrics_on_gold_and_swapped():
    assert constraint_respect(GOLD, EXAMPLE) == 1.0
    assert plan_alignment(GOLD, EXAMPLE) == 1.0
    assert edit_distance_score(GOLD, EXAMPLE) == 1.0
    # pantry items used: pasta, tomato, eggs; lentils unused -> 1 / 4
    assert leftovers(GOLD, EXAMPLE) == 0.25
    # same set, other order: Jaccard 1, but two substitutions -> 1 - 2 / 2 = 0
    assert plan_alignment(SWAPPED, EXAMPLE) == 1.0
    assert edit_distance_score(SWAPPED, EXAMPLE) == 0.0
    assert constraint_respect(SWAPPED, EXAMPLE) == 1.0


def test_metrics_on_a_broken_allergy():
    text = plan_text("pasta_pomodoro", "peanut_noodles")  # peanuts, and Ben has a nut allergy
    assert constraint_respect(text, EXAMPLE) == 0.0
    assert "restrictions" in constraint_violations(text, EXAMPLE)[0]
    # Jaccard {pp} / {pp, omelette, peanut_noodles} = 1 / 3;  lev = 1 -> 1 - 1 / 2 = 0.5
    assert plan_alignment(text, EXAMPLE) == pytest.approx(1 / 3)
    assert edit_distance_score(text, EXAMPLE) == 0.5
    # peanut_noodles uses pasta, peanuts, soy_sauce, carrot: eggs and lentils unused -> 2 / 4
    assert leftovers(text, EXAMPLE) == 0.5


@pytest.mark.parametrize(
    "text, reason",
    [
        (plan_text("pasta_pomodoro"), "1 meals, asked for 2"),
        (plan_text("pasta_pomodoro", "pizza"), "unknown recipes"),
        (plan_text("pasta_pomodoro", "mushroom_risotto"), "take over 30 min"),  # 45 min
        # tofu_scramble buys tofu 1.5 + spinach 1 + mushroom 1 + pepper 1 = 4.5 x 2 = 9;
        # 4 + 9 = 13 > 11, whatever the plan claims its cost is
        (plan_text("pasta_pomodoro", "tofu_scramble", cost=1), "cost 13.0 over budget 11"),
        (plan_text("pasta_pomodoro", "beef_tacos"), "break restrictions"),
        (UNPARSEABLE, "unparseable plan"),
    ],
)
def test_each_hard_constraint(text, reason):
    assert constraint_respect(text, EXAMPLE) == 0.0
    assert any(reason in problem for problem in constraint_violations(text, EXAMPLE))


def test_unparseable_plan_scores_worst():
    assert plan_alignment(UNPARSEABLE, EXAMPLE) == 0.0
    assert edit_distance_score(UNPARSEABLE, EXAMPLE) == 0.0
    assert leftovers(UNPARSEABLE, EXAMPLE) == 1.0


def test_diversity():
    # meals pp, omelette, pp, zucchini_frittata (the unparseable one adds none) -> 3 / 4
    batch = [GOLD, plan_text("pasta_pomodoro", "zucchini_frittata"), UNPARSEABLE]
    assert diversity(batch) == 0.75
    assert diversity([UNPARSEABLE]) == 0.0


def test_aggregate_planner_metrics():
    result = aggregate_planner_metrics([GOLD, SWAPPED, UNPARSEABLE], [EXAMPLE] * 3)
    # respect (1 + 1 + 0) / 3;  alignment (1 + 1 + 0) / 3;  edit (1 + 0 + 0) / 3
    # leftovers (0.25 + 0.25 + 1) / 3 = 0.5;  diversity: pp, om, om, pp -> 2 / 4;  parse 2 / 3
    assert result == pytest.approx({
        "constraint_respect": 2 / 3, "plan_alignment": 2 / 3, "edit_distance_score": 1 / 3,
        "leftovers": 0.5, "diversity": 0.5, "parse_rate": 2 / 3,
    })
    with pytest.raises(ValueError, match="2 predictions for 1 examples"):
        aggregate_planner_metrics([GOLD, GOLD], [EXAMPLE])


# ---------------------------------------------------------------- the gate

BASELINE = {"constraint_respect": 1.0, "plan_alignment": 0.8, "edit_distance_score": 0.8,
            "diversity": 0.5, "leftovers": 0.2}


def test_gate_without_baseline_checks_hard_only():
    assert passes_gate({"constraint_respect": 1.0, "plan_alignment": 0.0}, None) == (True, [])
    passed, reasons = passes_gate({"constraint_respect": 0.98}, None)
    assert not passed and "constraint_respect" in reasons[0]
    passed, reasons = passes_gate({}, None)  # a missing hard metric fails
    assert not passed and "constraint_respect" in reasons[0]


def test_gate_soft_tolerance():
    # plan_alignment floor: 0.95 * 0.8 = 0.76
    assert passes_gate({**BASELINE, "plan_alignment": 0.77}, BASELINE) == (True, [])
    passed, reasons = passes_gate({**BASELINE, "plan_alignment": 0.75}, BASELINE)
    assert not passed and reasons[0].startswith("plan_alignment")
    # a hard failure is reported even when quality improves
    passed, reasons = passes_gate({**BASELINE, "constraint_respect": 0.9, "plan_alignment": 1.0},
                                  BASELINE)
    assert not passed and len(reasons) == 1


def test_gate_leftovers_lower_is_better():
    # ceiling: 0.2 / 0.95 = 0.210526
    assert passes_gate({**BASELINE, "leftovers": 0.21}, BASELINE)[0]
    assert not passes_gate({**BASELINE, "leftovers": 0.22}, BASELINE)[0]
    # fewer leftovers than the baseline is better, not a failure
    assert passes_gate({**BASELINE, "leftovers": 0.0}, BASELINE) == (True, [])


def test_gate_missing_soft_metrics():
    candidate = {k: v for k, v in BASELINE.items() if k != "diversity"}
    passed, reasons = passes_gate(candidate, BASELINE)
    assert not passed and "diversity" in reasons[0]
    # a metric the baseline never measured is not compared
    baseline = {k: v for k, v in BASELINE.items() if k != "diversity"}
    assert passes_gate(candidate, baseline) == (True, [])


def test_overwrite_replaces_a_dataset_version_whole(tmp_path, monkeypatch):
    from palaestra.planner.cli import data_main

    monkeypatch.chdir(tmp_path)
    assert data_main(["planner", "--date", "2026-01-02", "--train", "5", "--val", "2", "--test", "2"]) == 0
    folder = tmp_path / "datasets" / "planner" / "2026-01-02"
    (folder / "stale.txt").write_text("from the old version")
    assert data_main(["planner", "--date", "2026-01-02", "--train", "6", "--val", "2", "--test", "2", "--overwrite"]) == 0
    assert len((folder / "train.jsonl").read_text().splitlines()) == 6
    assert not (folder / "stale.txt").exists()  # nothing of the old version is kept
    assert [p.name for p in folder.parent.iterdir()] == ["2026-01-02"]  # no staging or replaced folder is left
