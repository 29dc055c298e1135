"""Scaling past one process: per-process memory of 1 process, DDP and FSDP2, and the memory of a GRPO update with
gradient checkpointing and chunked log-probs.

    .venv/bin/python bench/scale.py                          # both parts
    .venv/bin/python bench/scale.py --part strategies        # 1 process, 2 processes DDP, 2 processes FSDP2
    .venv/bin/python bench/scale.py --part activations --completion-tokens 256 --updates 2 --chunk-tokens 256

**Strategies.** Full fine-tuning of the embedded SmolLM2-135M (fp32 master weights, AdamW, the machine's
training precision) on ``--sequences`` sequences of ``--tokens`` tokens per process and step, the way
``palaestra train algo=sft`` steps it (:func:`palaestra.optim.optimizer_step`: gradients summed over the
processes, clipped, AdamW): one process (``--sequences`` sequences a step), two processes under
``train.strategy=ddp`` and two under ``train.strategy=fsdp`` (:func:`palaestra.sharding.shard_model`), each
process with one CPU thread (the one process with two), gloo between them. The figures, per process: the
parameters, gradients and optimizer state it holds after a step (its shards under FSDP2), its peak
resident memory, and the job's seconds per step and tokens per second (the first step is warm-up).

**Activations.** GRPO's update (:func:`palaestra.recipes.update.policy_update`, the one GRPO and AT-GRPO run) on
the embedded SmolLM2-135M with LoRA r16 on every linear layer, at the machine's training precision
(``model.precision=auto``): a batch of ``--completions`` completions of ``--completion-tokens`` tokens each
after a 64-token prompt (every token real, so every one is scored), in micro-batches of
``--per-forward``, the way ``palaestra train`` computes them (the packed shared-prompt forward, 8 samples per
prompt). Each variant runs in its own process: as is, with ``train.gradient_checkpointing``, with
``train.logprob_chunk_tokens`` (the LM head and log-softmax over ``--chunk-tokens`` positions at a
time, recomputed in the backward) and with both.
The figures: the peak resident memory of the update above the memory after loading (the activations
and gradients a step keeps), and the seconds per update (the first update is warm-up and not timed).

Each part appends an entry to ``bench/RESULTS.md``.
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

from results import cpu_kind, record  # bench/results.py, beside this script

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT_TOKENS = 64
SAMPLES_PER_PROMPT = 8


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(args) -> dict:
    """One variant in this process: load, build the batch, time ``args.updates`` updates."""
    import torch

    from palaestra.config import ModelConfig
    from palaestra.models.loading import enable_gradient_checkpointing, load_policy
    from palaestra.models.logprobs import shared_prompt_rows
    from palaestra.recipes.update import micro_batch_logprobs, policy_update
    from palaestra.rollout.hf import Rollout

    torch.manual_seed(0)
    config = ModelConfig()
    config.lora.r, config.lora.alpha = 16, 32
    model, _, precision, dtype = load_policy(config, "cpu")
    if args.checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    prompts = args.completions // SAMPLES_PER_PROMPT
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(10, vocab, (prompts, PROMPT_TOKENS)).repeat_interleave(SAMPLES_PER_PROMPT, 0)
    completion_ids = torch.randint(10, vocab, (args.completions, args.completion_tokens))
    rollout = Rollout(prompt_ids, torch.ones_like(prompt_ids), completion_ids, torch.ones_like(completion_ids),
                      torch.ones(args.completions, dtype=torch.bool), [""] * args.completions)
    advantages = torch.randn(args.completions)
    slices = [slice(i, i + args.per_forward) for i in range(0, args.completions, args.per_forward)]
    shared = shared_prompt_rows(args.per_forward, SAMPLES_PER_PROMPT)
    loaded_mb = _peak_rss_mb()

    seconds = []
    for update in range(args.updates):
        started = time.perf_counter()
        policy_update(optimizer, scheduler, trainable, advantages, rollout.completion_mask.float(), slices=slices,
                      logprobs=lambda rows: micro_batch_logprobs(model, rollout, rows, 1.0, shared, precision,
                                               chunk_tokens=args.chunk_tokens),
                      loss_type="grpo", max_grad_norm=1.0)
        if update:  # the first update is warm-up
            seconds.append(time.perf_counter() - started)
    return {"precision": precision, "dtype": dtype, "loaded_mb": loaded_mb, "peak_mb": _peak_rss_mb(),
            "step_mb": _peak_rss_mb() - loaded_mb, "seconds_per_update": sum(seconds) / len(seconds)}


def _held_mb(parameters: list, optimizer) -> float:
    """MB of the parameters, their gradients and their optimizer state this process holds (its shards' local
    tensors when they are sharded)."""
    import torch

    def local(tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    tensors = [local(p) for p in parameters] + [local(p.grad) for p in parameters if p.grad is not None]
    tensors += [local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _strategy_worker(args) -> dict | None:
    """One process of a strategy: load the whole model, shard it (fsdp), time ``args.updates`` steps."""
    import torch

    from palaestra.config import ModelConfig
    from palaestra.distributed import Distributed
    from palaestra.models.loading import load_policy
    from palaestra.models.precision import autocast
    from palaestra.optim import optimizer_step
    from palaestra.sharding import shard_model

    dist = Distributed.from_environment()
    torch.manual_seed(0)
    config = ModelConfig()
    config.lora.enabled = False
    model, _, precision, dtype = load_policy(config, "cpu")
    if args.strategy == "fsdp":
        shard_model(model, dist, precision=precision)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    generator = torch.Generator().manual_seed(dist.rank)
    ids = torch.randint(10, model.config.vocab_size, (args.sequences, args.tokens), generator=generator)

    seconds = []
    for update in range(args.updates):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, args.sequences, args.per_forward):
            batch = ids[start : start + args.per_forward]
            with autocast(precision, "cpu"):
                loss = model(input_ids=batch, labels=batch).loss
            (loss * len(batch) / (args.sequences * dist.world)).backward()  # the mean over every process's sequences
        optimizer_step(trainable, optimizer, scheduler, 1.0, dist)
        if update:  # the first update is warm-up
            seconds.append(time.perf_counter() - started)
    figures = {"precision": precision, "dtype": dtype, "held_mb": _held_mb(trainable, optimizer), "peak_mb": _peak_rss_mb(),
               "seconds_per_update": sum(seconds) / len(seconds)}
    everyone = dist.gather_objects([figures])
    return everyone if dist.is_main else None


STRATEGIES = {  # name -> (processes, train.strategy)
    "1 process": (1, "ddp"),
    "2 processes, DDP": (2, "ddp"),
    "2 processes, FSDP2": (2, "fsdp"),
}


def _run_strategy(args, processes: int, strategy: str) -> list[dict]:
    """Every process's figures of one strategy (launched under torchrun when there are several)."""
    worker = [__file__, "--worker", "--part", "strategies", "--strategy", strategy, "--sequences", str(args.sequences),
              "--tokens", str(args.tokens), "--per-forward", str(args.sequence_per_forward), "--updates", str(args.updates)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    if processes > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // processes))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    else:
        launcher = [sys.executable]
    result = subprocess.run([*launcher, *worker], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _strategies(args) -> str:
    """The strategies part: run each, return its RESULTS.md entry."""
    results = {}
    for name, (processes, strategy) in STRATEGIES.items():
        print(f"{name} ...", flush=True)
        results[name] = _run_strategy(args, processes, strategy)
    ddp = results["2 processes, DDP"]
    table = ["| | processes | parameters + gradients + optimizer per process (MB) | vs DDP | peak RSS per process (MB) "
             "| seconds per step | tokens/s |", "|---|---|---|---|---|---|---|"]
    for name, per_process in results.items():
        processes = len(per_process)
        held, peak = max(r["held_mb"] for r in per_process), max(r["peak_mb"] for r in per_process)
        step = per_process[0]["seconds_per_update"]
        tokens = processes * args.sequences * args.tokens / step
        table.append(f"| {name} | {processes} | {held:.0f} | {held / max(r['held_mb'] for r in ddp):.2f}x | {peak:.0f} | "
                     f"{step:.2f} | {tokens:.0f} |")
    first = results["1 process"][0]
    command = " ".join(["python", "bench/scale.py", *sys.argv[1:]])
    return "\n".join([
        f"### {date.today().isoformat()}: memory per process: 1 process, DDP and FSDP2 ({cpu_kind()}, {os.cpu_count()} CPU cores)",
        f"`{command}`: full fine-tuning of the embedded SmolLM2-135M (weights {first['dtype']}, precision "
        f"{first['precision']}, AdamW), {args.sequences} sequences of {args.tokens} tokens per process and step in forwards "
        f"of {args.sequence_per_forward}, {args.updates - 1} timed steps; gloo between the processes, the CPU's cores "
        "shared out among them.",
        "", *table,
    ])


VARIANTS = {  # name -> (gradient checkpointing, chunked log-probs)
    "as is": (False, False),
    "gradient checkpointing": (True, False),
    "chunked log-probs": (False, True),
    "both": (True, True),
}


def _run(args, checkpointing: bool, chunked: bool) -> dict:
    command = [sys.executable, __file__, "--worker", "--part", "activations", "--completions", str(args.completions), "--completion-tokens",
               str(args.completion_tokens), "--per-forward", str(args.per_forward), "--updates", str(args.updates),
               "--chunk-tokens", str(args.chunk_tokens if chunked else 0), *(["--checkpointing"] if checkpointing else [])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    result = subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _activations(args) -> str:
    """The activations part: run each variant, return its RESULTS.md entry."""
    results = {}
    for name, (checkpointing, chunked) in VARIANTS.items():
        print(f"{name} ...", flush=True)
        results[name] = _run(args, checkpointing, chunked)
    plain = results["as is"]
    table = ["| | step memory above the loaded model (MB) | vs as is | peak RSS (MB) | seconds per update | vs as is |",
             "|---|---|---|---|---|---|"]
    for name, result in results.items():
        table.append(f"| {name} | {result['step_mb']:.0f} | {result['step_mb'] / plain['step_mb']:.2f}x | "
                     f"{result['peak_mb']:.0f} | {result['seconds_per_update']:.2f} | "
                     f"{result['seconds_per_update'] / plain['seconds_per_update']:.2f}x |")
    command = " ".join(["python", "bench/scale.py", *sys.argv[1:]])
    return "\n".join([
        f"### {date.today().isoformat()}: memory of a GRPO update: gradient checkpointing and chunked log-probs "
        f"({cpu_kind()}, {os.cpu_count()} CPU cores)",
        f"`{command}`: the embedded SmolLM2-135M, LoRA r16 on every linear layer, precision {plain['precision']} "
        f"(weights {plain['dtype']}); {args.completions} completions of {args.completion_tokens} tokens after a "
        f"{PROMPT_TOKENS}-token prompt, {args.per_forward} per forward, {args.updates - 1} timed updates each way; "
        f"chunks of {args.chunk_tokens} tokens.",
        "", *table,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "strategies", "activations"), default="all")
    parser.add_argument("--sequences", type=int, default=4, help="strategies: sequences per process and step")
    parser.add_argument("--tokens", type=int, default=256, help="strategies: tokens per sequence")
    parser.add_argument("--sequence-per-forward", type=int, default=2, help="strategies: sequences per forward/backward")
    parser.add_argument("--completions", type=int, default=8, help="activations: completions per update")
    parser.add_argument("--completion-tokens", type=int, default=512, help="activations: tokens per completion")
    parser.add_argument("--per-forward", type=int, default=8, help="items per forward/backward (workers)")
    parser.add_argument("--updates", type=int, default=3, help="updates per variant (the first is warm-up)")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="train.logprob_chunk_tokens of the chunked variants")
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.updates < 2:
        parser.error("--updates must be at least 2 (the first update is warm-up)")
    if args.worker:
        figures = _strategy_worker(args) if args.part == "strategies" else _worker(args)
        if figures is not None:
            print(json.dumps(figures))
        return

    for part, measure in (("strategies", _strategies), ("activations", _activations)):
        if args.part in ("all", part):
            entry = measure(args)
            print(entry)
            record(entry)


if __name__ == "__main__":
    main()
