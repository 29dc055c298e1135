"""Memory over long runs: resident memory per step for GRPO and AT-GRPO, and the main job beside TRL.

    .venv/bin/pip install -e ".[bench]"            # TRL is a benchmark-only extra
    .venv/bin/python bench/memory.py               # 200 GRPO steps, 25 AT-GRPO steps, main job vs TRL
    .venv/bin/python bench/memory.py --parts grpo,at_grpo --grpo-steps 40 --team-steps 25

1. GRPO: ``palaestra train`` with the main job's training settings (embedded SmolLM2-135M, LoRA r16
   on all linear layers, 4 prompts x 8 samples, 24 tokens; tracking off, no checkpoints) for
   ``--grpo-steps`` steps. Every step logs ``memory/rss_mb`` and ``memory/peak_rss_mb``; the growth
   of the peak from step 20 to the end is the figure to watch (the target: under 5%).
2. AT-GRPO: ``palaestra train algo=at_grpo env=plan_path policy=per_role`` for ``--team-steps``
   (4 environments x 4 samples x 2 agents, answers of up to 16 tokens; evaluations before and after).
3. The main job as a user runs it (``palaestra run``: evaluation, 50 GRPO steps with MLflow tracking,
   evaluation), its peak RSS from the operating system, beside TRL's ``GRPOTrainer`` on the same
   settings (4 prompts x 8 generations in micro-batches of 8, 24 tokens, LoRA r16 all linear, lr 1e-4
   cosine, beta 0, temperature 0.8) for ``--trl-steps`` steps and the same held-out evaluation.
   TRL runs with ``bf16=False``, its faster setting on these settings on this kind of CPU (with
   ``bf16=True`` its step took 22-26 s against about 16 s); ``--trl-bf16`` measures the other.

Prints a table, draws ``bench/out/memory.png`` (RSS per step) and appends an entry to
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
OUT = HERE / "out"
MAIN_JOB_AS_TRL = dict(prompts=4, generations=8, micro_batch=8, max_tokens=24, lora_targets="all-linear", beta=0.0,
                       lr=1e-4, temperature=0.8, schedule="cosine")
TEAM_SETTINGS = ["algo.max_completion_length=16"]
QUIET = ["tracking.enabled=false", "train.save_interval=0", "train.log_samples_interval=0"]


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))


def _train(name: str, overrides: list[str], reuse: bool = False) -> list[dict]:
    """Run ``palaestra train`` in its own process; return its per-step records (``reuse``: read those
    of an earlier complete run of this part instead of training again)."""
    out_dir = OUT / f"memory-{name}"
    if reuse and (out_dir / "metrics.jsonl").is_file():
        print(f"{name}: reusing {out_dir / 'metrics.jsonl'}", flush=True)
        return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [sys.executable, "-m", "palaestra.cli", "train", *overrides, *QUIET, f"train.output_dir={out_dir}"]
    print(f"running {name}: palaestra {' '.join(command[3:])}", flush=True)
    subprocess.run(command, cwd=ROOT, env=_env(), check=True)
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _growth(records: list[dict], key: str, after_step: int = 20) -> dict:
    """The figure at ``after_step`` and at the end, and the relative growth between them."""
    values = {r["step"]: r[key] for r in records}
    start = values[min(after_step, max(values))]
    end = values[max(values)]
    return {"at_step": min(after_step, max(values)), "start_mb": start, "end_mb": end, "growth": end / start - 1,
            "steps": max(values)}


def _main_job() -> dict:
    """``palaestra run`` in a scratch folder; peak RSS from the kernel's accounting of the child."""
    work = OUT / "memory-main-job"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print("running the main job: palaestra run", flush=True)
    started = time.perf_counter()
    with open(work / "stdout.txt", "w") as stdout:
        process = subprocess.Popen([sys.executable, "-m", "palaestra.cli", "run"], cwd=work, env=_env(), stdout=stdout)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"palaestra run failed with exit code {process.returncode}")
    table = [line.split() for line in (work / "stdout.txt").read_text().splitlines() if line.startswith("accuracy ")]
    accuracy = {"before": float(table[0][1]), "after": float(table[0][2])} if table else {}
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - started, "accuracy": accuracy}


def _trl(steps: int, bf16: bool, reuse: bool = False) -> dict:
    out = OUT / "memory-trl.json"
    if reuse and out.is_file():
        print(f"trl: reusing {out}", flush=True)
        return json.loads(out.read_text())
    command = [sys.executable, __file__, "--worker", "--trl-steps", str(steps), *(["--trl-bf16"] if bf16 else [])]
    print(f"running TRL GRPOTrainer for {steps} steps (bf16={bf16}) ...", flush=True)
    subprocess.run(command, cwd=ROOT, env=_env(), check=True)
    return json.loads(out.read_text())


def _trl_worker(steps: int, bf16: bool) -> None:
    sys.path.insert(0, str(HERE))
    from grpo_vs_trl import run_trl

    result = run_trl({**MAIN_JOB_AS_TRL, "bf16": bf16}, steps, 0.0, evaluate=True)
    (OUT / "memory-trl.json").write_text(json.dumps(result))


def _plot(series: dict[str, list[tuple[int, float]]]) -> Path:
    from palaestra.tracking import plot_curves

    return plot_curves(series, OUT / "memory.png", title="Resident memory per training step", ylabel="MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpo-steps", type=int, default=200)
    parser.add_argument("--team-steps", type=int, default=25)
    parser.add_argument("--trl-steps", type=int, default=20, help="TRL steps beside the main job (about 16 s each)")
    parser.add_argument("--trl-bf16", action="store_true", help="TRL with bf16=True instead of its faster bf16=False")
    parser.add_argument("--parts", default="grpo,at_grpo,main", help="which parts to run (main: the main job and TRL)")
    parser.add_argument("--reuse", default="", help="parts (grpo, at_grpo, trl) whose earlier complete run under "
                        "bench/out is read, not rerun")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.worker:
        _trl_worker(args.trl_steps, args.trl_bf16)
        return

    report: dict = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                    "command": " ".join(["python", "bench/memory.py", *sys.argv[1:]])}
    parts, reuse = args.parts.split(","), args.reuse.split(",")
    runs = {
        "grpo": ("GRPO", [f"train.steps={args.grpo_steps}"]),
        "at_grpo": ("AT-GRPO per_role", ["algo=at_grpo", "env=plan_path", "policy=per_role",
                                         f"train.steps={args.team_steps}", *TEAM_SETTINGS]),
    }
    series = {}
    for name, (label, overrides) in runs.items():
        if name in parts:
            records = _train(name, overrides, reuse=name in reuse)
            report[name] = {"peak": _growth(records, "memory/peak_rss_mb"), "rss": _growth(records, "memory/rss_mb")}
            series[f"{label} RSS"] = [(r["step"], r["memory/rss_mb"]) for r in records]
    if "main" in parts:
        report["main_job"] = _main_job()
        trl = _trl(args.trl_steps, args.trl_bf16, reuse="trl" in reuse)
        report["trl"] = {"peak_rss_mb": trl["peak_rss_mb"], "steps": len(trl["steps"]), "bf16": args.trl_bf16,
                         "rss_per_step": [s["rss_mb"] for s in trl["steps"]]}
        series["TRL RSS"] = [(i + 1, s["rss_mb"]) for i, s in enumerate(trl["steps"])]
    report["plot"] = str(_plot(series).relative_to(ROOT))
    (OUT / "memory.json").write_text(json.dumps(report, indent=2))
    text = _render(report)
    print(text)
    from results import record  # bench/results.py, beside this script

    record(text)


def _render(report: dict) -> str:
    lines = [f"### {report['date']}: memory over long runs ({report['machine']})", f"`{report['command']}`"]
    runs = [name for name in ("grpo", "at_grpo") if name in report]
    if runs:
        lines += ["", "| run | steps | peak RSS at step 20 (MB) | peak RSS at the end (MB) | growth | RSS at step 20 -> end (MB) |",
                  "|---|---|---|---|---|---|"]
    for name in runs:
        peak, rss = report[name]["peak"], report[name]["rss"]
        lines.append(f"| {name} | {peak['steps']} | {peak['start_mb']:.0f} | {peak['end_mb']:.0f} | {100 * peak['growth']:+.1f}% "
                     f"| {rss['start_mb']:.0f} -> {rss['end_mb']:.0f} |")
    if "main_job" in report:
        main, trl = report["main_job"], report["trl"]
        learned = (f", held-out accuracy {main['accuracy']['before']:.3f} -> {main['accuracy']['after']:.3f}"
                   if main.get("accuracy") else "")
        lines += ["", f"The main job (`palaestra run`, {main['wall_s'] / 60:.1f} min{learned}) peaked at {main['peak_rss_mb']:.0f} MB; "
                  f"TRL's GRPOTrainer on the same settings (bf16={trl['bf16']}, {trl['steps']} steps and the same "
                  f"evaluation) at {trl['peak_rss_mb']:.0f} MB: ratio {main['peak_rss_mb'] / trl['peak_rss_mb']:.2f}."]
    lines += ["", f"RSS per step: `{report['plot']}`."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
