"""Do rollouts on int8 weights learn as much per step? The main job with full-precision and with int8 rollouts.

    .venv/bin/python bench/quantized_rollouts.py                      # 80 steps of 8 completions each, fp32
    .venv/bin/python bench/quantized_rollouts.py --steps 60 --completions 32 --precision auto
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/python bench/quantized_rollouts.py

Each setting trains in its own process through the real CLI (``palaestra run``, the main job: the embedded
SmolLM2-135M, LoRA, chain_sum, the default seed) for the same number of steps (``train.steps``; no time budget) of
``--completions`` completions (default 8, one group: every decode step has at most 8 rows, where the int8 kernel
is the faster on the CPUs measured, so the rollouts are sampled on int8 weights throughout; at the main job's 32
rows most steps would run at full precision),
once with ``rollout.quantize=none`` and once with ``rollout.quantize=int8`` (the mismatch corrected by truncated
importance sampling, ``rollout.correction=auto``). Reported: the held-out accuracy before and after (greedy, full
precision, the 64 test problems), the training reward over the last 10 steps, the seconds per step and per
generation, and the sampler's log-prob gap and capped share. Appends the table to ``bench/RESULTS.md``; the CPU kind
(and an AVX2 restriction set in the environment) is named with it.
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


def run(quantize: str, steps: int, completions: int, precision: str, extra: list[str]) -> dict:
    keys = [f"rollout.quantize={quantize}", f"train.steps={steps}", f"train.completions_per_step={completions}",
            f"train.completions_per_forward={min(8, completions)}", f"model.precision={precision}", *extra]
    wall, figures, records = budgeted_run(quantize, keys, 24 * 3600, HERE / "out" / f"quantized-{quantize}")

    def mean(key: str, rows: list[dict]) -> float | None:
        values = [r[key] for r in rows if key in r]
        return sum(values) / len(values) if values else None

    return {"quantize": quantize, "steps": len(records), "wall_s": wall, "seconds_per_step": mean("time/step", records),
            "generation_s": mean("time/generation", records), "before": float(figures[0]["accuracy"]),
            "after": float(figures[-1]["accuracy"]), "reward_last10": mean("reward/mean", records[-10:]),
            "logprob_gap": mean("rollout/logprob_gap/mean", records), "capped": mean("rollout/is_capped_share", records),
            "peak_rss_mb": max(r["memory/peak_rss_mb"] for r in records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--completions", type=int, default=8, help="completions per step (groups of 8)")
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--out", default=str(HERE / "out" / "quantized_rollouts.json"))
    parser.add_argument("extra", nargs="*", help="more key=value overrides for both runs")
    args = parser.parse_args()
    rows = []
    for quantize in ("none", "int8"):
        rows.append(run(quantize, args.steps, args.completions, args.precision, args.extra))
        row = rows[-1]
        print(f"{quantize}: {row['steps']} steps, {row['seconds_per_step']:.2f} s/step, accuracy {row['before']:.3f} -> "
              f"{row['after']:.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    none, int8 = rows
    lines = [
        f"### {date.today().isoformat()}: int8 rollouts against full-precision ones, {args.steps} steps of "
        f"{args.completions} completions each "
        f"({cpu_kind()}, {os.cpu_count()} CPU cores)",
        f"`python bench/quantized_rollouts.py {' '.join(sys.argv[1:])}`: `palaestra run` (embedded SmolLM2-135M, LoRA, "
        f"chain_sum, model.precision={args.precision}, train.completions_per_step={args.completions}) "
        "with `rollout.quantize=none` and `=int8` "
        "(correction auto: token_truncate, cap 2); greedy full-precision accuracy on the 64 held-out problems.", "",
        "| rollouts | steps | s/step | generation s/step | accuracy before | after | gain (points) | train reward, last 10 "
        "steps | sampler log-prob gap | capped share | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = "-" if r["logprob_gap"] is None else f"{r['logprob_gap']:.4f}"
        capped = "-" if r["capped"] is None else f"{r['capped']:.4f}"
        lines.append(f"| {r['quantize']} | {r['steps']} | {r['seconds_per_step']:.2f} | {r['generation_s']:.2f} | "
                     f"{r['before']:.3f} | {r['after']:.3f} | {100 * (r['after'] - r['before']):+.1f} | "
                     f"{r['reward_last10']:.3f} | {gap} | {capped} | {r['peak_rss_mb']:.0f} |")
    lines += ["", f"int8 / none: {none['seconds_per_step'] / int8['seconds_per_step']:.2f}x steps per second, "
                  f"{none['generation_s'] / int8['generation_s']:.2f}x generation speed."]
    text = "\n".join(lines)
    print(text)
    record(text)


if __name__ == "__main__":
    main()
