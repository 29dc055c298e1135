"""Decoding speed: palaestra's own decode loop (HF forward step, lean step) vs Hugging Face ``generate``.

    .venv/bin/python bench/decode.py                 # 5 timed calls each after a warm-up
    .venv/bin/python bench/decode.py --calls 3 --groups 2 --samples 4 --max-tokens 64
    .venv/bin/python bench/decode.py --precision fp32  # the path a CPU without native bf16 takes

The embedded SmolLM2-135M-Instruct with a LoRA adapter (r 16 on all linear layers, as a GRPO run
samples from it), compute precision as palaestra picks it on this machine, chain_sum prompts, G
samples per prompt at temperature 1.0. Both engines go through ``HFGenerator`` (shared-prompt
prefill, merged LoRA weights), so the difference is the decode loop and step alone: ``generate``,
our loop calling the Hugging Face forward per token, and our loop with the lean fused Llama step
(:mod:`palaestra.rollout.fast_llama`, the default), and the lean step on int8 copies of the base weights
(``rollout.quantize=int8``, :mod:`palaestra.rollout.int8`; the steps of as many rows as the int8 kernel wins for
on this machine). The engines
alternate call by call (a drifting machine load hits both alike), with the same seed per call.
Reports seconds per call, completion tokens/s and milliseconds per decode step; appends a dated
entry to ``bench/RESULTS.md``.

The physical limit of a decode step on this machine: every step reads all the weights it multiplies
by (each layer's projections and the output head, in the compute precision) and the keys and values
cached so far, so it takes at least those bytes divided by the memory bandwidth. The bandwidth is
measured in the same run by a stream copy (``b.copy_(a)`` over 512 MB, STREAM's convention: bytes
read plus bytes written per second), with the same threads as the decoding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def stream_copy_bandwidth(megabytes: int = 512, repeats: int = 10) -> float:
    """Memory bandwidth in bytes/s: the best of ``repeats`` copies of a buffer far larger than the caches
    (read + write bytes per copy, as STREAM counts them)."""
    source = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    target.copy_(source)  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * source.element_size() / best


def bytes_per_decode_step(model, dtype: torch.dtype, rows: int, context: float) -> float:
    """What one decode step must read: the weights it multiplies by (every linear layer of the base model
    (adapters merged into them) and the output head) in ``dtype``, plus the cached keys and values of
    ``rows`` sequences ``context`` tokens long."""
    config = model.config
    linear = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name]
    weights = sum(m.weight.numel() for m in linear)  # lm_head is one of them (tied or not, it is read)
    size = torch.tensor([], dtype=dtype).element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * rows * context
    return (weights + cache) * size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--groups", type=int, default=2, help="distinct prompts per call")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="compute precision (auto: bf16 where the CPU has it natively, else fp32)")
    parser.add_argument("--out", default=str(HERE / "out" / "decode.json"))
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()

    from palaestra.config import TaskConfig
    from palaestra.models import apply_lora, load_model_and_tokenizer
    from palaestra.models.precision import resolve_precision, weights_dtype
    from palaestra.rollout import HFGenerator, SamplingParams
    from palaestra.tasks.build import build_task

    precision = resolve_precision(args.precision, "cpu")
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype=weights_dtype("auto", precision, lora=True))
    model = apply_lora(model, r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    task = build_task(TaskConfig(params={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}, train_size=200, test_size=8))
    engines = {
        "hf": HFGenerator(model, tokenizer, max_prompt_length=256, precision=precision, decoder="hf"),
        "loop": HFGenerator(model, tokenizer, max_prompt_length=256, precision=precision, fast_step=False),
        "palaestra": HFGenerator(model, tokenizer, max_prompt_length=256, precision=precision),
        "int8": HFGenerator(model, tokenizer, max_prompt_length=256, precision=precision, quantize="int8"),
    }
    sampling = SamplingParams(args.max_tokens, temperature=1.0)

    bandwidth = stream_copy_bandwidth()
    figures = {name: {"seconds": [], "tokens": [], "steps": []} for name in engines}
    for call in range(args.calls + 1):  # call 0 warms up both
        prompts = [task.prompt(e) for e in task.train[call * args.groups : (call + 1) * args.groups]]
        for name, engine in engines.items():
            torch.manual_seed(call)
            started = time.perf_counter()
            rollout = engine.generate(prompts, args.samples, sampling)
            seconds = time.perf_counter() - started
            if call:
                figures[name]["seconds"].append(seconds)
                figures[name]["tokens"].append(rollout.num_completion_tokens)
                figures[name]["steps"].append(rollout.completion_ids.shape[1])

    summary = {}
    for name, f in figures.items():
        total = sum(f["seconds"])
        summary[name] = {
            "seconds_per_call": statistics.mean(f["seconds"]),
            "completion_tokens_per_s": sum(f["tokens"]) / total,
            "ms_per_decode_step": 1000 * total / sum(f["steps"]),
            "mean_completion_tokens": statistics.mean(f["tokens"]),
        }
    ratio = summary["palaestra"]["completion_tokens_per_s"] / summary["hf"]["completion_tokens_per_s"]
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rows = args.groups * args.samples
    prompt_tokens = statistics.mean(len(tokenizer(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)).input_ids)
                                    for p in prompts)
    mean_context = prompt_tokens + summary["palaestra"]["mean_completion_tokens"] / rows / 2  # halfway through the answers
    step_bytes = bytes_per_decode_step(model, compute_dtype, rows, mean_context)
    limit_ms = 1000 * step_bytes / bandwidth
    summary["physical_limit"] = {"bandwidth_gb_per_s": bandwidth / 1e9, "mb_read_per_step": step_bytes / 1e6,
                                 "ms_per_decode_step": limit_ms}
    setting = f"{args.groups} prompts x {args.samples} samples, up to {args.max_tokens} tokens, {args.calls} calls, precision {precision}"
    from palaestra.rollout.fast_llama import packed_linear
    from palaestra.rollout.int8 import int8_row_limit

    int8_rows = int8_row_limit(compute_dtype, packed_linear)
    int8_bytes = bytes_per_decode_step(model, torch.int8, rows, mean_context)  # int8 weights (the cache stays as it is)
    int8_limit_ms = 1000 * int8_bytes / bandwidth
    hf, loop, ours, int8 = summary["hf"], summary["loop"], summary["palaestra"], summary["int8"]
    int8_ratio = int8["completion_tokens_per_s"] / ours["completion_tokens_per_s"]
    lines = [
        "| | HF generate | own loop, HF forward step | own loop, lean step (default) | lean step, int8 weights | default/HF | int8/default |",
        "|---|---|---|---|---|---|---|",
        f"| seconds per call | {hf['seconds_per_call']:.2f} | {loop['seconds_per_call']:.2f} | {ours['seconds_per_call']:.2f} | "
        f"{int8['seconds_per_call']:.2f} | {ours['seconds_per_call'] / hf['seconds_per_call']:.2f} | "
        f"{int8['seconds_per_call'] / ours['seconds_per_call']:.2f} |",
        f"| completion tokens/s | {hf['completion_tokens_per_s']:.1f} | {loop['completion_tokens_per_s']:.1f} | "
        f"{ours['completion_tokens_per_s']:.1f} | {int8['completion_tokens_per_s']:.1f} | {ratio:.2f}x | {int8_ratio:.2f}x |",
        f"| ms per decode step | {hf['ms_per_decode_step']:.1f} | {loop['ms_per_decode_step']:.1f} | {ours['ms_per_decode_step']:.1f} | "
        f"{int8['ms_per_decode_step']:.1f} | | |",
        f"| completion tokens per call | {hf['mean_completion_tokens']:.1f} | {loop['mean_completion_tokens']:.1f} | "
        f"{ours['mean_completion_tokens']:.1f} | {int8['mean_completion_tokens']:.1f} | | |",
        f"| x the physical limit per step | {hf['ms_per_decode_step'] / limit_ms:.1f} | {loop['ms_per_decode_step'] / limit_ms:.1f} | "
        f"{ours['ms_per_decode_step'] / limit_ms:.1f} | {int8['ms_per_decode_step'] / int8_limit_ms:.1f} (of its own) | | |",
        "",
        f"Physical limit: {step_bytes / 1e6:.0f} MB read per decode step (weights in {precision}, and the cache) at "
        f"{bandwidth / 1e9:.1f} GB/s (stream copy, same run) = {limit_ms:.1f} ms per step; with int8 weights "
        f"{int8_bytes / 1e6:.0f} MB = {int8_limit_ms:.1f} ms. The int8 kernel beat the {precision} product for up to "
        f"{int8_rows} rows on this machine (measured at start), so steps of more live rows ran at {precision}.",
    ]
    table = "\n".join(lines)
    print(f"\n{setting}\n{table}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setting": setting, **summary}, indent=2) + "\n")
    if not args.no_record:
        command = "python bench/decode.py" + (f" --calls {args.calls}" if args.calls != 5 else "") + (
            f" --groups {args.groups} --samples {args.samples}" if (args.groups, args.samples) != (2, 4) else "") + (
            f" --max-tokens {args.max_tokens}" if args.max_tokens != 64 else "") + (
            f" --precision {args.precision}" if args.precision != "auto" else "")
        from results import cpu_kind, record  # bench/results.py, beside this script

        record(f"### {date.today().isoformat()}: decoding, palaestra loop vs HF generate ({cpu_kind()}, "
               f"{torch.get_num_threads()} threads)\n`{command}` ({setting})\n\n{table}")


if __name__ == "__main__":
    main()
