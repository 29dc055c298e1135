"""The GPU paths in one run: GRPO on one CUDA GPU with each rollout engine, their speed and their log-prob gap.

    ./scripts/gpu_check.sh                       # sets up .venv-gpu (the gpu extra), then runs this
    .venv-gpu/bin/python bench/gpu_check.py --steps 10

Three GRPO runs of the main job (the embedded SmolLM2-135M, LoRA, chain_sum) through the real CLI, each for
``--steps`` steps on ``cuda``:

* ``hf``: palaestra's own decode loop on the training model;
* ``vllm``: vLLM in the trainer's process (``rollout.engine=vllm``) serving the adapter;
* ``vllm_serve``: a ``vllm serve`` worker (``--enable-lora --logprobs-mode processed_logprobs``, runtime LoRA
  loading on) beside the trainer (``rollout.engine=server``).

Prints, and appends to ``bench/RESULTS.md``, the GPU's name, seconds per step, completion tokens per second,
and for the two vLLM engines the mean and largest log-prob gap between vLLM and the trainer and the share of
tokens the correction capped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

from results import record  # bench/results.py, beside this script
from servers import free_port, start_server  # bench/servers.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENGINES = ("hf", "vllm", "vllm_serve")


def start_vllm_serve(log_path: Path) -> tuple[subprocess.Popen, str]:
    """``vllm serve`` of the embedded model with runtime LoRA loading, on a third of the GPU."""
    from palaestra.models import embedded_model_dir

    port = free_port()
    command = ["vllm", "serve", str(embedded_model_dir()), "--port", str(port), "--enable-lora", "--max-lora-rank", "64",
               "--logprobs-mode", "processed_logprobs", "--gpu-memory-utilization", "0.3", "--dtype", "bfloat16"]
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="true", HF_HUB_OFFLINE="1")
    return start_server(command, port, log_path, timeout_s=600, cwd=ROOT, env=env)


def run(engine: str, steps: int, extra: list[str]) -> dict:
    out_dir = HERE / "out" / f"gpu-{engine}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    worker, keys = None, []
    if engine == "vllm":
        keys = ["rollout.engine=vllm"]
    elif engine == "vllm_serve":
        worker, url = start_vllm_serve(out_dir / "vllm-serve.log")
        keys = ["rollout.engine=server", f"rollout.servers=[{url}]"]
    command = [sys.executable, "-m", "palaestra.cli", "train", *keys, "train.device=cuda", f"train.steps={steps}",
               "train.save_interval=0", "train.eval_interval=0", "tracking.enabled=false", f"train.output_dir={out_dir / 'run'}",
               *extra]
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGINT)
            worker.wait(timeout=120)
    if result.returncode != 0:
        return {"engine": engine, "error": (result.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "time/step" in r][1:] or [r for r in records if "time/step" in r]  # the first warms up
    mean = lambda key: sum(r.get(key, 0.0) for r in timed) / max(1, len(timed))  # noqa: E731
    return {"engine": engine, "seconds_per_step": mean("time/step"), "tokens_per_second": mean("tokens_per_second"),
            "gap_mean": mean("rollout/logprob_gap/mean") if engine != "hf" else None,
            "gap_max": max((r.get("rollout/logprob_gap/max", 0.0) for r in timed), default=0.0) if engine != "hf" else None,
            "capped": mean("rollout/is_capped_share") if engine != "hf" else None}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("extra", nargs="*", help="more key=value overrides for every run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name(0)
    rows = []
    for engine in args.engines:
        rows.append(run(engine, args.steps, args.extra))
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"### {date.today().isoformat()}: GRPO rollout engines on one GPU ({gpu})",
             f"`{' '.join(['python bench/gpu_check.py', *sys.argv[1:]])}`: the main job (embedded SmolLM2-135M, LoRA, chain_sum) for "
             f"{args.steps} steps on cuda; the first step left out of the means.", "",
             "| engine | s/step | completion tokens/s | log-prob gap mean | max | tokens capped |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | failed: {r['error']} | | | | |")
            continue
        gap = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"| {r['engine']} | {r['seconds_per_step']:.2f} | {r['tokens_per_second']:.0f} | {gap(r['gap_mean'], '.4f')} | "
                     f"{gap(r['gap_max'], '.3f')} | {gap(r['capped'] and 100 * r['capped'], '.2f')} |")
    text = "\n".join(lines)
    print(text)
    record(text)


if __name__ == "__main__":
    main()
