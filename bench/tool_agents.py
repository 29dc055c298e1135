"""Do tools pay on a small model? Before/after runs of tool-calling GRPO on the embedded model, one wall-clock budget each.

    .venv/bin/python bench/tool_agents.py                       # the three runs, 600 s of training each
    .venv/bin/python bench/tool_agents.py --budget-s 120 --runs large_sum_calculator

Each run trains through the real CLI (``palaestra run``: the embedded SmolLM2-135M, LoRA, greedy evaluation on
the held-out problems before and after) for ``train.max_seconds``:

- ``large_sum_plain``: two-term sums of 5-digit numbers (``task=large_sum``), no tools: the baseline;
- ``large_sum_calculator``: the same task with ``agent.tools=[calculator]``;
- ``docs_qa_search``: questions on Python's documentation asked without their passage (``task=docs_qa``), with
  ``agent.tools=[search]`` over the shipped docs index, scored by answer F1 (``qa_f1``).

Prints a table (steps, s/step, accuracy and the task's reward before and after, the share of evaluation episodes
that called a tool before and after, and of training episodes over the last 10 steps) and appends it to
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date
from pathlib import Path

from results import budgeted_run, cpu_kind, record  # bench/results.py, beside this script

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

COMMON = ["algo.max_completion_length=32", "agent.max_turns=2"]
RUNS = {
    "large_sum_plain": ["task=large_sum", "algo.max_completion_length=32"],
    "large_sum_calculator": ["task=large_sum", "agent.tools=[calculator]", *COMMON],
    "docs_qa_search": ["task=docs_qa", "agent.tools=[search]", "algo.max_completion_length=64", "agent.max_turns=1"],
}


def run(name: str, keys: list[str], budget_s: float, extra: list[str]) -> dict:
    wall, figures, steps = budgeted_run(name, [*keys, *extra], budget_s, HERE / "out" / f"tool-agent-{name}")
    before, after = figures[0], figures[-1]
    return {"run": name, "keys": " ".join(keys), "steps": len(steps), "wall_s": wall,
            "seconds_per_step": sum(r["time/step"] for r in steps) / max(1, len(steps)),
            "accuracy": (float(before["accuracy"]), float(after["accuracy"])),
            "reward": (float(before["mean_reward"]), float(after["mean_reward"])),
            "tool_used": (float(before.get("tool/used_share", 0)), float(after.get("tool/used_share", 0))),
            "train_tool_used_last10": _mean([r.get("tool/used_share", 0.0) for r in steps][-10:])}


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--budget-s", type=float, default=600.0, help="training seconds per run (evaluation apart)")
    parser.add_argument("--out", default=str(HERE / "out" / "tool_agents.json"))
    parser.add_argument("extra", nargs="*", help="more key=value overrides for every run")
    args = parser.parse_args()
    rows = []
    for name in args.runs:
        rows.append(run(name, RUNS[name], args.budget_s, args.extra))
        row = rows[-1]
        print(f"{name}: {row['steps']} steps, {row['seconds_per_step']:.2f} s/step, accuracy {row['accuracy'][0]:.3f} -> "
              f"{row['accuracy'][1]:.3f}, reward {row['reward'][0]:.3f} -> {row['reward'][1]:.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    lines = [
        f"### {date.today().isoformat()}: tool-calling agents, {args.budget_s:.0f} s of training each "
        f"({cpu_kind()}, {os.cpu_count()} CPU cores)",
        f"`python bench/tool_agents.py {' '.join(sys.argv[1:])}`: `palaestra run` (embedded SmolLM2-135M, LoRA, the "
        "default seed) with `train.max_seconds`; greedy evaluation on the held-out problems before and after "
        "(large_sum: 64 problems, accuracy; docs_qa: 12 questions, reward = answer F1).", "",
        "| run | keys | steps | s/step | accuracy before | after | gain (points) | reward before | after | "
        "eval episodes calling a tool, before | after | training episodes calling a tool, last 10 steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | `{r['keys']}` | {r['steps']} | {r['seconds_per_step']:.2f} | {r['accuracy'][0]:.3f} | "
                     f"{r['accuracy'][1]:.3f} | {100 * (r['accuracy'][1] - r['accuracy'][0]):+.1f} | {r['reward'][0]:.3f} | "
                     f"{r['reward'][1]:.3f} | {r['tool_used'][0]:.2f} | {r['tool_used'][1]:.2f} | "
                     f"{r['train_tool_used_last10']:.2f} |")
    text = "\n".join(lines)
    print(text)
    record(text)


if __name__ == "__main__":
    main()
