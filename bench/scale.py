"""Memory of training past what a step would otherwise keep: gradient checkpointing and chunked log-probs on
a GRPO update.

    .venv/bin/python bench/scale.py                       # 8 completions of 512 tokens, 3 updates each way
    .venv/bin/python bench/scale.py --completion-tokens 256 --updates 2 --chunk-tokens 256

GRPO's update (:func:`palaestra.recipes.update.policy_update`, the one GRPO and AT-GRPO run) on the
embedded SmolLM2-135M with LoRA r16 on every linear layer, at the machine's training precision
(``model.precision=auto``): a batch of ``--completions`` completions of ``--completion-tokens`` tokens each
after a 64-token prompt (every token real, so every one is scored), in micro-batches of
``--per-forward``, the way ``palaestra train`` computes them (the packed shared-prompt forward, 8 samples per
prompt). Each variant runs in its own process: as is, with ``train.gradient_checkpointing``, with
``train.logprob_chunk_tokens`` (the LM head and log-softmax over ``--chunk-tokens`` positions at a
time, recomputed in the backward) and with both.
The figures: the peak resident memory of the update above the memory after loading (the activations
and gradients a step keeps), and the seconds per update (the first update is warm-up and not timed).
Appends an entry to ``bench/RESULTS.md``.

Not here yet: per-process memory of DDP and FSDP2 (the distributed work of the scaling issue).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT_TOKENS = 64
SAMPLES_PER_PROMPT = 8


def _cpu() -> str:
    """The CPU's model name and whether it multiplies bf16 natively (AMX or AVX-512 bf16) or not (AVX2 only)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    kind = "AMX" if "amx_bf16" in info else "AVX-512 bf16" if "avx512_bf16" in info else "no native bf16"
    return f"{name}, {kind}"


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


VARIANTS = {  # name -> (gradient checkpointing, chunked log-probs)
    "as is": (False, False),
    "gradient checkpointing": (True, False),
    "chunked log-probs": (False, True),
    "both": (True, True),
}


def _run(args, checkpointing: bool, chunked: bool) -> dict:
    command = [sys.executable, __file__, "--worker", "--completions", str(args.completions), "--completion-tokens",
               str(args.completion_tokens), "--per-forward", str(args.per_forward), "--updates", str(args.updates),
               "--chunk-tokens", str(args.chunk_tokens if chunked else 0), *(["--checkpointing"] if checkpointing else [])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    result = subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completions", type=int, default=8)
    parser.add_argument("--completion-tokens", type=int, default=512)
    parser.add_argument("--per-forward", type=int, default=8, help="completions per forward/backward")
    parser.add_argument("--updates", type=int, default=3, help="updates per variant (the first is warm-up)")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="train.logprob_chunk_tokens of the chunked variants")
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.updates < 2:
        parser.error("--updates must be at least 2 (the first update is warm-up)")
    if args.worker:
        print(json.dumps(_worker(args)))
        return

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
    entry = "\n".join([
        f"### {date.today().isoformat()}: memory of a GRPO update: gradient checkpointing and chunked log-probs "
        f"({_cpu()}, {os.cpu_count()} CPU cores)",
        f"`{command}`: the embedded SmolLM2-135M, LoRA r16 on every linear layer, precision {plain['precision']} "
        f"(weights {plain['dtype']}); {args.completions} completions of {args.completion_tokens} tokens after a "
        f"{PROMPT_TOKENS}-token prompt, {args.per_forward} per forward, {args.updates - 1} timed updates each way; "
        f"chunks of {args.chunk_tokens} tokens.",
        "", *table,
    ])
    print(entry)
    sys.path.insert(0, str(HERE))
    from results import record

    record(entry)


if __name__ == "__main__":
    main()
