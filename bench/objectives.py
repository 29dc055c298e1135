"""Which RL objective to pick on a small model: the main job's task, one wall-clock budget, each objective from the same start.

    .venv/bin/python bench/objectives.py                                   # every objective, 150 s each
    .venv/bin/python bench/objectives.py --budget-s 300 --objectives grpo dapo cispo

Each objective trains in its own process through the real CLI (``palaestra run`` with the main job's
defaults: the embedded SmolLM2-135M, LoRA, chain_sum) for the same wall-clock budget
(``train.max_seconds``), from the same base weights and seed; the held-out accuracy is the main job's
(greedy, the 64 test problems) before and after. Prints a table with the steps done, seconds per step and
the accuracy, and appends it to ``bench/RESULTS.md``.
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

# name -> (the keys that choose it, the paper)
OBJECTIVES = {
    "grpo": ([], "DeepSeekMath arXiv:2402.03300"),
    "dapo": (["algo.loss_type=dapo", "algo.epsilon_high=0.28"], "arXiv:2503.14476 (token-mean loss, clip-higher)"),
    "dr_grpo": (["algo.loss_type=dr_grpo", "algo.scale_rewards=none"], "arXiv:2503.20783"),
    "cispo": (["algo.loss_type=cispo", "algo.epsilon_high=5"], "MiniMax-M1 arXiv:2506.13585"),
    "sapo": (["algo.loss_type=sapo"], "arXiv:2511.20347"),
    "gspo": (["algo.importance_sampling_level=sequence", "algo.epsilon=3e-4", "algo.epsilon_high=4e-4"],
             "arXiv:2507.18071"),
    "rloo": (["algo.advantage=rloo"], "arXiv:2402.14740"),
    "reinforce_pp": (["algo.advantage=reinforce_pp"], "arXiv:2501.03262"),
    "dynamic_sampling": (["algo.dynamic_sampling=true", "algo.loss_type=dapo", "algo.epsilon_high=0.28"],
                         "DAPO arXiv:2503.14476 (with its loss)"),
}


def run(name: str, keys: list[str], budget_s: float, extra: list[str]) -> dict:
    wall, figures, steps = budgeted_run(name, [*keys, *extra], budget_s, HERE / "out" / f"objective-{name}")
    rewards = [r["reward/mean"] for r in steps]
    tail = rewards[-10:]
    return {"objective": name, "keys": " ".join(keys) or "(defaults)", "steps": len(steps), "wall_s": wall,
            "seconds_per_step": sum(r["time/step"] for r in steps) / max(1, len(steps)),
            "before": float(figures[0]["accuracy"]), "after": float(figures[-1]["accuracy"]),
            "reward_last10": sum(tail) / max(1, len(tail))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--budget-s", type=float, default=150.0, help="training seconds per objective (evaluation apart)")
    parser.add_argument("--out", default=str(HERE / "out" / "objectives.json"))
    parser.add_argument("extra", nargs="*", help="more key=value overrides for every run")
    args = parser.parse_args()
    rows = []
    for name in args.objectives:
        rows.append(run(name, OBJECTIVES[name][0], args.budget_s, args.extra))
        row = rows[-1]
        print(f"{name}: {row['steps']} steps, {row['seconds_per_step']:.2f} s/step, accuracy {row['before']:.3f} -> "
              f"{row['after']:.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    lines = [
        f"### {date.today().isoformat()}: RL objectives on the main job's task, {args.budget_s:.0f} s of training each "
        f"({cpu_kind()}, {os.cpu_count()} CPU cores)",
        f"`python bench/objectives.py {' '.join(sys.argv[1:])}`: `palaestra run` (embedded SmolLM2-135M, LoRA, chain_sum, "
        "the default seed) with `train.max_seconds`; greedy accuracy on the 64 held-out problems before and after.", "",
        "| objective | keys | paper | steps | s/step | accuracy before | after | gain (points) | train reward, last 10 steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['objective']} | `{r['keys']}` | {OBJECTIVES[r['objective']][1]} | {r['steps']} | "
                     f"{r['seconds_per_step']:.2f} | {r['before']:.3f} | {r['after']:.3f} | "
                     f"{100 * (r['after'] - r['before']):+.1f} | {r['reward_last10']:.3f} |")
    text = "\n".join(lines)
    print(text)
    record(text)


if __name__ == "__main__":
    main()
