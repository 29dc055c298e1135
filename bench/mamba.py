"""The mamba target against the Hugging Face ``Trainer`` training the same Mamba from scratch, in one run.

    .venv/bin/python bench/mamba.py                      # the default run (3 epochs of the shipped corpus), every Trainer setting
    .venv/bin/python bench/mamba.py --epochs 1 --max-chars 40000 --trainer-settings fp32 --no-record   # a smoke test

Both train transformers' ``MambaForCausalLM`` at MARK's sizes (d_model 256, 4 layers, 512-token
chunks, mambapy's parallel scan) from the same seeded initial weights on the same data: the shipped
corpus (Python's documentation topics; ``--max-chars`` keeps its first topics only), the same
held-out documents, the same BPE tokenizer (the one palaestra's run trained and saved) and the
same chunks; 8 chunks per update in micro-batches of 2, AdamW lr 2e-3 (betas 0.9/0.95, weight
decay 0.1), 5% warmup then cosine, gradient clipping at 1.0, seed 0, an evaluation of the held-out
loss after every epoch and keep-best by it (the Trainer: ``load_best_model_at_end``), a
checkpoint per epoch. palaestra runs its recipe (the config of ``palaestra train --target=mamba``)
in a process of its own; the Trainer runs in another, once per setting: fp32, bf16 (its
documented speed setting on CPUs; ``use_cpu=True``, in-process data loading without pinned memory
for data already tokenised in memory), and fp32 with the memory setting palaestra's recipe makes
(:func:`palaestra.language_model.model.freed_memory_kept`: glibc keeps freed blocks, so a step
reuses the last step's pages), which tells the training loops apart from the allocator. The
differences left: the Trainer draws its own shuffle, and decays A_log and D too (palaestra, like
the reference Mamba, does not).

Reported: held-out perplexity (exp of the token-mean loss over every held-out token, computed by
the same function for both) before training and after (the best epoch's weights), training tokens
per second (the training chunks' tokens x epochs / the training loop's wall time, evaluations and
checkpoints included; model building and tokenising excluded) and the process's peak memory. Prints
a table and appends it to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SETTINGS = {"fp32": {"bf16": False}, "bf16": {"bf16": True}, "fp32+kept-memory": {"bf16": False}}
"""The Trainer's settings measured: name -> TrainingArguments (kept-memory: the allocator setting palaestra makes)."""
BATCH, MICRO_BATCH, SEED = 8, 2, 0


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def corpus_folder(max_chars: int) -> str | None:
    """None (the shipped corpus), or a folder of its first topics up to ``max_chars`` characters."""
    if not max_chars:
        return None
    from palaestra.language_model.corpus import shipped_corpus

    folder = HERE / "out" / "mamba-corpus"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    total = 0
    for document in shipped_corpus().documents:
        if total >= max_chars:
            break
        (folder / f"{document.title}.txt").write_text(document.text, encoding="utf-8")
        total += len(document.text)
    return str(folder)


def palaestra_worker(epochs: int, corpus: str | None, threads: int, out_file: Path) -> None:
    """palaestra's recipe in this process (the real config, as ``palaestra train --target=mamba``)."""
    from palaestra.language_model import load_tokenizer
    from palaestra.pipeline import compose_config
    from palaestra.recipes.mamba import main as train_mamba

    out_dir = HERE / "out" / "mamba-palaestra"
    shutil.rmtree(out_dir, ignore_errors=True)
    config = compose_config(["algo=mamba", f"algo.epochs={epochs}", "algo.early_stopping_patience=0",
                             *([f"algo.corpus={corpus}"] if corpus else []), f"train.threads={threads}",
                             "tracking.enabled=false", f"train.output_dir={out_dir}"])
    results = train_mamba(config, evaluate_before_after=True)
    train_chunks, _ = chunks(corpus, load_tokenizer(out_dir / "tokenizer"))
    tokens = sum(len(c) for c in train_chunks) * epochs
    out_file.write_text(json.dumps({
        "name": "palaestra", "before": results["before"]["perplexity"], "after": results["after"]["perplexity"],
        "tokens": tokens, "seconds": results["train_seconds"], "tokens_per_second": tokens / results["train_seconds"],
        "peak_mb": _peak_mb()}))


def chunks(corpus: str | None, tokenizer) -> tuple[list, list]:
    """(training chunks, held-out chunks) of the corpus, as the recipe makes them at its defaults."""
    from palaestra.language_model import chunk, read_corpus, split_documents, token_stream

    train_docs, held_docs = split_documents(read_corpus(corpus).documents, 0.1, SEED)
    return tuple(chunk(token_stream(tokenizer, [d.text for d in docs]), 512) for docs in (train_docs, held_docs))


def trainer_worker(setting: str, epochs: int, corpus: str | None, threads: int, out_file: Path) -> None:
    """One Trainer run in this process on palaestra's tokenizer, split and chunks; writes its figures to ``out_file``."""
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    from palaestra.language_model import build_model, collate, held_out_figures, load_tokenizer
    from palaestra.language_model.model import freed_memory_kept

    if threads:
        torch.set_num_threads(threads)
    set_seed(SEED)
    tokenizer = load_tokenizer(HERE / "out" / "mamba-palaestra" / "tokenizer")
    train_chunks, held_chunks = chunks(corpus, tokenizer)
    pad = tokenizer.pad_token_id
    model = build_model(tokenizer, d_model=256, n_layers=4, seed=SEED)  # the recipe's initial weights
    measure = dict(batch_size=MICRO_BATCH, pad_id=pad, device="cpu")
    before = held_out_figures(model, held_chunks, **measure)

    def batch(rows: list[dict]) -> dict:
        made = collate([row["input_ids"] for row in rows], pad)
        return {"input_ids": made.input_ids, "attention_mask": made.attention_mask, "labels": made.labels}

    out_dir = HERE / "out" / f"mamba-trainer-{setting}"
    shutil.rmtree(out_dir, ignore_errors=True)
    arguments = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=BATCH // MICRO_BATCH,
        per_device_eval_batch_size=MICRO_BATCH, learning_rate=2e-3, num_train_epochs=epochs, weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, warmup_steps=0.05, lr_scheduler_type="cosine", max_grad_norm=1.0,
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=3, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=False, seed=SEED, data_seed=SEED, use_cpu=True,
        report_to=[], logging_strategy="epoch", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, **SETTINGS[setting])
    trainer = Trainer(model=model, args=arguments, train_dataset=[{"input_ids": c} for c in train_chunks],
                      eval_dataset=[{"input_ids": c} for c in held_chunks], data_collator=batch)
    started = time.perf_counter()
    with freed_memory_kept(setting == "fp32+kept-memory"):
        trainer.train()
    seconds = time.perf_counter() - started
    after = held_out_figures(trainer.model, held_chunks, **measure)
    tokens = sum(len(c) for c in train_chunks) * epochs
    out_file.write_text(json.dumps({
        "name": f"Trainer {setting}", "before": before["perplexity"], "after": after["perplexity"], "tokens": tokens,
        "seconds": seconds, "tokens_per_second": tokens / seconds, "peak_mb": _peak_mb()}))


def run_worker(setting: str, args) -> dict:
    """One training (``palaestra`` or a Trainer setting) in a fresh process; its figures."""
    out_file = HERE / "out" / f"mamba-{setting}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    print(f"running {setting}", flush=True)
    command = [sys.executable, __file__, "--worker", setting, "--epochs", str(args.epochs), "--threads", str(args.threads),
               "--out", str(out_file), *(["--corpus", args.corpus] if args.corpus else [])]
    subprocess.run(command, cwd=ROOT, check=True, env=_env())
    return json.loads(out_file.read_text())


def render(report: dict) -> str:
    ours = next(r for r in report["runs"] if r["name"] == "palaestra")
    others = [r for r in report["runs"] if r["name"] != "palaestra"]
    lines = [f"### {report['date']}: mamba target vs the Hugging Face Trainer ({report['machine']})",
             f"`{report['command']}`", "",
             "| run | held-out perplexity before | after | training tokens/s | loop wall time (s) | peak memory (MB) |",
             "|---|---|---|---|---|---|"]
    for row in report["runs"]:
        lines.append(f"| {row['name']} | {row['before']:.1f} | {row['after']:.1f} | {row['tokens_per_second']:.0f} | "
                     f"{row['seconds']:.1f} | {row['peak_mb']:.0f} |")
    epochs = f"{report['epochs']} epoch{'s' if report['epochs'] > 1 else ''}"
    lines += ["", f"{epochs} of {report['corpus']} ({ours['tokens'] // report['epochs']} training tokens an epoch), "
              "vocabulary 5000, d_model 256, 4 layers, 512-token chunks, 8 chunks an update, lr 2e-3, "
              f"{report['threads'] or 'all'} threads; palaestra's loop time includes its sample generations."]
    if others:
        best = max(others, key=lambda r: r["tokens_per_second"])
        lines[-1] += (f" Against the Trainer's fastest setting ({best['name']}): palaestra trains "
                      f"{ours['tokens_per_second'] / best['tokens_per_second']:.2f}x as many tokens a second.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-chars", type=int, default=0, help="train on the shipped corpus's first topics up to this size")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads of every run (0: torch's default)")
    parser.add_argument("--trainer-settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    parser.add_argument("--worker", choices=["palaestra", *SETTINGS], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "palaestra":
        palaestra_worker(args.epochs, args.corpus, args.threads, args.out)
        return
    if args.worker:
        trainer_worker(args.worker, args.epochs, args.corpus, args.threads, args.out)
        return
    args.corpus = corpus_folder(args.max_chars)
    runs = [run_worker(setting, args) for setting in ["palaestra", *args.trainer_settings]]  # palaestra first: its tokenizer
    corpus = f"the shipped corpus's first {args.max_chars} characters" if args.max_chars else "the shipped corpus"
    report = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
              "command": "python bench/mamba.py " + " ".join(sys.argv[1:]), "epochs": args.epochs, "corpus": corpus,
              "threads": args.threads, "runs": runs}
    (HERE / "out" / "mamba.json").write_text(json.dumps(report, indent=2))
    text = render(report)
    print("\n" + text)
    if not args.no_record:
        from results import record  # bench/results.py, beside this script

        record(text)


if __name__ == "__main__":
    main()
