"""palaestra GRPO vs TRL ``GRPOTrainer``, side by side, on identical settings.

    .venv/bin/pip install -e ".[bench]"          # TRL is a benchmark-only extra
    .venv/bin/python bench/grpo_vs_trl.py        # throughput (5 steps each) + learning (300 s each)
    .venv/bin/python bench/grpo_vs_trl.py --steps 3 --skip-learning

Two comparisons, each framework in its own fresh process (so peak memory is its own):

1. Throughput: the embedded SmolLM2-135M-Instruct, LoRA r=16 (alpha 32) on q/k/v/o, 2 prompts x 4
   generations, up to 64 completion tokens, beta 0.04, lr 5e-5, temperature 1.0, loss "grpo",
   group-scaled rewards, seed 0; the first step is a warm-up and is not counted. Reports seconds per
   step, completion tokens/s, peak RSS and mean reward, and the palaestra/TRL ratios.
2. Learning: the same wall-clock training budget for both (lenient correctness reward, LoRA r=16
   on all linear layers, lr 5e-5 constant, 4 prompts x 8 samples, 24 tokens, beta 0), then greedy
   held-out accuracy on the same 64 chain_sum test problems, scored by the same evaluator.

TRL gets its best documented CPU setting: each comparison runs it in every precision this CPU multiplies
natively, ``bf16=False`` always and ``bf16=True`` (mixed precision) where the CPU has native bf16 (AMX or
AVX-512 bf16 in ``/proc/cpuinfo``), and the ratios are against the faster on that comparison (the table shows
each and says which won). On a CPU without native bf16 torch emulates it and TRL's ``bf16=True`` runs several
times slower than its ``bf16=False``, so it is skipped and the entry says why (``--trl-bf16 always`` runs it
anyway, to see it). palaestra
picks its own precision (bf16 where the CPU has it). Every entry names the CPU and its bf16 support, so
``bench/RESULTS.md`` keeps a row per kind of CPU.

Prints a table, writes JSON (``--out``) and appends a dated entry to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASK_PARAMS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
INSTRUCTION = "Answer with a number."

THROUGHPUT = dict(prompts=2, generations=4, max_tokens=64, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                  beta=0.04, lr=5e-5, temperature=1.0, schedule="constant")
LEARNING = dict(prompts=4, generations=8, max_tokens=24, lora_targets="all-linear", beta=0.0, lr=5e-5,
                temperature=1.0, schedule="constant")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def _task():
    from palaestra.config import TaskConfig
    from palaestra.tasks.build import build_task

    return build_task(TaskConfig(params=TASK_PARAMS, instruction=INSTRUCTION, train_size=2000, test_size=64))


def _evaluate(model, tokenizer, task) -> float:
    from palaestra.evaluation.evaluate import evaluate
    from palaestra.models.precision import resolve_precision
    from palaestra.rollout import HFGenerator, SamplingParams

    # the same decoding precision palaestra's own evaluation uses on this machine
    generator = HFGenerator(model, tokenizer, precision=resolve_precision("auto", "cpu"))
    result = evaluate(generator, task, task.test, reward_weights={"correctness": 1.0},
                      format_reward="number_only", sampling=SamplingParams(24, greedy=True), batch_size=64)
    return result.accuracy


# ------------------------------------------------------------------------------------------ workers


def run_palaestra(settings: dict, steps: int, budget_s: float, evaluate: bool) -> dict:
    from hydra import compose, initialize_config_module

    from palaestra.jobs import to_config
    from palaestra.recipes import grpo

    overrides = [
        f"train.steps={steps}", f"train.completions_per_step={settings['prompts'] * settings['generations']}",
        f"train.completions_per_forward={settings['prompts'] * settings['generations']}",
        f"algo.num_generations={settings['generations']}", f"algo.max_completion_length={settings['max_tokens']}",
        f"algo.beta={settings['beta']}", f"train.learning_rate={settings['lr']}", f"train.lr_schedule={settings['schedule']}",
        f"algo.temperature={settings['temperature']}", "algo.loss_type=grpo", "algo.scale_rewards=group",
        f"model.lora.target_modules={json.dumps(settings['lora_targets'])}", "model.lora.r=16", "model.lora.alpha=32",
        "tracking.enabled=false", "train.save_interval=0", "train.log_samples_interval=0", "train.seed=0",
        f"train.max_seconds={budget_s}", "train.time_budget_s=0", f"train.output_dir=bench/out/palaestra-{os.getpid()}",
        f"task.instruction='{INSTRUCTION}'",
    ]
    with initialize_config_module(config_module="palaestra.conf", version_base="1.3"):
        config = to_config(compose(config_name="config", overrides=overrides))
    started = time.perf_counter()
    results = grpo.main(config, evaluate_before_after=evaluate)
    records = [json.loads(line) for line in Path(results["run_dir"], "metrics.jsonl").read_text().splitlines()]
    batch = settings["prompts"] * settings["generations"]
    steps_out = [{"seconds": r["time/step"], "tokens": r["completion_length/mean"] * batch, "reward": r["reward/mean"],
                  "breakdown": {k[5:]: v for k, v in r.items() if k.startswith("time/") and k != "time/step"}}
                 for r in records]
    return {"steps": steps_out, "wall_s": time.perf_counter() - started, "peak_rss_mb": _peak_rss_mb(),
            "accuracy_before": results.get("before", {}).get("accuracy"),
            "accuracy_after": results.get("after", {}).get("accuracy"), "train_seconds": results.get("train_seconds")}


def run_trl(settings: dict, steps: int, budget_s: float, evaluate: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from palaestra.models import embedded_model_dir
    from palaestra.rewards import correctness_reward

    torch.manual_seed(0)
    task = _task()
    model_dir = str(embedded_model_dir())
    dataset = Dataset.from_list([{"prompt": task.prompt(e), "answer": e.answer} for e in task.train])

    def correctness(completions, answer, **kwargs):
        return correctness_reward([c[-1]["content"] for c in completions], answer=answer)

    class Clock(TrainerCallback):
        def __init__(self):
            self.records, self.started, self.loop_started = [], None, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.loop_started = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.records.append({"seconds": time.perf_counter() - self.started, "rss_mb": _rss_mb(),
                                 "peak_rss_mb": _peak_rss_mb()})
            if budget_s and time.perf_counter() - self.loop_started >= budget_s:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs and self.records:
                batch = settings["prompts"] * settings["generations"]
                self.records[-1].update(tokens=logs["completions/mean_length"] * batch, reward=logs.get("reward", 0.0))

    batch = settings["prompts"] * settings["generations"]
    args = GRPOConfig(
        output_dir=f"bench/out/trl-{os.getpid()}", max_steps=steps,
        per_device_train_batch_size=settings.get("micro_batch", batch),
        gradient_accumulation_steps=batch // settings.get("micro_batch", batch), num_generations=settings["generations"],
        max_completion_length=settings["max_tokens"], beta=settings["beta"], learning_rate=settings["lr"],
        lr_scheduler_type=settings["schedule"], temperature=settings["temperature"], loss_type="grpo",
        scale_rewards="group", logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True,
        bf16=settings.get("bf16", False), disable_tqdm=True,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=settings["lora_targets"],
                             task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    clock = Clock()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[correctness], args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[clock])
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - clock.loop_started
    accuracy_after = _evaluate(trainer.model, tokenizer, task) if evaluate else None
    return {"steps": clock.records, "wall_s": time.perf_counter() - started, "peak_rss_mb": _peak_rss_mb(),
            "accuracy_after": accuracy_after, "train_seconds": train_seconds}


WORKERS = {"palaestra": run_palaestra, "trl": run_trl}


# --------------------------------------------------------------------------------------- the driver


def _summary(result: dict) -> dict:
    counted = [s for s in result["steps"][1:] if "tokens" in s] or result["steps"]  # step 1 is warm-up
    seconds = sum(s["seconds"] for s in counted)
    tokens = sum(s.get("tokens", 0.0) for s in counted)
    summary = {
        "steps_counted": len(counted),
        "seconds_per_step": seconds / len(counted),
        "completion_tokens_per_s": tokens / seconds,
        "peak_rss_mb": result["peak_rss_mb"],
        "mean_reward": sum(s.get("reward", 0.0) for s in counted) / len(counted),
    }
    breakdowns = [s["breakdown"] for s in counted if "breakdown" in s]
    if breakdowns:
        summary["breakdown_s"] = {k: sum(b.get(k, 0.0) for b in breakdowns) / len(breakdowns) for k in breakdowns[0]}
    return summary


TRL_SETTINGS = {"trl bf16=False": False, "trl bf16=True": True}
"""TRL's two CPU settings (the second only where the CPU multiplies bf16 natively: :func:`trl_settings`)."""


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX-512 bf16, as ``/proc/cpuinfo`` says) with its kernels
    not restricted below AVX-512 (``bench/results.py: AVX2_EMULATION``): palaestra's own test, which its
    ``model.precision=auto`` follows."""
    from palaestra.models.precision import bf16_is_fast

    return bf16_is_fast("cpu")


def trl_settings(choice: str) -> tuple[list[str], str]:
    """TRL's settings to run (``--trl-bf16`` auto, always or never) and a note on what was skipped and why."""
    if choice == "always" or (choice == "auto" and native_bf16()):
        return list(TRL_SETTINGS), ""
    why = ("bf16 is not native here (no AMX or AVX-512 bf16, or the kernels restricted below AVX-512): torch emulates "
           "it, so TRL's bf16=True is slower than its bf16=False here and bf16=False is its best setting "
           "(--trl-bf16 always runs it to compare)"
           if choice == "auto" else "--trl-bf16 never")
    return ["trl bf16=False"], f"TRL bf16=True skipped: {why}."


def _spawn(name: str, mode: str, steps: int, budget_s: float) -> dict:
    framework, bf16 = ("trl", TRL_SETTINGS[name]) if name in TRL_SETTINGS else (name, False)
    out = HERE / "out" / f"{name.replace(' ', '-').replace('=', '')}-{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--worker", framework, "--mode", mode, "--steps", str(steps),
               "--budget-s", str(budget_s), "--out", str(out), *(["--bf16"] if bf16 else [])]
    print(f"running {name} ({mode}) ...", flush=True)
    subprocess.run(command, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="throughput steps per framework (first is warm-up)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="learning comparison: training seconds each")
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["throughput", "learning"], default="throughput", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "out" / "grpo_vs_trl.json"))
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)  # the TRL worker's mixed precision
    parser.add_argument("--trl-bf16", choices=["auto", "always", "never"], default="auto",
                        help="TRL's bf16=True run: auto (only where the CPU has native bf16), always or never")
    args = parser.parse_args()
    if args.worker:
        settings, evaluate = (THROUGHPUT, False) if args.mode == "throughput" else (LEARNING, True)
        settings = {**settings, "bf16": args.bf16}
        steps = args.steps if args.mode == "throughput" else 10_000
        budget = 0.0 if args.mode == "throughput" else args.budget_s
        result = WORKERS[args.worker](settings, steps, budget, evaluate)
        Path(args.out).write_text(json.dumps(result))
        return

    from results import cpu_kind  # bench/results.py, beside this script

    trl, skipped = trl_settings(args.trl_bf16)
    report: dict = {"date": date.today().isoformat(), "machine": f"{cpu_kind()}, {os.cpu_count()} CPU cores",
                    "command": " ".join(["python", "bench/grpo_vs_trl.py", *sys.argv[1:]]), "trl": trl, "skipped": skipped}
    if skipped:
        print(skipped, flush=True)
    throughput = {name: _summary(_spawn(name, "throughput", args.steps, 0.0)) for name in ("palaestra", *trl)}
    best = max(trl, key=lambda name: throughput[name]["completion_tokens_per_s"])
    p, t = throughput["palaestra"], throughput[best]
    report["throughput"], report["trl_best"] = throughput, best
    report["ratios"] = {
        "completion_tokens_per_s": p["completion_tokens_per_s"] / t["completion_tokens_per_s"],
        "seconds_per_step": p["seconds_per_step"] / t["seconds_per_step"],
        "peak_rss": p["peak_rss_mb"] / t["peak_rss_mb"],
    }
    if not args.skip_learning:
        runs = {name: _spawn(name, "learning", 0, args.budget_s) for name in ("palaestra", *trl)}
        report["learning"] = {
            name: {"steps": len(r["steps"]), "train_seconds": r["train_seconds"], "accuracy_after": r["accuracy_after"],
                   "peak_rss_mb": r["peak_rss_mb"]}
            for name, r in runs.items()
        }
        report["learning"]["accuracy_before"] = runs["palaestra"]["accuracy_before"]
        report["learning"]["budget_s"] = args.budget_s
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    text = _render(report)
    print(text)
    from results import record  # bench/results.py, beside this script

    record(text)


def _render(report: dict) -> str:
    throughput, best, r = report["throughput"], report["trl_best"], report["ratios"]
    p = throughput["palaestra"]
    names = ["palaestra", *report["trl"]]
    lines = [
        f"### {report['date']}: GRPO throughput, palaestra vs TRL at its best ({report['machine']})",
        f"`{report['command']}`", *([report["skipped"]] if report["skipped"] else []), "",
        "| | " + " | ".join(names) + f" | palaestra / {best} (TRL's fastest) |", "|---" * (len(names) + 1) + "|---|",
        "| seconds per step | " + " | ".join(f"{throughput[n]['seconds_per_step']:.2f}" for n in names) + f" | {r['seconds_per_step']:.2f} |",
        "| completion tokens/s | " + " | ".join(f"{throughput[n]['completion_tokens_per_s']:.1f}" for n in names)
        + f" | {r['completion_tokens_per_s']:.2f}x |",
        "| peak RSS (MB) | " + " | ".join(f"{throughput[n]['peak_rss_mb']:.0f}" for n in names) + f" | {r['peak_rss']:.2f} |",
        "| mean reward | " + " | ".join(f"{throughput[n]['mean_reward']:.3f}" for n in names) + " | |",
    ]
    if "breakdown_s" in p:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in p["breakdown_s"].items())
        lines += ["", f"palaestra step breakdown (s): {parts}"]
    if "learning" in report:
        learning = report["learning"]
        lines += [
            "", f"Learning, {learning['budget_s']:.0f} s of training each, greedy held-out accuracy on 64 problems "
            f"(before: {learning['accuracy_before']:.3f}):", "",
            "| | steps | accuracy after | peak RSS (MB) |", "|---|---|---|---|",
        ]
        for name in names:
            run = learning[name]
            lines.append(f"| {name} | {run['steps']} | {run['accuracy_after']:.3f} | {run['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
