"""Classifier: fine-tune a BERT-family encoder for N-label text classification (MARK's transformer target).

Launch::

    palaestra train --target=classifier                       # the shipped topic set, the embedded MiniLM encoder
    palaestra train --target=transformer                      # the same, by MARK's name
    palaestra train --target=classifier algo.data=tickets/ algo.num_labels=5 model.name=hf model.path=my-bert/
    torchrun --nproc_per_node 2 -m palaestra.cli train --target=classifier   # data parallel: a block of every batch each

The loop, top to bottom: read and check the labelled text (train, validation, test), load the
encoder with a new ``num_labels``-way head, then per step take the next ``train.texts_per_step`` texts
of a seeded per-epoch shuffle, padded to a bucketed width, and step AdamW on the cross-entropy.
Each epoch ends with the validation accuracy, macro-F1 and loss; keep-best and early stopping
follow ``train.best_metric`` (macro-F1 by default). At the end the best epoch's weights are
measured on the test split (figures and a confusion-matrix plot in MLflow) and exported as a plain
Hugging Face folder (``run_dir/model``, tokenizer and label names included) that
``transformers.pipeline("text-classification", model=folder)`` loads. With several processes each
takes a block of every batch (and of the texts evaluated, the predictions gathered in order) and the
gradients of the batch's summed loss over its size are summed: one process's update on the whole batch.

Simplifications: the whole encoder is fine-tuned (no adapter: the encoder is small); the head is
BERT's own (the pooled [CLS] state); texts longer than ``algo.max_length`` tokens are truncated.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import torch

from palaestra.classification.data import load_classification_data, topic_classification_set
from palaestra.classification.metrics import classification_figures, confusion, plot_confusion
from palaestra.classification.model import encode_batches, load_classifier
from palaestra.recipes.classifier_config import ClassifierConfig
from palaestra.data.jsonl import write_jsonl
from palaestra.distributed import Distributed
from palaestra.data.shipped import shipped_dataset
from palaestra.export import export_policy
from palaestra.models.loading import enable_gradient_checkpointing
from palaestra.models.precision import autocast, resolve_precision
from palaestra.optim import adamw, optimizer_step
from palaestra.runtime import seed_everything, training_device
from palaestra.recipes.methods import best_metric
from palaestra.recipes.run import Run, config_dict

log = logging.getLogger("palaestra")



def main(config: ClassifierConfig, *, evaluate_before_after: bool = False) -> dict:
    """Fine-tune the encoder; return the run folder, the MLflow run id, the exported folder and the test figures."""
    algo, train_cfg = config.algo, config.train
    dist = Distributed.from_environment()
    seed_everything(train_cfg.seed, threads=train_cfg.threads)

    # ---- data: parsed and checked before the encoder loads
    data = load_classification_data(algo.data or shipped_dataset("classification/topics", topic_classification_set),
                                    num_labels=algo.num_labels, labels=algo.labels,
                                    val_fraction=algo.val_fraction, seed=train_cfg.seed)
    test_split = "test" if data.test else "validation"
    held_out = data.test or data.val

    # ---- the encoder with a new head
    device = training_device(train_cfg.device, dist)
    precision = resolve_precision(config.model.precision, device)
    model, tokenizer = load_classifier(config.model.name, config.model.path, data.labels, device, dropout=algo.dropout)
    if train_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    texts, labels = [x.text for x in data.train], [x.label for x in data.train]
    steps_per_epoch = math.ceil(len(data.train) / train_cfg.texts_per_step)
    total_steps = steps_per_epoch * algo.epochs

    # ---- the run: folder, optimizer, resume, tracking
    tags = {"algo": "classifier", "data": data.name, "labels": ",".join(data.labels),
            "model": config.model.path or ("tiny" if config.model.name == "tiny" else "all-minilm-l6-v2")}
    run = Run(train_cfg, method="classifier", runs_root=Path("runs") / f"{data.name}-classifier", total_steps=total_steps,
              identity={"encoder": tags["model"], "labels": tags["labels"]},
              best=best_metric(config), patience=algo.early_stopping_patience, dist=dist,
              progress=("loss", "tokens_per_second"), curves=("loss",),
              plot=("loss_curve.png", "Classifier: training loss and the validation figure kept the best by"))
    optimizer, scheduler = adamw(model.parameters(), train_cfg, total_steps)
    run.resume(model=model, optimizer=optimizer, scheduler=scheduler)
    tracker = run.track(config.tracking, run_name=f"{data.name}-classifier", tags=tags, config=config_dict(config))
    log.info("device %s, precision %s; %d train, %d validation, %d test texts; labels %s; %d steps (%d per epoch)",
             device, precision, len(data.train), len(data.val), len(data.test), ", ".join(data.labels), total_steps,
             steps_per_epoch)
    measure = dict(tokenizer=tokenizer, num_labels=len(data.labels), batch_size=algo.eval_batch_size,
                   max_length=algo.max_length, device=device, precision=precision, dist=dist)
    results: dict = {"subject": data.name, "outputs": {}}
    if evaluate_before_after and run.step == 0:
        results["before"] = evaluate(model, held_out, **measure)[0]

    with run:
        for step in run.steps():
            # 1. the batch: the next texts_per_step texts of this epoch's shuffle (this process's block of them)
            epoch, position = divmod(step - 1, steps_per_epoch)
            order = epoch_order(len(texts), train_cfg.seed, epoch)
            chosen = order[position * train_cfg.texts_per_step : (position + 1) * train_cfg.texts_per_step]
            mine = dist.split(chosen)

            # 2. loss (the batch's mean cross-entropy: this block's summed loss over the batch size) and step
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.zero_grad(set_to_none=True)
            loss, tokens = 0.0, 0
            if mine:
                (batch,) = encode_batches(tokenizer, texts, labels, mine, len(mine), algo.max_length)
                batch = batch.to(device)
                with autocast(precision, device):
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                block_loss = torch.nn.functional.cross_entropy(logits.float(), batch.labels, reduction="sum") / len(chosen)
                block_loss.backward()
                loss, tokens = block_loss.item(), int(batch.attention_mask.sum())
            grad_norm = optimizer_step(list(model.parameters()), optimizer, scheduler, train_cfg.max_grad_norm, dist)
            loss, tokens = dist.totals(loss, tokens)
            run.log(step, {"loss": loss, "learning_rate": learning_rate, "grad_norm": grad_norm,
                           "epoch": step / steps_per_epoch, "tokens_per_second": tokens / run.step_seconds()})

            # 3. epoch end: the validation figures that keep-best and early stopping follow
            figures = None
            if step % steps_per_epoch == 0 or step == total_steps:
                with run.timed("validation"):
                    figures = evaluate(model, data.val, **measure)[0]
                run.log_eval(step, f"validation, epoch {epoch + 1}", figures)

            # 4. checkpoint, keep-best, early stopping
            if run.end_of_step(step, figures):
                break

    # ---- the best epoch's weights: test figures, confusion matrix, export
    if run.finished:
        if run.load_best(model):
            log.info("the best epoch's weights (%s %.4f)", run.best_metric, run.state["best_metric"])
        figures, predicted = evaluate(model, held_out, **measure)
        results["after"] = results["figures"] = figures
    if run.finished and dist.is_main:  # the main process writes the predictions, the model and the plot
        rows = [{"text": x.text, "label": data.labels[x.label], "predicted": data.labels[p]} for x, p in zip(held_out, predicted)]
        write_jsonl(run.run_dir / f"{test_split}_predictions.jsonl", rows)
        log.info("%s figures: %s", test_split, ", ".join(f"{k}={v:.4f}" for k, v in figures.items()))
        model_dir = export_policy(model, tokenizer, run.run_dir / "model")  # a plain model: written as it is
        results["outputs"] = {"classifier_dir": str(model_dir)}
        matrix = confusion([x.label for x in held_out], predicted, len(data.labels))
        plot = plot_confusion(matrix, data.labels, run.run_dir / "confusion_matrix.png",
                              title=f"{data.name}: {test_split} split, accuracy {figures['accuracy']:.3f}")
        if tracker:
            tracker.log_metrics({f"{test_split}/{k}": v for k, v in figures.items()}, step=run.step)
            tracker.log_artifact(str(plot), "plots")
            tracker.log_table(rows, f"{test_split}_predictions.json")
            tracker.log_artifacts(model_dir, "model")
    return {**run.finish(), **results}


# ---------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def evaluate(model, examples, *, tokenizer, num_labels: int, batch_size: int, max_length: int, device,
             precision: str, dist: Distributed | None = None) -> tuple[dict[str, float], list[int]]:
    """(accuracy, macro_f1 and the mean cross-entropy ``loss`` over ``examples``; the predicted class ids).

    Texts go in length order, so that a batch pads little; dropout is off. With several processes each
    predicts a block of ``examples`` and the predictions are gathered in order.
    """
    was_training = model.training
    model.eval()
    dist = dist or Distributed()
    texts, labels = [x.text for x in examples], [x.label for x in examples]
    block = dist.split(range(len(texts)))
    order = sorted(block, key=lambda i: len(texts[i]))
    predicted, loss_sum = [0] * len(texts), 0.0
    for batch in encode_batches(tokenizer, texts, labels, order, batch_size, max_length):
        batch = batch.to(device)
        with autocast(precision, device):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
        for position, label in zip(batch.positions, logits.argmax(-1).tolist()):
            predicted[position] = label
    model.train(was_training)
    if dist.enabled:
        predicted = dist.gather_rows(torch.tensor([predicted[i] for i in block], dtype=torch.long)).tolist()
        (loss_sum,) = dist.totals(loss_sum)
    return {**classification_figures(labels, predicted, num_labels), "loss": loss_sum / max(1, len(texts))}, predicted


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The training texts' order in ``epoch``: a shuffle that depends only on the seed and the epoch."""
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
