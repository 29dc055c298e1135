"""SFT: supervised fine-tuning on chat data, the loss on the assistant's tokens only.

Launch::

    palaestra train experiment=planner                   # the planner template: LoRA r16 on q/k/v/o, MLflow contract, registry
    palaestra train --target=sft data.path=chats.jsonl   # any chat JSONL file ({"messages"} or {"prompt", "completion"})
    palaestra train algo=sft model.lora.enabled=false    # full fine-tuning
    torchrun --nproc_per_node 2 -m palaestra.cli train algo=sft   # data parallel: each process a share of every update
    torchrun --nproc_per_node 2 -m palaestra.cli train algo=sft train.strategy=fsdp   # and each 1/2 of the weights

The loop, top to bottom: tokenise every conversation with the model's chat template (labels only
on assistant turns), pack short examples into sequences of up to ``data.max_length`` tokens, then
per update take ``train.sequences_per_step`` sequences of a seeded per-epoch shuffle in micro-batches of
``train.sequences_per_forward`` and step AdamW on the token-mean cross-entropy of the whole update.
Each epoch ends with the validation loss; the best epoch's weights are kept and exported as a
merged Hugging Face folder (``run_dir/model``, tokenizer included) that the MLflow run carries as
its ``model`` artifact and, with ``tracking.registered_model``, registers in the model registry.
With several processes each takes a block of every update's sequences (and of the validation set),
divides its token loss by the update's target tokens summed over the processes, and the gradients are
summed: the same update one process makes on the whole batch. With ``train.strategy=fsdp`` each process
also holds only its shard of the weights, gradients and optimizer state (:mod:`palaestra.sharding`).

What a planner run logs in MLflow (the planner template's contract; experiment=planner sets
tracking.params=contract): params learning_rate, batch_size, epochs, dataset_version, model_base,
fine_tuning_method, lora_r, lora_alpha (the whole resolved config is the artifact config.yaml);
metrics train_loss and val_loss with step = epoch (per-update figures under train/...); tags
policy_id, task, dataset_version; artifacts model and tokenizer.

Simplifications: packing is next-fit in file order, done once (the packed sequences are shuffled
per epoch); validation is the loss only (generation metrics belong to evaluation and replay).
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import torch

from palaestra.config.errors import ConfigError
from palaestra.recipes.sft_config import SFTConfig
from palaestra.data.chat import (
    IGNORE_INDEX,
    Batch,
    TokenizedExample,
    collate,
    load_chat_data,
    pack_examples,
    summed_token_loss,
    tokenize_conversation,
)
from palaestra.distributed import Distributed
from palaestra.export import export_policy, save_tokenizer
from palaestra.models import model_id
from palaestra.models.loading import enable_gradient_checkpointing, load_policy, policy_identity
from palaestra.models.logprobs import final_hidden_states, head_logprobs
from palaestra.models.precision import autocast
from palaestra.optim import adamw, optimizer_step
from palaestra.recipes.methods import best_metric
from palaestra.recipes.run import Run, config_dict, remember
from palaestra.runtime import seed_everything, training_device
from palaestra.sharding import full_weights, idle_pass, lockstep_passes, shard_model, whole_model

log = logging.getLogger("palaestra")


def main(config: SFTConfig, *, evaluate_before_after: bool = False) -> dict:
    """Fine-tune on chat data; return the run folder, the MLflow run id and the exported model folder."""
    train_cfg, algo, data_cfg = config.train, config.algo, config.data

    # ---- processes, seed and threads
    dist = Distributed.from_environment()
    seed_everything(train_cfg.seed, threads=train_cfg.threads)

    # ---- data (cheap, and fails before the model loads on a bad dataset)
    chat = load_chat_data(data_cfg)

    # ---- model and adapter
    device = training_device(train_cfg.device, dist)
    model, tokenizer, precision, dtype = load_policy(config.model, device)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if train_cfg.strategy == "fsdp" and dist.enabled:
        shard_model(model, dist, precision=precision, cpu_offload=train_cfg.fsdp_cpu_offload)
    model.train()
    compute_dtype = torch.bfloat16 if precision == "bf16" else next(model.parameters()).dtype

    # ---- tokenise and pack: rows are lists of examples (one each without packing)
    train_rows = _rows(tokenizer, chat.train, data_cfg.max_length, algo.assistant_only_loss, algo.packing, "train")
    val_rows = _rows(tokenizer, chat.val, data_cfg.max_length, algo.assistant_only_loss, algo.packing, "validation")
    pad_id = tokenizer.pad_token_id
    updates_per_epoch = math.ceil(len(train_rows) / train_cfg.sequences_per_step)
    total_updates = updates_per_epoch * algo.epochs
    if algo.max_steps:
        total_updates = min(total_updates, algo.max_steps)

    # ---- run folder, optimizer, resume, tracking
    run = Run(train_cfg, method="sft", runs_root=Path("runs") / f"{data_cfg.name}-sft", total_steps=total_updates,
              identity=policy_identity(config.model),
              best=best_metric(config), patience=algo.early_stopping_patience, dist=dist,
              state={"epoch": 0, "epoch_position": 0, "epoch_loss_sum": 0.0, "epoch_targets": 0},
              progress=("train/step_loss", "learning_rate"), curves=("train/step_loss", "val_loss"),
              plot=("loss_curve.png", "SFT: training and validation loss"))
    log.info("device %s, compute precision %s, weights %s; %d train conversations in %d sequences, %d validation; "
             "%d updates (%d per epoch)", device, precision, dtype, len(chat.train), len(train_rows), len(chat.val),
             total_updates, updates_per_epoch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = adamw(trainable, train_cfg, total_updates)
    state = run.state
    if run.resume(model=model, optimizer=optimizer, scheduler=scheduler):
        log.info("resuming in epoch %d at sequence %d", state["epoch"] + 1, state["epoch_position"])
    tags = {"policy_id": _policy_id(config), "task": data_cfg.name, "dataset_version": chat.version, "algo": "sft",
            "model": model_id(config.model.name, config.model.path)}
    tracker = run.track(config.tracking, run_name=f"{data_cfg.name}-sft-{config.model.name}", tags=tags,
                        config=config_dict(config),
                        params=contract_params(config, chat.version) if config.tracking.params == "contract" else None)
    results: dict = {"outputs": {}}
    forward = dict(device=device, precision=precision, dtype=compute_dtype, chunk_tokens=train_cfg.logprob_chunk_tokens)
    validate = dict(batch_size=train_cfg.sequences_per_forward, pad_id=pad_id, packed=algo.packing, dist=dist, **forward)

    if evaluate_before_after and run.step == 0:
        results["before"] = {"val_loss": validation_loss(model, val_rows, **validate)}
        log.info("validation loss before training: %.4f", results["before"]["val_loss"])

    with run:
        for step in run.steps():

            # 1. batch: the next sequences_per_step sequences of this epoch's shuffle (this process's block of
            #    them), in micro-batches
            order = _epoch_order(len(train_rows), train_cfg.seed, state["epoch"])
            chosen = order[state["epoch_position"] : state["epoch_position"] + train_cfg.sequences_per_step]
            mine = dist.split(chosen)
            micro_batches = [
                collate([train_rows[i] for i in mine[k : k + train_cfg.sequences_per_forward]], pad_id, algo.packing)
                for k in range(0, len(mine), train_cfg.sequences_per_forward)
            ]
            num_targets = int(dist.totals(sum(batch.num_targets for batch in micro_batches))[0])

            # 2. loss and step: the token-mean loss of the whole update
            learning_rate = scheduler.get_last_lr()[0]
            loss, grad_norm = train_update(model, optimizer, scheduler, trainable, micro_batches, num_targets,
                                           max_grad_norm=train_cfg.max_grad_norm, dist=dist, **forward)
            state["epoch_position"] += len(chosen)
            state["epoch_loss_sum"] += loss * num_targets
            state["epoch_targets"] += num_targets

            # 3. log the update
            elapsed = run.step_seconds()
            tokens = dist.totals(sum(int((batch.segment_ids >= 0).sum()) for batch in micro_batches))[0]
            run.log(step, {
                "train/step_loss": loss, "train/target_tokens": num_targets, "learning_rate": learning_rate,
                "grad_norm": grad_norm, "epoch": state["epoch"] + state["epoch_position"] / len(order),
                "tokens_per_second": tokens / elapsed,
            })

            # 4. epoch end (or the last update): validation loss, which keep-best and early stopping follow
            figures = None
            if state["epoch_position"] >= len(order) or step == total_updates:
                epoch = state["epoch"] + 1
                figures = {"val_loss": validation_loss(model, val_rows, **validate)}
                train_loss = state["epoch_loss_sum"] / max(1, state["epoch_targets"])
                remember(state, figures, step)
                run.record({"step": step, "epoch": epoch, "train_loss": train_loss, **figures})
                log.info("epoch %d (update %d): train_loss=%.4f val_loss=%.4f", epoch, step, train_loss, figures["val_loss"])
                if tracker:
                    tracker.log_metrics({"train_loss": train_loss, **figures}, step=epoch)  # the planner contract: step = epoch
                state.update(epoch=epoch, epoch_position=0, epoch_loss_sum=0.0, epoch_targets=0)

            # 5. checkpoint, keep-best, early stopping
            if run.end_of_step(step, figures):
                break

    # ---- the best weights (every process loads its shards), exported by the main process; artifacts, registry
    if run.finished:
        loaded_best = run.load_best(model)
        model = whole_model(model, lambda: load_policy(config.model, device)[0])  # a sharded model, gathered
    if run.finished and dist.is_main:
        if loaded_best:
            log.info("exporting the best epoch's weights (val_loss %.4f)", state["best_metric"])
        if state["best_metric"] is not None:
            results["after"] = {"val_loss": state["best_metric"]}
        model_dir, tokenizer_dir = run.run_dir / "model", run.run_dir / "tokenizer"
        if config.model.lora.enabled:
            model = model.float()  # merge the adapter in fp32: bf16 base weights would round most of a small update away
        export_policy(model, tokenizer, model_dir, merge=True)
        save_tokenizer(tokenizer, tokenizer_dir)
        results["outputs"] = {"model_dir": str(model_dir), "tokenizer_dir": str(tokenizer_dir)}
        log.info("model written to %s", model_dir)
        if tracker:
            tracker.log_artifacts(model_dir, "model")
            tracker.log_artifacts(tokenizer_dir, "tokenizer")
            # a finished run that is resumed again keeps the version it registered the first time
            store = tracker.live()  # the registry needs the run's writes in the store
            version = store.client.get_run(store.run_id).data.tags.get("registered_model_version") if store else None
            if config.tracking.registered_model and store is None:
                log.warning("the model was not registered as %s: the tracking store is away; resume the run when it "
                            "is back to register it", config.tracking.registered_model)
            elif config.tracking.registered_model and version is None:
                from palaestra.registry.models import register_model

                version = register_model(store, store.run_id, config.tracking.registered_model,
                                         tags={"dataset_version": chat.version, "policy_id": _policy_id(config)})
                tracker.set_tags({"registered_model": config.tracking.registered_model, "registered_model_version": version})
                log.info("registered models:/%s/%s", config.tracking.registered_model, version)
            if version is not None:
                results["registered_model_version"] = version
    return {**run.finish(), **results}


# ---------------------------------------------------------------------------------------- helpers


def train_update(model, optimizer, scheduler, trainable, micro_batches: list[Batch], num_targets: int, *, device,
                 precision: str, dtype, max_grad_norm: float, dist: Distributed | None = None,
                 chunk_tokens: int = 0) -> tuple[float, float]:
    """One optimizer update; returns (token-mean loss of the update, gradient norm before clipping).

    Each micro-batch's summed token loss is divided by the target tokens of the *whole* update
    (every process's), so the accumulated gradient, summed over the processes, is that of the
    update's token mean however the tokens fall into micro-batches and processes:
    loss = sum over micro-batches m of sum_t CE_t(m) / N_update.
    """
    optimizer.zero_grad(set_to_none=True)
    idle_passes = lockstep_passes(model, len(micro_batches), dist) if dist else 0  # a sharded model's processes
    total = 0.0                                                                     # pass as often as each other
    for batch in micro_batches:
        loss_sum, _ = forward_loss(model, batch, device=device, precision=precision, dtype=dtype, chunk_tokens=chunk_tokens)
        loss = loss_sum / max(1, num_targets)
        loss.backward()
        total += float(loss.detach())
    for _ in range(idle_passes):
        idle_pass(model)
    grad_norm = optimizer_step(trainable, optimizer, scheduler, max_grad_norm, dist)
    return (dist.totals(total)[0] if dist else total), grad_norm


def forward_loss(model, batch: Batch, *, device, precision: str, dtype, chunk_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """(summed next-token loss over the batch's scored tokens, their count). ``chunk_tokens`` > 0: the LM head
    only at the positions that predict a scored token, over chunks of that many (``train.logprob_chunk_tokens``)."""
    with autocast(precision, device):
        if not chunk_tokens:
            return summed_token_loss(model(**batch.model_inputs(device, dtype)).logits, batch.labels)
        hidden = final_hidden_states(model, **batch.model_inputs(device, dtype))[:, :-1]
        targets = batch.labels[:, 1:].to(hidden.device)
        scored = targets != IGNORE_INDEX
        logprobs, _ = head_logprobs(model, hidden[scored], targets[scored], temperature=1.0, chunk_tokens=chunk_tokens)
    return -logprobs.sum(), int(scored.sum())


@torch.no_grad()
def validation_loss(model, rows: list[list[TokenizedExample]], *, batch_size: int, pad_id: int, packed: bool,
                    device, precision: str, dtype, dist: Distributed | None = None, chunk_tokens: int = 0) -> float:
    """Token-mean loss over every scored token of ``rows`` (dropout off); with several processes each
    scores its block of ``rows`` (with the whole weights, when they are sharded) and the sums are added up."""
    was_training = model.training
    model.eval()
    rows = dist.split(rows) if dist else rows
    total, count = 0.0, 0
    with full_weights(model):
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id, packed)
            loss_sum, n = forward_loss(model, batch, device=device, precision=precision, dtype=dtype, chunk_tokens=chunk_tokens)
            total, count = total + float(loss_sum), count + n
    model.train(was_training)
    if dist:
        total, count = dist.totals(total, count)
    return total / max(1, count)


def _rows(tokenizer, conversations: list[list[dict]], max_length: int, assistant_only: bool, packing: bool,
          split: str) -> list[list[TokenizedExample]]:
    """Tokenise, drop examples with nothing to score, and pack (or keep one example per row)."""
    examples = [tokenize_conversation(tokenizer, m, max_length=max_length, assistant_only=assistant_only) for m in conversations]
    kept = [e for e in examples if e.num_targets > 0]
    if len(kept) < len(examples):
        log.warning("%d of %d %s conversations have no assistant token within data.max_length=%d; skipped",
                    len(examples) - len(kept), len(examples), split, max_length)
    if not kept:
        raise ConfigError(f"no {split} conversation has an assistant token within data.max_length={max_length}; raise data.max_length")
    if not packing:
        return [[e] for e in kept]
    return [[kept[i] for i in group] for group in pack_examples([len(e) for e in kept], max_length)]


def _epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The sequences' order in ``epoch``: a shuffle that depends only on the seed and the epoch."""
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _policy_id(config: SFTConfig) -> str:
    return config.tracking.policy_id or f"{config.data.name}-sft"


def contract_params(config: SFTConfig, dataset_version: str) -> dict[str, str]:
    """The run's MLflow params: exactly the planner template's eight (the full config is an artifact)."""
    lora = config.model.lora
    return {
        "learning_rate": config.train.learning_rate,
        "batch_size": config.train.sequences_per_step,
        "epochs": config.algo.epochs,
        "dataset_version": dataset_version,
        "model_base": model_id(config.model.name, config.model.path),
        "fine_tuning_method": "lora" if lora.enabled else "full",
        "lora_r": lora.r if lora.enabled else "none",
        "lora_alpha": lora.alpha if lora.enabled else "none",
    }
