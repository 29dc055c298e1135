"""The workflow trainer on the embedded model: held-out workflow figures before and after training.

    .venv/bin/python bench/aflow_pipeline.py                  # base -> SFT warm start -> GRPO, about 6 minutes
    .venv/bin/python bench/aflow_pipeline.py --grpo-steps 30

Runs, through the real CLI, in ``bench/out/aflow``:

1. ``palaestra eval experiment=aflow`` on the embedded SmolLM2-135M-Instruct as it ships (the base);
2. ``palaestra pipeline aflow``: demonstration workflows for the training problems, SFT on them (the
   operator interface), then GRPO on the workflow reward (``experiment=aflow``, the embedded model as
   the executor);
3. ``palaestra eval experiment=aflow`` on the SFT model and on the GRPO model.

Every evaluation is greedy on the same held-out problems (``--test-size`` of the math / QA / code
mixture) with an empty experience buffer, so the three differ by the policy alone. Prints, per
domain, the validity rate, the mean tier reward (after penalties), the operator-domain match rate,
the fallback share and the executed accuracy, with the wall time of each part; writes JSON and
appends the table to ``bench/RESULTS.md``.
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
FIGURES = ("validity_rate", "mean_reward", "operator_match_rate", "share/fallback", "accuracy")
DOMAINS = ("math", "qa", "code", "all")


def palaestra(arguments: list[str], work: Path, log_name: str) -> tuple[str, float]:
    """Run one palaestra command in ``work``; its output (also kept in ``log_name``) and wall seconds."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "palaestra.cli", *arguments], cwd=work, capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    (work / log_name).write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"palaestra {' '.join(arguments)} failed: see {work / log_name}")
    return result.stdout, time.perf_counter() - started


def workflow_figures(stdout: str) -> dict[str, float]:
    """The ``workflow/<domain>/<figure> value`` lines of ``palaestra eval``."""
    figures = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith("workflow/"):
            figures[parts[0][len("workflow/"):]] = float(parts[1])
    if not figures:
        raise SystemExit("palaestra eval printed no workflow figures")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=120, help="training problems of the mixture (with repeats)")
    parser.add_argument("--test-size", type=int, default=12, help="held-out problems evaluated")
    parser.add_argument("--grpo-steps", type=int, default=20)
    parser.add_argument("--out", default=str(HERE / "out" / "aflow.json"))
    args = parser.parse_args()
    work = HERE / "out" / "aflow"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    task = [f"task.train_size={args.train_size}", f"task.test_size={args.test_size}", f"eval.max_examples={args.test_size}"]
    pipeline = ["pipeline", "aflow", *task, f"grpo.train.steps={args.grpo_steps}", "grpo.train.completions_per_step=8",
                "grpo.train.eval_interval=0", "pipeline.output_dir=pipe"]

    results, seconds = {}, {}
    stdout, seconds["base eval"] = palaestra(["eval", "experiment=aflow", *task], work, "eval-base.log")
    results["base"] = workflow_figures(stdout)
    _, seconds["pipeline"] = palaestra(pipeline, work, "pipeline.log")
    stages = {s["stage"]: s for s in json.loads((work / "pipe" / "history.json").read_text())["stages"]}
    seconds.update({f"  {name}": stage["seconds"] for name, stage in stages.items()})
    for name in ("sft", "grpo"):
        model = stages[name]["outputs"]["model_dir"]
        stdout, seconds[f"{name} eval"] = palaestra(["eval", "experiment=aflow", "model=hf", f"model.path={model}", *task],
                                                    work, f"eval-{name}.log")
        results[f"after {name}"] = workflow_figures(stdout)
    Path(args.out).write_text(json.dumps({"figures": results, "seconds": seconds}, indent=2))

    columns = list(results)
    command = " ".join(["python", "bench/aflow_pipeline.py", *sys.argv[1:]])
    lines = [
        f"### {date.today().isoformat()}: the workflow trainer on the embedded model ({platform.machine()}, "
        f"{os.cpu_count()} CPU cores)",
        f"`{command}`: `palaestra eval experiment=aflow` on the base, then "
        f"`palaestra {' '.join(pipeline)}`, then the same evaluation on its SFT and GRPO models "
        f"({args.test_size} held-out problems, greedy; the 135M model is also the executor)", "",
        f"| figure | domain | {' | '.join(columns)} |", "|---|---|" + "---|" * len(columns),
    ]
    for figure in FIGURES:
        for domain in DOMAINS:
            key = f"{domain}/{figure}"
            values = [f"{results[c][key]:.3f}" if key in results[c] else "-" for c in columns]  # no operators: no match rate
            lines.append(f"| {figure} | {domain} | {' | '.join(values)} |")
    lines += ["", "Wall time: " + ", ".join(f"{name.strip()} {value:.0f} s" for name, value in seconds.items()) + "."]
    text = "\n".join(lines)
    print(text)
    from results import record  # bench/results.py, beside this script

    record(text)


if __name__ == "__main__":
    main()
