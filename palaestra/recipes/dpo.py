"""DPO: Direct Preference Optimization of the policy on preference pairs, no reward model.

Launch::

    palaestra train --target=dpo                                  # SmolLM2-135M on the shipped planner pairs
    palaestra train algo=dpo model=tiny algo.beta=0.2 algo.max_steps=20
    palaestra train algo=dpo algo.loss_type=ipo                   # IPO's squared loss instead of DPO's sigmoid
    torchrun --nproc_per_node 2 -m palaestra.cli train algo=dpo   # data parallel: each process a block of every batch
    torchrun --nproc_per_node 2 -m palaestra.cli train algo=dpo train.strategy=fsdp   # and each 1/2 of the weights

The loop, top to bottom: take a batch of pairs; compute the summed log-probability of the chosen
and of the rejected answer under the policy (with gradients) and under the reference (without);
minimise ``-log sigma(beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)])``
(Rafailov et al., 2023). With LoRA the reference is the same network with its adapter switched
off, so it costs no memory; full fine-tuning keeps a frozen copy. ``beta * (log pi - log pi_ref)``
is each answer's *implicit reward*: ``rewards/accuracies`` is the share of pairs where the chosen
answer's is higher, measured on held-out pairs after every epoch. The result is a merged Hugging
Face causal-LM folder, ``<run>/model``.

With several processes each takes a block of every batch's pairs (and of the held-out pairs,
gathered for the figures) and the gradients are summed: one process's update on the whole batch.
With ``train.strategy=fsdp`` each process also holds only its shard of the policy's (and a full
fine-tuning reference's) weights (:mod:`palaestra.sharding`).

Simplification relative to the paper: the reference log-probs are recomputed per batch (not
cached for the dataset).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from palaestra.algorithms.preference import dpo_loss, sequence_logprob
from palaestra.distributed import Distributed
from palaestra.recipes.dpo_config import DPOConfig
from palaestra.data.preferences import PreferenceBatch, collate_pairs
from palaestra.export import export_policy
from palaestra.models import frozen_reference_copy, reference_logits_context
from palaestra.models.logprobs import completion_logprobs
from palaestra.models.precision import autocast
from palaestra.data.preferences import load_pairs, pair_batch, pair_epoch, pair_rows, pair_steps
from palaestra.models.loading import enable_gradient_checkpointing, load_policy, policy_identity
from palaestra.optim import adamw, optimizer_step
from palaestra.recipes.methods import best_metric
from palaestra.recipes.run import Run, track_data_method
from palaestra.runtime import seed_everything, training_device
from palaestra.sharding import full_weights, idle_forward, idle_pass, lockstep_passes, shard_model, whole_model

log = logging.getLogger("palaestra")

_STAT_NAMES = {"rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
               "rewards/margin": "rewards/margins", "rewards/accuracy": "rewards/accuracies"}
"""dpo_loss's stats -> the names logged (TRL's, so dashboards read the same)."""


def main(config: DPOConfig, *, evaluate_before_after: bool = False) -> dict:
    """Train the policy with DPO; return the run folder, MLflow run id, figures and ``outputs["model_dir"]``."""
    train_cfg, algo, data = config.train, config.algo, config.data

    # ---- processes, seed and threads
    dist = Distributed.from_environment()
    seed_everything(train_cfg.seed, threads=train_cfg.threads)

    # ---- data (cheap, and fails before the model loads on a bad file)
    train_pairs, val_pairs = load_pairs(data, train_cfg.seed)

    # ---- policy, adapter, reference
    device = training_device(train_cfg.device, dist)
    model, tokenizer, precision, dtype = load_policy(config.model, device)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    reference = None if config.model.lora.enabled else frozen_reference_copy(model)  # LoRA: adapter off instead
    if train_cfg.strategy == "fsdp" and dist.enabled:
        for policy in (model, reference) if reference is not None else (model,):
            shard_model(policy, dist, precision=precision, cpu_offload=train_cfg.fsdp_cpu_offload)
    model.train()
    pad_id = tokenizer.pad_token_id
    # Answers end with the end-of-sequence token: the policy learns where a good answer stops.
    train_rows, val_rows = pair_rows(tokenizer, train_pairs, val_pairs, max_length=data.max_length, add_eos=True)

    # ---- run folder, optimizer, resume, tracking
    per_epoch, total_steps = pair_steps(len(train_rows), train_cfg.pairs_per_step, algo.epochs, algo.max_steps)
    run = Run(train_cfg, method="dpo", runs_root=Path("runs") / f"{data.name}-{algo.name}", total_steps=total_steps,
              identity=policy_identity(config.model),
              best=best_metric(config), dist=dist,
              progress=("loss", "rewards/accuracies", "rewards/margins"), curves=("loss", "rewards/margins"),
              plot=("dpo_curve.png", "DPO: loss, reward margin and held-out preference accuracy"))
    log.info("DPO on %d pairs (%d held out), %d updates (%d per epoch); device %s, precision %s, weights %s; reference: %s",
             len(train_rows), len(val_rows), total_steps, per_epoch, device, precision, dtype,
             "the adapter switched off" if reference is None else "a frozen copy")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = adamw(trainable, train_cfg, total_steps)
    run.resume(model=model, optimizer=optimizer, scheduler=scheduler)
    tracker = track_data_method(run, config)
    results: dict = {"outputs": {}}
    loss_args = {"beta": algo.beta, "label_smoothing": algo.label_smoothing, "loss_type": algo.loss_type}
    chunks = train_cfg.logprob_chunk_tokens

    def run_eval(step: int, label: str) -> dict:
        with full_weights(model), full_weights(reference):  # sharded weights gathered: each process scores its block alone
            figures = preference_eval(model, reference, val_rows, pad_id, batch_pairs=train_cfg.pairs_per_forward,
                                      precision=precision, dist=dist, chunk_tokens=chunks, **loss_args)
        return run.log_eval(step, label, figures)

    if evaluate_before_after and run.step == 0:
        results["before"] = run_eval(0, "before")

    with run:
        for step in run.steps():
            # 1. batch: the step's pairs of this epoch's seeded shuffle
            epoch, rows = pair_batch(train_rows, train_cfg.pairs_per_step, step, train_cfg.seed)

            # 2. log-probs of both answers under the policy and the reference, 3. DPO loss, accumulated over
            #    the micro-batches of this process's block of the pairs
            optimizer.zero_grad(set_to_none=True)
            totals = {"loss": 0.0, **{name: 0.0 for name in _STAT_NAMES.values()}, "logps/chosen": 0.0, "logps/rejected": 0.0,
                      "tokens": 0.0}
            mine = dist.split(rows)
            micro_batches = range(0, len(mine), train_cfg.pairs_per_forward)
            for _ in range(lockstep_passes(model, len(micro_batches), dist)):  # a sharded model's processes pass as
                idle_forward(reference if reference is not None else model)    # often as each other: the reference's
                idle_pass(model)                                               # and the policy's passes, idly
            for start in micro_batches:
                micro = mine[start : start + train_cfg.pairs_per_forward]
                batch = collate_pairs(micro, pad_id)
                with run.timed("reference"), torch.no_grad():
                    ref_logps = answer_logps(reference if reference is not None else model, batch, precision,
                                             adapter_off=reference is None, chunk_tokens=chunks)
                with run.timed("policy_forward_backward"):
                    logps = answer_logps(model, batch, precision, chunk_tokens=chunks)
                    half = batch.num_pairs
                    loss, stats = dpo_loss(logps[:half], logps[half:], ref_logps[:half], ref_logps[half:], **loss_args)
                    share = len(micro) / len(rows)  # the batch loss is the mean over all its pairs
                    (loss * share).backward()
                totals["loss"] += float(loss.detach()) * share
                for key, name in _STAT_NAMES.items():
                    totals[name] += stats[key] * share
                totals["logps/chosen"] += float(logps[:half].detach().mean()) * share
                totals["logps/rejected"] += float(logps[half:].detach().mean()) * share
                totals["tokens"] += int(batch.completion_mask.sum())

            # 4. step (the gradients summed over the processes)
            with run.timed("optimizer"):
                grad_norm = optimizer_step(trainable, optimizer, scheduler, train_cfg.max_grad_norm, dist)
                totals = dict(zip(totals, dist.totals(*totals.values())))
            tokens = totals.pop("tokens")

            # 5. log / eval (every epoch) / checkpoint
            elapsed = run.step_seconds()
            run.log(step, {**totals, "grad_norm": grad_norm, "learning_rate": scheduler.get_last_lr()[0],
                           "epoch": pair_epoch(step, epoch, train_cfg.pairs_per_step, len(train_rows)),
                           "tokens_per_second": tokens / elapsed})
            if run.end_of_step(step, run_eval(step, "train") if run.eval_due(step, epoch_steps=per_epoch) else None):
                break

    # ---- final figures, the merged policy, cleanup
    if run.finished or run.out_of_time:  # a spent time budget ends the run too (it can still be resumed)
        results["after"] = run.evaluation_at(run.step) or run_eval(run.step, "after")
    if run.finished or run.out_of_time:
        model = whole_model(model, lambda: load_policy(config.model, device)[0])  # a sharded model, gathered
    if (run.finished or run.out_of_time) and dist.is_main:  # the main process writes the policy
        folder = export_policy(model, tokenizer, run.run_dir / "model", merge=True)  # merges the adapter in place: last use
        results["outputs"]["model_dir"] = str(folder)
        log.info("policy written to %s", folder)
        if tracker:  # the policy is the run's "model" artifact (tokenizer inside), as SFT's is
            tracker.log_artifacts(folder, "model")
            if config.tracking.registered_model:
                from palaestra.registry.models import register  # the registry only when asked for

                register(tracker, config.tracking.registered_model, results)
    return {**run.finish(), **results}


# ---------------------------------------------------------------------------------------- building blocks


def answer_logps(model, batch: PreferenceBatch, precision: str, *, adapter_off: bool = False,
                 chunk_tokens: int = 0) -> torch.Tensor:
    """[2B] summed log-probs of each row's answer; ``adapter_off`` computes the LoRA model's reference;
    ``chunk_tokens`` > 0: the LM head in chunks (``train.logprob_chunk_tokens``)."""
    device = next(model.parameters()).device
    with reference_logits_context(model) if adapter_off else nullcontext(), autocast(precision, device.type):
        token_logps, _ = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                             batch.completion_mask, chunk_tokens=chunk_tokens)
    return sequence_logprob(token_logps.float(), batch.completion_mask.to(device))


@torch.no_grad()
def preference_eval(model, reference, rows: list, pad_id: int, *, batch_pairs: int, precision: str, beta: float,
                    label_smoothing: float, loss_type: str, dist: Distributed | None = None,
                    chunk_tokens: int = 0) -> dict[str, float]:
    """Held-out figures: ``preference_accuracy`` (share of pairs whose chosen answer has the higher implicit reward),
    ``reward_margin``, ``loss``, and the mean implicit rewards. With several processes each scores a block of
    ``rows`` and the log-probs are gathered in order."""
    was_training = model.training
    model.eval()
    dist = dist or Distributed()
    logps = {key: [torch.zeros(0)] for key in ("chosen", "rejected", "ref_chosen", "ref_rejected")}
    mine = dist.split(rows)
    for start in range(0, len(mine), batch_pairs):
        batch = collate_pairs(mine[start : start + batch_pairs], pad_id)
        half = batch.num_pairs
        policy = answer_logps(model, batch, precision, chunk_tokens=chunk_tokens).cpu()
        ref = answer_logps(reference if reference is not None else model, batch, precision, adapter_off=reference is None,
                           chunk_tokens=chunk_tokens).cpu()
        for key, value in (("chosen", policy[:half]), ("rejected", policy[half:]), ("ref_chosen", ref[:half]),
                           ("ref_rejected", ref[half:])):
            logps[key].append(value)
    model.train(was_training)
    gathered = {key: dist.gather_rows(torch.cat(parts)) for key, parts in logps.items()}
    loss, stats = dpo_loss(gathered["chosen"], gathered["rejected"], gathered["ref_chosen"], gathered["ref_rejected"],
                           beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
    return {"preference_accuracy": stats["rewards/accuracy"], "reward_margin": stats["rewards/margin"], "loss": float(loss),
            "rewards/chosen": stats["rewards/chosen"], "rewards/rejected": stats["rewards/rejected"]}
