"""AT-GRPO on the embedded model: test success rate before and after, shared vs per-role policies.

    .venv/bin/python bench/at_grpo_team.py                                  # plan_path and sudoku
    .venv/bin/python bench/at_grpo_team.py --envs plan_path --steps 6 --budget-s 300

Each (environment, policy mode) trains in its own process through the real CLI
(``palaestra train algo=at_grpo env=... policy=...``) with a wall-clock budget, evaluating the
test seeds greedily before and after. Prints a table, writes JSON and appends to
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(env: str, mode: str, steps: int, budget_s: float, test_envs: int, extra: list[str]) -> dict:
    out_dir = HERE / "out" / f"at_grpo-{env}-{mode}"
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run: its log and metrics are this run's alone
    command = [
        sys.executable, "-m", "palaestra.cli", "train", "algo=at_grpo", f"env={env}", f"policy={mode}",
        f"train.steps={steps}", f"train.max_seconds={budget_s}", f"env.test_envs={test_envs}", "env.train_envs=2",
        "algo.samples_per_state=4", "algo.max_completion_length=64", "train.answers_per_forward=8",
        "train.learning_rate=5e-5", "train.save_interval=0", "tracking.enabled=false", f"train.output_dir={out_dir}",
        *extra,
    ]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{env}/{mode} failed:\n{result.stderr[-3000:]}")
    evals = [line for line in (out_dir / "train.log").read_text().splitlines() if " eval (" in line]
    figures = [dict(item.split("=") for item in line.split(": ", 1)[1].split()) for line in evals]
    steps_done = len((out_dir / "metrics.jsonl").read_text().splitlines())
    return {"env": env, "mode": mode, "steps": steps_done, "wall_s": wall, "command": " ".join(command[2:]),
            "before": float(figures[0]["success_rate"]), "after": float(figures[-1]["success_rate"]),
            "reward_before": float(figures[0]["reward/mean"]), "reward_after": float(figures[-1]["reward/mean"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["plan_path", "sudoku"])
    parser.add_argument("--modes", nargs="+", default=["shared", "per_role"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=360.0)
    parser.add_argument("--test-envs", type=int, default=16)
    parser.add_argument("--out", default=str(HERE / "out" / "at_grpo_team.json"))
    parser.add_argument("extra", nargs="*", help="more key=value overrides for every run")
    args = parser.parse_args()
    rows = [run(env, mode, args.steps, args.budget_s, args.test_envs, args.extra) for env in args.envs for mode in args.modes]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    lines = [
        f"### {date.today().isoformat()}: AT-GRPO, embedded SmolLM2-135M, test success before/after "
        f"({platform.machine()}, {os.cpu_count()} CPU cores)",
        f"`python bench/at_grpo_team.py {' '.join(sys.argv[1:])}`", "",
        "| env | policy | steps | wall (s) | success before | success after | mean reward before | after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['env']} | {r['mode']} | {r['steps']} | {r['wall_s']:.0f} | {r['before']:.3f} | {r['after']:.3f} "
                     f"| {r['reward_before']:.3f} | {r['reward_after']:.3f} |")
    text = "\n".join(lines)
    print(text)
    from results import record  # bench/results.py, beside this script

    record(text)


if __name__ == "__main__":
    main()
