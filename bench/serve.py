"""Serving: palaestra serve (batched on its own decode loop) vs plain ``transformers`` ``generate``, one request at a time.

    .venv/bin/python bench/serve.py                          # SmolLM2-135M, 1 / 4 / 16 concurrent clients
    .venv/bin/python bench/serve.py --model tiny --clients 1,2 --requests 2 --max-tokens 8 --no-record   # smoke

Both sides answer the same chat requests (distinct short questions, greedy, ``--max-tokens`` new
tokens at most) from ``C`` clients at once, each client sending ``--requests`` requests back to
back:

* **palaestra**: ``palaestra serve``'s app under uvicorn on 127.0.0.1, called over HTTP with the
  ``openai`` client; concurrent requests share decode steps (continuous batching);
* **transformers**: ``model.generate`` on the same weights behind a lock, one request at a time
  (what a plain single-model server does), called in-process (no HTTP: the baseline pays less).

Reports latency p50 / p95 (seconds per request, waiting included) and total completion tokens/s
per side and concurrency; appends a dated entry to ``bench/RESULTS.md`` unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
QUESTIONS = ["What is {a} plus {b}?", "Name a colour that starts with the letter {l}.", "Write one sentence about the number {a}.",
             "Give a synonym of quick ({a}).", "What comes after {a}?"]


def _question(i: int) -> list[dict]:
    text = QUESTIONS[i % len(QUESTIONS)].format(a=i + 3, b=2 * i + 1, l="ABCDEFGHIJKLMNOPRSTW"[i % 20])
    return [{"role": "user", "content": text}]


def _drive(clients: int, requests: int, ask) -> dict:
    """Run ``clients`` threads, each asking ``requests`` questions; ``ask(messages) -> completion tokens``."""
    latencies, tokens, lock = [], [0], threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            start = time.perf_counter()
            n = ask(_question(c * requests + r))
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"p50": statistics.median(ordered), "p95": p95, "tokens": tokens[0], "seconds": wall, "tokens_per_s": tokens[0] / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=str(HERE / "out" / "serve.json"))
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    from openai import OpenAI

    from palaestra.config import ServeJob
    from palaestra.models import load_model_and_tokenizer
    from palaestra.rollout.hf import encode_chat
    from palaestra.serving import BackgroundServer, build_app
    from palaestra.serving.command import build_services

    config = ServeJob()
    config.model.name, config.model.dtype = args.model, args.dtype
    config.serve.embedder, config.serve.device, config.serve.max_batch_size = None, "cpu", max(64, max(levels))
    results: dict[str, dict] = {"palaestra": {}, "transformers": {}}
    with BackgroundServer(build_app(build_services(config))) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)

        def ask_server(messages):
            reply = client.chat.completions.create(model=args.model, messages=messages, temperature=0, max_tokens=args.max_tokens)
            return reply.usage.completion_tokens

        ask_server(_question(0))  # warm-up: packs the weights
        for clients in levels:
            results["palaestra"][clients] = _drive(clients, args.requests, ask_server)
            print("palaestra", clients, results["palaestra"][clients], flush=True)

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    eos = sorted({tokenizer.eos_token_id} | set(_as_list(model.generation_config.eos_token_id)))
    one_at_a_time = threading.Lock()

    @torch.no_grad()
    def ask_generate(messages):
        ids = torch.tensor([encode_chat(tokenizer, messages)])
        with one_at_a_time:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        return int(out.shape[1] - ids.shape[1])

    ask_generate(_question(0))
    for clients in levels:
        results["transformers"][clients] = _drive(clients, args.requests, ask_generate)
        print("transformers", clients, results["transformers"][clients], flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    table = _table(results, levels)
    print(table)
    if not args.no_record:
        from results import record  # bench/results.py, beside this script

        record(f"### {date.today()}: serving ({args.model}, {args.dtype}), {platform.machine()}, "
               f"{torch.get_num_threads()} torch threads\n`.venv/bin/python bench/serve.py --model {args.model} "
               f"--clients {args.clients} --requests {args.requests} --max-tokens {args.max_tokens}`: greedy chat requests, "
               "each client sending its requests back to back.\n\n" + table)


def _table(results: dict, levels: list[int]) -> str:
    lines = ["| clients | server | p50 s | p95 s | tokens/s | speed-up |", "|---|---|---|---|---|---|"]
    for clients in levels:
        base = results["transformers"][clients]["tokens_per_s"]
        for side in ("palaestra", "transformers"):
            r = results[side][clients]
            lines.append(f"| {clients} | {side} | {r['p50']:.2f} | {r['p95']:.2f} | {r['tokens_per_s']:.1f} | "
                         f"{r['tokens_per_s'] / base:.2f}x |")
    return "\n".join(lines)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


if __name__ == "__main__":
    main()
