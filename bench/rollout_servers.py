"""What sampling on rollout workers costs or gains on this machine: GRPO in-process against one and two workers.

    .venv/bin/python bench/rollout_servers.py                       # 180 s of training each
    .venv/bin/python bench/rollout_servers.py --budget-s 300 --setups in_process two_workers

Each setup trains the main job (``palaestra run``: the embedded SmolLM2-135M, LoRA, chain_sum, the default seed)
through the real CLI for the same wall-clock budget (``train.max_seconds``), from the same base weights:

* ``in_process``: the trainer samples itself (``rollout.engine=hf``), on every core;
* ``one_worker``: one ``palaestra serve`` worker pinned to the last core samples, the trainer (pinned to the
  others) only trains (``rollout.engine=server``, the mismatch correction on);
* ``two_workers``: a worker pinned to each of two cores, the trainer on all of them.

Prints, and appends to ``bench/RESULTS.md``, the steps done, seconds per step (and their generation share),
completion tokens per second, the held-out greedy accuracy before and after, and the mean log-prob gap between
the workers and the trainer. On a machine of few cores the processes share them, so the figures say what the
split costs there; the split pays where the workers have devices of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path


from results import cpu_kind, record  # bench/results.py, beside this script
from servers import free_port, start_server  # bench/servers.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SETUPS = ("in_process", "one_worker", "two_workers")


def start_worker(cores: set[int], log_path: Path) -> tuple[subprocess.Popen, str]:
    """A ``palaestra serve`` rollout worker of the embedded model pinned to ``cores``; its URL once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "palaestra.cli", "serve", f"serve.port={port}", "serve.embedder=null",
               "serve.runtime_lora=true", "serve.logprobs_mode=processed_logprobs", f"serve.threads={len(cores)}"]
    return start_server(command, port, log_path, ready_path="/health", cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                        preexec_fn=lambda: os.sched_setaffinity(0, cores))


def run(setup: str, budget_s: float, extra: list[str]) -> dict:
    out_dir = HERE / "out" / f"rollout-{setup}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    cores = sorted(os.sched_getaffinity(0))
    workers, keys, trainer_cores = [], [], set(cores)
    if setup == "one_worker":
        workers.append(start_worker({cores[-1]}, out_dir / "worker-0.log"))
        trainer_cores = set(cores[:-1]) or set(cores)
    elif setup == "two_workers":
        workers += [start_worker({core}, out_dir / f"worker-{i}.log") for i, core in enumerate(cores[:2])]
    if workers:
        keys = ["rollout.engine=server", f"rollout.servers=[{','.join(url for _, url in workers)}]"]
    command = [sys.executable, "-m", "palaestra.cli", "run", *keys, f"train.max_seconds={budget_s}", "train.time_budget_s=0", "train.save_interval=0",
               f"train.threads={len(trainer_cores)}", "tracking.enabled=false", f"train.output_dir={out_dir / 'run'}", *extra]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                                preexec_fn=lambda: os.sched_setaffinity(0, trainer_cores))
    finally:
        for process, _ in workers:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{setup} failed:\n{result.stderr[-3000:]}")
    run_dir = out_dir / "run"
    evals = [line for line in (run_dir / "train.log").read_text().splitlines() if " eval (" in line]
    figures = [dict(item.split("=") for item in line.split(": ", 1)[1].split()) for line in evals]
    steps = [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()) if "time/step" in r]
    mean = lambda key: sum(r.get(key, 0.0) for r in steps) / max(1, len(steps))  # noqa: E731
    return {"setup": setup, "workers": len(workers), "steps": len(steps), "wall_s": wall,
            "seconds_per_step": mean("time/step"), "generation_s": mean("time/generation"),
            "tokens_per_second": mean("tokens_per_second"), "before": float(figures[0]["accuracy"]),
            "after": float(figures[-1]["accuracy"]), "logprob_gap": mean("rollout/logprob_gap/mean") if workers else None,
            "capped_share": mean("rollout/is_capped_share") if workers else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--budget-s", type=float, default=180.0, help="training seconds per setup (evaluation apart)")
    parser.add_argument("--out", default=str(HERE / "out" / "rollout_servers.json"))
    parser.add_argument("extra", nargs="*", help="more key=value overrides for every run")
    args = parser.parse_args()
    rows = []
    for setup in args.setups:
        rows.append(run(setup, args.budget_s, args.extra))
        row = rows[-1]
        print(f"{setup}: {row['steps']} steps, {row['seconds_per_step']:.2f} s/step, {row['tokens_per_second']:.1f} tokens/s, "
              f"accuracy {row['before']:.3f} -> {row['after']:.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    base = next((r for r in rows if r["setup"] == "in_process"), None)
    lines = [
        f"### {date.today().isoformat()}: GRPO sampling in process against rollout workers, {args.budget_s:.0f} s of training "
        f"each ({cpu_kind()}, {os.cpu_count()} CPU cores)",
        f"`{' '.join(['python bench/rollout_servers.py', *sys.argv[1:]])}`: `palaestra run` (embedded SmolLM2-135M, LoRA, "
        "chain_sum, the default seed) with `train.max_seconds`; workers are `palaestra serve serve.runtime_lora=true "
        "serve.logprobs_mode=processed_logprobs`, each pinned to one core (one worker: the trainer on the other cores; two: "
        "the trainer on all); greedy accuracy on the 64 held-out problems before and after.", "",
        "| setup | steps | s/step | generation s/step | completion tokens/s | vs in process | accuracy before | after | "
        "log-prob gap (nats/token) | tokens capped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x" if base else "-"
        gap = f"{r['logprob_gap']:.4f}" if r["logprob_gap"] is not None else "-"
        capped = f"{100 * r['capped_share']:.2f}%" if r["capped_share"] is not None else "-"
        lines.append(f"| {r['setup']} | {r['steps']} | {r['seconds_per_step']:.2f} | {r['generation_s']:.2f} | "
                     f"{r['tokens_per_second']:.1f} | {ratio} | {r['before']:.3f} | {r['after']:.3f} | {gap} | {capped} |")
    text = "\n".join(lines)
    print(text)
    record(text)


if __name__ == "__main__":
    main()
