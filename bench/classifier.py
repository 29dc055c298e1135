"""The classifier target against the Hugging Face ``Trainer`` doing the same fine-tune, in one run.

    .venv/bin/python bench/classifier.py                 # 5 epochs (MARK's), every Trainer setting
    .venv/bin/python bench/classifier.py --epochs 1 --trainer-settings bf16

Both fine-tune the embedded all-MiniLM-L6-v2 encoder (a 6-layer BERT) with a new 3-way head on the
shipped topic set (chatterbot-corpus utterances about AI, emotion and psychology): the same splits,
batch 16, AdamW lr 5e-5 (betas 0.9/0.999, weight decay 0.01), 10% warmup then cosine, texts cut at
128 tokens, seed 0, an evaluation on the validation split after every epoch, keep-best by macro-F1
(the Trainer: ``load_best_model_at_end``), a checkpoint per epoch. palaestra runs its recipe (the
config of ``palaestra train --target=classifier``) in a process of its own; the Trainer runs in
another, once per setting: fp32, bf16 (its documented speed
setting on CPUs with native bf16) and bf16 with ``group_by_length`` (batches of similar lengths,
less padding); the fastest is the one compared against. Reported: the training loop's wall time per
epoch (evaluations and checkpoints included, model loading excluded) and the best epoch's accuracy
and macro-F1 on the test split. Prints a table and appends it to ``bench/RESULTS.md``.
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
DATA = ROOT / "datasets" / "classification" / "topics"
SETTINGS = {"fp32": {"bf16": False}, "bf16": {"bf16": True}, "bf16+group_by_length": {"bf16": True, "train_sampling_strategy": "group_by_length"}}
"""The Trainer's settings measured: name -> TrainingArguments."""


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))


def palaestra_worker(epochs: int, out_file: Path) -> None:
    """palaestra's recipe in this process (the real config, as ``palaestra train --target=classifier``)."""
    from palaestra.pipeline import compose_config
    from palaestra.recipes.classifier import main as train_classifier

    out_dir = HERE / "out" / "classifier-palaestra"
    shutil.rmtree(out_dir, ignore_errors=True)
    config = compose_config(["algo=classifier", f"algo.epochs={epochs}", "algo.early_stopping_patience=0",
                             "train.save_interval=23", "tracking.enabled=false", f"train.output_dir={out_dir}"])
    results = train_classifier(config)
    rows = [json.loads(line) for line in (out_dir / "test_predictions.jsonl").read_text().splitlines()]
    figures = _figures([r["label"] for r in rows], [r["predicted"] for r in rows])
    out_file.write_text(json.dumps({"name": "palaestra", "seconds_per_epoch": results["train_seconds"] / epochs, **figures}))


def _figures(true: list[str], predicted: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": accuracy_score(true, predicted), "macro_f1": f1_score(true, predicted, average="macro")}


def trainer_worker(setting: str, epochs: int, out_file: Path) -> None:
    """One Trainer fine-tune in this process; writes its figures to ``out_file``."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from palaestra.retrieval.embedder import embedded_embedder_dir

    set_seed(0)
    splits = {name: [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
              for name in ("train", "val", "test")}
    labels = sorted({row["label"] for row in splits["train"]})
    folder = str(embedded_embedder_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def dataset(rows):
        encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=128)
        return Dataset.from_dict({**encoded, "labels": [labels.index(r["label"]) for r in rows]})

    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})

    def metrics(prediction):
        predicted = np.argmax(prediction.predictions, axis=-1)
        return _figures([labels[i] for i in prediction.label_ids], [labels[i] for i in predicted])

    out_dir = HERE / "out" / f"classifier-trainer-{setting}"
    shutil.rmtree(out_dir, ignore_errors=True)
    arguments = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=16, per_device_eval_batch_size=64, learning_rate=5e-5,
        num_train_epochs=epochs, weight_decay=0.01, adam_beta2=0.999, warmup_steps=0.1, lr_scheduler_type="cosine",
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=3, load_best_model_at_end=True,
        metric_for_best_model="macro_f1", seed=0, use_cpu=True, report_to=[], logging_strategy="epoch",
        disable_tqdm=True, dataloader_num_workers=0, **SETTINGS[setting])
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset(splits["train"]), eval_dataset=dataset(splits["val"]),
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=metrics)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    figures = trainer.predict(dataset(splits["test"])).metrics
    out_file.write_text(json.dumps({"name": f"Trainer {setting}", "seconds_per_epoch": seconds / epochs,
                                    "accuracy": figures["test_accuracy"], "macro_f1": figures["test_macro_f1"],
                                    "threads": torch.get_num_threads()}))


def run_worker(setting: str, epochs: int) -> dict:
    """One fine-tune (``palaestra`` or a Trainer setting) in a fresh process; its figures."""
    out_file = HERE / "out" / f"classifier-{setting}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    print(f"running {setting}", flush=True)
    subprocess.run([sys.executable, __file__, "--worker", setting, "--epochs", str(epochs), "--out", str(out_file)],
                   cwd=ROOT, check=True, env=_env())
    return json.loads(out_file.read_text())


def render(report: dict) -> str:
    best = min((r for r in report["runs"] if r["name"] != "palaestra"), key=lambda r: r["seconds_per_epoch"])
    ours = next(r for r in report["runs"] if r["name"] == "palaestra")
    lines = [f"### {report['date']}: classifier target vs the Hugging Face Trainer ({report['machine']})",
             f"`{report['command']}`", "",
             "| run | wall time per epoch (s) | test accuracy | test macro-F1 |", "|---|---|---|---|"]
    for row in report["runs"]:
        lines.append(f"| {row['name']} | {row['seconds_per_epoch']:.1f} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} |")
    lines += ["", f"{report['epochs']} epochs of the shipped topic set (367 train, 79 validation, 79 test texts), "
              "all-MiniLM-L6-v2 with a new 3-way head, batch 16, lr 5e-5. Against the Trainer's fastest setting "
              f"({best['name']}): palaestra takes {ours['seconds_per_epoch'] / best['seconds_per_epoch']:.2f}x its time per "
              f"epoch ({best['seconds_per_epoch'] / ours['seconds_per_epoch']:.2f}x the speed)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--trainer-settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--worker", choices=["palaestra", *SETTINGS], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = parser.parse_args()
    if args.worker == "palaestra":
        palaestra_worker(args.epochs, args.out)
        return
    if args.worker:
        trainer_worker(args.worker, args.epochs, args.out)
        return
    runs = [run_worker(setting, args.epochs) for setting in ["palaestra", *args.trainer_settings]]
    report = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
              "command": "python bench/classifier.py " + " ".join(sys.argv[1:]), "epochs": args.epochs, "runs": runs}
    text = render(report)
    print("\n" + text)
    if not args.no_record:
        from results import record  # bench/results.py, beside this script

        record(text)


if __name__ == "__main__":
    main()
