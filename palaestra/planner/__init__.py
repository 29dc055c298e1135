"""The planner domain (household meal planning): a generated dataset, task metrics and the gate.

``make_planner_dataset`` writes dated chat-format splits; ``aggregate_planner_metrics`` scores a
model's plans against them; ``passes_gate`` applies the offline-replay pass rule against a baseline.
"""

from palaestra.planner.data import (
    GENERATOR_VERSION,
    RECIPES,
    SYSTEM_PROMPT,
    load_planner_split,
    make_planner_dataset,
    plan_meals,
)
from palaestra.planner.metrics import (
    LOWER_IS_BETTER,
    SOFT_METRICS,
    aggregate_planner_metrics,
    constraint_respect,
    constraint_violations,
    diversity,
    edit_distance_score,
    leftovers,
    parse_plan,
    passes_gate,
    plan_alignment,
)

__all__ = [
    "GENERATOR_VERSION",
    "LOWER_IS_BETTER",
    "RECIPES",
    "SOFT_METRICS",
    "SYSTEM_PROMPT",
    "aggregate_planner_metrics",
    "constraint_respect",
    "constraint_violations",
    "diversity",
    "edit_distance_score",
    "leftovers",
    "load_planner_split",
    "make_planner_dataset",
    "parse_plan",
    "passes_gate",
    "plan_alignment",
    "plan_meals",
]
