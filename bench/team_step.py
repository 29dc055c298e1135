"""Tokens/s of an AT-GRPO team step next to a GRPO step on the same model, prompts and answer lengths.

    .venv/bin/python bench/team_step.py                 # GRPO, AT-GRPO shared, AT-GRPO per_role
    .venv/bin/python bench/team_step.py --steps 4 --tokens 16

The same work per step for each: 64 answers of exactly ``--tokens`` tokens (the prompts ask for long
answers, so every answer runs to the cap), sampled at temperature 1.0 from the embedded
SmolLM2-135M-Instruct with LoRA r=16 on all linear layers, trained in micro-batches of 8, beta 0.

- GRPO: 16 prompts x 4 samples, one generate call per step, one policy.
- AT-GRPO: :class:`CountingTeamEnv`, two agents (writer, checker) x 2 turns x 4 problems x K = 4
  branches: four generate calls of 16 rows per step (one per turn and agent); ``policy=shared`` trains
  one adapter, ``policy=per_role`` one adapter per agent over the same base (two optimizer steps).
  Both agents see the same prompt as GRPO (the checker is not shown the writer's answer), so the
  difference is the team machinery alone.

Each run trains through the real CLI in its own process; the first step is a warm-up and is not
counted. Reports completion tokens/s (tokens over the measured steps' wall time), each run's time
split and the ratio GRPO/team. Prints a table, writes JSON and appends to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from palaestra.envs import MultiAgentEnv, StepResult  # noqa: E402

QUESTIONS = 200


def question(index: int) -> str:
    """A prompt whose answer is longer than any cap the bench uses."""
    start = 3 + (index * 7) % 90
    return f"Count from {start} to {start + 40}, writing every number in words, one per line."


class CountingTeamEnv(MultiAgentEnv):
    """Two agents, a writer then a checker, answer the same counting prompt for ``max_turns`` turns.

    The reward (share of digits in the answer) only gives the groups some spread; the bench measures speed.
    """

    turn_order = ("writer", "checker")

    def __init__(self, max_turns: int = 2):
        self.max_turns = max_turns
        self.turn, self.text = 0, ""

    def reset(self, seed: int) -> None:
        self.turn, self.text = 0, question(seed % QUESTIONS)

    def observation(self, agent: str) -> list[dict]:
        return [{"role": "user", "content": self.text}]

    def step(self, agent: str, action: str) -> StepResult:
        share = sum(ch.isdigit() for ch in action) / max(1, len(action))
        if agent == self.turn_order[-1]:
            self.turn += 1
        return StepResult(local_reward=share, team_reward=0.0, done=self.done, info={})

    def copy(self) -> "CountingTeamEnv":
        return copy.deepcopy(self)

    @property
    def success(self) -> bool:
        return False

    @property
    def done(self) -> bool:
        return self.turn >= self.max_turns


COMMON = ["train.learning_rate=5e-5", "train.lr_schedule=constant", "train.save_interval=0",
          "tracking.enabled=false", "model.lora.target_modules=all-linear", "algo.temperature=1.0", "algo.beta=0.0"]


def commands(tokens: int, steps: int, data: Path) -> dict[str, list[str]]:
    grpo = ["algo=grpo", "task.source=gsm8k", "task.name=counting", f"task.path={data}", f"task.test_path={data}",
            "task.instruction=''", "task.test_size=4", "eval.max_examples=4", "train.eval_interval=0",
            "train.completions_per_step=64", "train.completions_per_forward=8", "algo.num_generations=4", f"algo.max_completion_length={tokens}", f"train.steps={steps}"]
    team = ["algo=at_grpo", "env=math", "env.name=bench.team_step:CountingTeamEnv", "+env.params.max_turns=2",
            "env.train_envs=4", "env.test_envs=1", "algo.samples_per_state=4", "train.answers_per_forward=8", f"algo.max_completion_length={tokens}",
            f"train.steps={steps}"]
    return {"grpo": grpo, "at_grpo shared": [*team, "policy=shared"], "at_grpo per_role": [*team, "policy=per_role"]}


def run(name: str, overrides: list[str]) -> dict:
    out_dir = HERE / "out" / f"team_step-{name.replace(' ', '-')}"
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [sys.executable, "-m", "palaestra.cli", "train", *overrides, *COMMON, f"train.output_dir={out_dir}"]
    with open(out_dir.parent / f"{out_dir.name}.log", "w") as log:  # a full pipe would stall training
        result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if result.returncode != 0:
        raise SystemExit(f"{name} failed: see {log.name}")
    steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()][1:]  # step 1 warms up
    seconds = sum(s["time/step"] for s in steps)
    tokens = sum(s["tokens_per_second"] * s["time/step"] for s in steps)
    parts = sorted({key for s in steps for key in s if key.startswith("time/") and key != "time/step"})
    return {"name": name, "steps": len(steps), "seconds_per_step": seconds / len(steps), "tokens_per_step": tokens / len(steps),
            "tokens_per_second": tokens / seconds, "split": {p[5:]: sum(s.get(p, 0.0) for s in steps) / len(steps) for p in parts},
            "command": "palaestra train " + " ".join([*overrides, *COMMON])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per run (the first is a warm-up)")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per answer (every answer runs to it)")
    parser.add_argument("--only", nargs="+", choices=["grpo", "shared", "per_role"], default=["grpo", "shared", "per_role"])
    parser.add_argument("--out", default=str(HERE / "out" / "team_step.json"))
    args = parser.parse_args()
    data = HERE / "out" / "counting.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"question": question(i), "answer": "#### 0"}) + "\n" for i in range(QUESTIONS)))
    rows = [run(name, overrides) for name, overrides in commands(args.tokens, args.steps, data).items()
            if name.split()[-1] in args.only]
    Path(args.out).write_text(json.dumps(rows, indent=2))
    grpo = next((r for r in rows if r["name"] == "grpo"), None)
    lines = [
        f"### {date.today().isoformat()}: AT-GRPO team step vs GRPO step, tokens/s ({platform.machine()}, {os.cpu_count()} CPU cores)",
        f"`python bench/team_step.py {' '.join(sys.argv[1:])}` (64 answers of {args.tokens} tokens per step, "
        f"{args.steps - 1} measured steps each)", "",
        "| run | s/step | tokens/step | tokens/s | GRPO tokens/s / this | time split (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{grpo['tokens_per_second'] / r['tokens_per_second']:.2f}x" if grpo else "-"
        split = ", ".join(f"{k} {v:.2f}" for k, v in r["split"].items() if v >= 0.005)
        lines.append(f"| {r['name']} | {r['seconds_per_step']:.2f} | {r['tokens_per_step']:.0f} | {r['tokens_per_second']:.1f} "
                     f"| {ratio} | {split} |")
    text = "\n".join(lines)
    print(text)
    from results import record  # bench/results.py, beside this script

    record(text)


if __name__ == "__main__":
    main()
