"""Mamba: a small Mamba language model trained from scratch on a text corpus (MARK's mamba target).

Launch::

    palaestra train --target=mamba                                   # the shipped corpus (Python's documentation)
    palaestra train --target=mamba algo.corpus=books/ algo.epochs=5  # a folder of .txt files (or a .txt / .jsonl file)
    palaestra eval algo=mamba eval.checkpoint=runs/python-docs-mamba/<stamp>   # held-out perplexity of the exported model
    torchrun --nproc_per_node 2 -m palaestra.cli train --target=mamba  # data parallel: each process a block of every step

The loop, top to bottom: read the corpus and hold out about ``algo.val_fraction`` of it (whole
documents, seeded), train a byte-level BPE tokenizer of ``algo.vocab_size`` tokens on the training
documents (saved in the run folder, and reused when the run resumes), cut each split into one
stream of ``algo.max_length``-token chunks, and build transformers' ``MambaForCausalLM`` from
scratch (d_model ``algo.d_model``, ``algo.n_layers`` blocks; the selective scan runs as mambapy's
parallel scan, so no CUDA kernel is needed). Then per step take the next ``train.sequences_per_step``
chunks of a seeded per-epoch shuffle, in micro-batches of ``train.sequences_per_forward``, and step
AdamW on the token-mean next-token loss. Each epoch ends with the held-out loss and perplexity
(keep-best and early stopping follow the loss) and a few sampled continuations of
``algo.sample_prompts`` (train.log and an MLflow table). At the end the best epoch's weights and
the tokenizer are exported as one Hugging Face folder (``run_dir/model``) that
``AutoModelForCausalLM`` and ``AutoTokenizer`` load, logged to MLflow as the ``model`` artifact.
With several processes each takes a block of every step's chunks (and of the held-out chunks) and
divides by the step's target tokens summed over the processes; the gradients are summed, so the
update is the one a single process makes on the whole step. The main process samples and exports.

Simplifications relative to the Mamba paper's language models: no mixed precision, no
gradient checkpointing and a corpus far smaller than the Pile; the chunks cut across documents
(``<|endoftext|>`` marks the joins) and the last, shorter chunk of a split is padded.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

from palaestra.recipes.mamba_config import MambaConfig
from palaestra.distributed import Distributed
from palaestra.export import export_policy
from palaestra.language_model.corpus import read_corpus, split_documents
from palaestra.language_model.model import (
    build_model,
    collate,
    generate_samples,
    held_out_figures,
    freed_memory_kept,
    parameter_groups,
    perplexity,
    summed_loss,
)
from palaestra.language_model.tokenizer import chunk, load_tokenizer, save_tokenizer, token_stream, train_tokenizer
from palaestra.models.loading import enable_gradient_checkpointing
from palaestra.optim import adamw, optimizer_step
from palaestra.recipes.methods import best_metric
from palaestra.recipes.run import Run, config_dict, resolve_run_dir
from palaestra.runtime import seed_everything, training_device

log = logging.getLogger("palaestra")


def main(config: MambaConfig, *, evaluate_before_after: bool = False) -> dict:
    """Train the language model; return the run folder, the MLflow run id, the exported folder and the perplexities."""
    algo, train_cfg = config.algo, config.train
    dist = Distributed.from_environment()
    seed_everything(train_cfg.seed, threads=train_cfg.threads)

    # ---- data: read, checked and split before anything heavy
    corpus = read_corpus(algo.corpus)  # a mistake in it is a one-line ConfigError
    train_docs, held_docs = split_documents(corpus.documents, algo.val_fraction, train_cfg.seed)
    runs_root = Path("runs") / f"{corpus.name}-mamba"

    # ---- the tokenizer: trained on the training documents, or the resumed run's own
    run_dir, resuming = resolve_run_dir(train_cfg, runs_root)  # the folder the Run below takes
    reuse = resuming is not None and (run_dir / "tokenizer" / "tokenizer.json").is_file()
    if reuse:
        tokenizer = load_tokenizer(run_dir / "tokenizer")
    else:
        tokenizer = train_tokenizer([d.text for d in train_docs], algo.vocab_size, algo.max_length)
    if len(tokenizer) < algo.vocab_size:
        log.warning("the corpus gives a vocabulary of %d tokens, fewer than algo.vocab_size=%d", len(tokenizer),
                    algo.vocab_size)
    train_chunks = chunk(token_stream(tokenizer, [d.text for d in train_docs]), algo.max_length)
    held_chunks = chunk(token_stream(tokenizer, [d.text for d in held_docs]), algo.max_length)
    steps_per_epoch = math.ceil(len(train_chunks) / train_cfg.sequences_per_step)
    total_steps = min(steps_per_epoch * algo.epochs, algo.max_steps) if algo.max_steps else steps_per_epoch * algo.epochs

    # ---- the run: folder, model from scratch, optimizer, resume, tracking
    run = Run(train_cfg, method="mamba", runs_root=runs_root, total_steps=total_steps, best=best_metric(config),
              identity={"vocab_size": len(tokenizer), "d_model": algo.d_model, "n_layers": algo.n_layers},
              patience=algo.early_stopping_patience, dist=dist,
              state={"epoch_loss_sum": 0.0, "epoch_tokens": 0, "before": None},
              progress=("loss", "tokens_per_second"), curves=("loss",),
              plot=("loss_curve.png", "Mamba: training loss and held-out loss"))
    if run.dist.is_main and not reuse:
        save_tokenizer(tokenizer, run.run_dir / "tokenizer")
    device = training_device(train_cfg.device, dist)
    model = build_model(tokenizer, d_model=algo.d_model, n_layers=algo.n_layers, seed=train_cfg.seed).to(device)
    if train_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    optimizer, scheduler = adamw(parameter_groups(model, train_cfg.weight_decay), train_cfg, total_steps)
    run.resume(model=model, optimizer=optimizer, scheduler=scheduler)
    state = run.state
    tags = {"algo": "mamba", "corpus": corpus.name, "vocab_size": len(tokenizer), "d_model": algo.d_model,
            "n_layers": algo.n_layers}
    tracker = run.track(config.tracking, run_name=f"{corpus.name}-mamba", tags=tags, config=config_dict(config))
    log.info("device %s; corpus %s: %d training documents in %d chunks of up to %d tokens, %d held out in %d chunks; "
             "vocabulary %d, %.2fM parameters; %d steps (%d per epoch)", device, corpus.name, len(train_docs),
             len(train_chunks), algo.max_length, len(held_docs), len(held_chunks), len(tokenizer),
             sum(p.numel() for p in model.parameters()) / 1e6, total_steps, steps_per_epoch)
    measure = dict(batch_size=train_cfg.sequences_per_forward, pad_id=tokenizer.pad_token_id, device=device, dist=dist)
    results: dict = {"subject": corpus.name, "outputs": {}}
    if evaluate_before_after and run.step == 0:
        state["before"] = held_out_figures(model, held_chunks, **measure)
        log.info("held-out perplexity before training: %.1f", state["before"]["perplexity"])

    with run, freed_memory_kept(device == "cpu"):  # a step reuses the last step's pages: about 2x faster on a CPU
        for step in run.steps():
            # 1. the batch: the next sequences_per_step chunks of this epoch's shuffle (this process's block of
            #    them), in micro-batches
            epoch, position = divmod(step - 1, steps_per_epoch)
            order = epoch_order(len(train_chunks), train_cfg.seed, epoch)
            chosen = order[position * train_cfg.sequences_per_step : (position + 1) * train_cfg.sequences_per_step]
            mine = dist.split(chosen)
            micro_batches = [collate([train_chunks[i] for i in mine[k : k + train_cfg.sequences_per_forward]],
                                     tokenizer.pad_token_id).to(device)
                             for k in range(0, len(mine), train_cfg.sequences_per_forward)]
            num_targets = int(dist.totals(sum(batch.num_targets for batch in micro_batches))[0])

            # 2. loss and step: the token-mean loss of the whole update
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            for batch in micro_batches:
                loss_sum, _ = summed_loss(model, batch)
                (loss_sum / num_targets).backward()  # each micro-batch's share of the update's token mean
                loss += float(loss_sum.detach()) / num_targets
            grad_norm = optimizer_step(list(model.parameters()), optimizer, scheduler, train_cfg.max_grad_norm, dist)
            loss, tokens = dist.totals(loss, sum(int(batch.attention_mask.sum()) for batch in micro_batches))
            state["epoch_loss_sum"] += loss * num_targets
            state["epoch_tokens"] += num_targets
            run.log(step, {"loss": loss, "learning_rate": learning_rate, "grad_norm": grad_norm,
                           "epoch": epoch + (position + 1) / steps_per_epoch,
                           "tokens_per_second": tokens / run.step_seconds()})

            # 3. epoch end (or the last step): held-out loss and perplexity, a few samples
            figures = None
            if step % steps_per_epoch == 0 or step == total_steps:
                with run.timed("evaluation"):
                    figures = held_out_figures(model, held_chunks, **measure)
                train_loss = state["epoch_loss_sum"] / max(1, state["epoch_tokens"])
                run.log_eval(step, f"held-out, epoch {epoch + 1}", figures)
                run.record({"step": step, "epoch": epoch + 1, "train_loss": train_loss, **figures})
                state.update(epoch_loss_sum=0.0, epoch_tokens=0)
                if algo.sample_tokens and algo.sample_prompts and dist.is_main:
                    with run.timed("samples"):
                        _log_samples(run, model, tokenizer, algo, epoch + 1, step, device, train_cfg.seed)

            # 4. checkpoint, keep-best, early stopping
            if run.end_of_step(step, figures):
                break

    # ---- the best epoch's weights with the tokenizer, exported; perplexity before and after
    if run.finished:
        if run.load_best(model):
            log.info("the best epoch's weights (held-out loss %.4f)", state["best_metric"])
            results["after"] = {"val_loss": state["best_metric"], "perplexity": perplexity(state["best_metric"])}
        else:  # the last step always evaluates: the exported weights' figures
            results["after"] = run.evaluation_at(run.step) or held_out_figures(model, held_chunks, **measure)
        if state["before"] is not None:
            results["before"] = state["before"]
    if run.finished and dist.is_main:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model_dir = export_policy(model, tokenizer, run.run_dir / "model")  # with its tokenizer, atomically
        results["outputs"] = {"language_model_dir": str(model_dir)}
        log.info("held-out perplexity %.1f; model and tokenizer written to %s", results["after"]["perplexity"], model_dir)
        if tracker:
            tracker.log_metrics({f"final/{k}": v for k, v in results["after"].items()}, step=run.step)
            tracker.log_artifacts(model_dir, "model")
    return {**run.finish(), **results}


# ---------------------------------------------------------------------------------------- helpers


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The training chunks' order in ``epoch``: a shuffle that depends only on the seed and the epoch."""
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _log_samples(run: Run, model, tokenizer, algo, epoch: int, step: int, device, seed: int) -> None:
    """Continue the sample prompts; one train.log line each and the MLflow table samples/epoch-N.json."""
    rows = generate_samples(model, tokenizer, list(algo.sample_prompts), max_new_tokens=algo.sample_tokens,
                            temperature=algo.sample_temperature, seed=seed, device=device)
    for row in rows:
        log.info("sample (epoch %d): %r -> %r", epoch, row["prompt"], row["completion"])
    if run.tracker:
        run.tracker.log_table([{"epoch": epoch, "step": step, **row} for row in rows], f"samples/epoch-{epoch:03d}.json")
