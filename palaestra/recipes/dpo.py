"""DPO: Direct Preference Optimization of the policy on preference pairs, no reward model.

Launch::

    palaestra train --target=dpo                                  # SmolLM2-135M on the shipped planner pairs
    palaestra train algo=dpo model=tiny algo.beta=0.2 algo.max_steps=20
    palaestra train algo=dpo algo.loss_type=ipo                   # IPO's squared loss instead of DPO's sigmoid

The loop, top to bottom: take a batch of pairs; compute the summed log-probability of the chosen
and of the rejected answer under the policy (with gradients) and under the reference (without);
minimise ``-log sigma(beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)])``
(Rafailov et al., 2023). With LoRA the reference is the same network with its adapter switched
off, so it costs no memory; full fine-tuning keeps a frozen copy. ``beta * (log pi - log pi_ref)``
is each answer's *implicit reward*: ``rewards/accuracies`` is the share of pairs where the chosen
answer's is higher, measured on held-out pairs after every epoch. The result is a merged Hugging
Face causal-LM folder, ``<run>/model``.

Simplifications relative to the paper: the reference log-probs are recomputed per batch (not
cached for the dataset), and training is single-process.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from palaestra.algorithms.preference import dpo_loss, sequence_logprob
from palaestra.recipes.dpo_config import DPOConfig
from palaestra.data.preferences import PreferenceBatch, collate_pairs
from palaestra.export import export_policy
from palaestra.models import frozen_reference_copy, reference_logits_context
from palaestra.models.logprobs import completion_logprobs
from palaestra.models.precision import autocast
from palaestra.data.preferences import load_pairs, pair_batch, pair_epoch, pair_rows, pair_steps
from palaestra.models.loading import load_policy, policy_identity
from palaestra.optim import adamw, clip_gradients
from palaestra.recipes.run import track_data_method
from palaestra.runtime import seed_everything, training_device
from palaestra.recipes.methods import best_metric
from palaestra.recipes.run import Run

log = logging.getLogger("palaestra")

_STAT_NAMES = {"rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
               "rewards/margin": "rewards/margins", "rewards/accuracy": "rewards/accuracies"}
"""dpo_loss's stats -> the names logged (TRL's, so dashboards read the same)."""


def main(config: DPOConfig, *, evaluate_before_after: bool = False) -> dict:
    """Train the policy with DPO; return the run folder, MLflow run id, figures and ``outputs["model_dir"]``."""
    train_cfg, algo, data = config.train, config.algo, config.data

    # ---- seed and threads
    seed_everything(train_cfg.seed, threads=train_cfg.threads)

    # ---- data (cheap, and fails before the model loads on a bad file)
    train_pairs, val_pairs = load_pairs(data, train_cfg.seed)

    # ---- policy, adapter, reference
    device = training_device(train_cfg.device)
    model, tokenizer, precision, dtype = load_policy(config.model, device)
    reference = None if config.model.lora.enabled else frozen_reference_copy(model)  # LoRA: adapter off instead
    model.train()
    pad_id = tokenizer.pad_token_id
    # Answers end with the end-of-sequence token: the policy learns where a good answer stops.
    train_rows, val_rows = pair_rows(tokenizer, train_pairs, val_pairs, max_length=data.max_length, add_eos=True)

    # ---- run folder, optimizer, resume, tracking
    per_epoch, total_steps = pair_steps(len(train_rows), train_cfg.pairs_per_step, algo.epochs, algo.max_steps)
    run = Run(train_cfg, method="dpo", runs_root=Path("runs") / f"{data.name}-{algo.name}", total_steps=total_steps,
              identity=policy_identity(config.model),
              best=best_metric(config),
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

    def run_eval(step: int, label: str) -> dict:
        figures = preference_eval(model, reference, val_rows, pad_id, batch_pairs=train_cfg.pairs_per_forward,
                                  precision=precision, **loss_args)
        return run.log_eval(step, label, figures)

    if evaluate_before_after and run.step == 0:
        results["before"] = run_eval(0, "before")

    with run:
        for step in run.steps():
            # 1. batch: the step's pairs of this epoch's seeded shuffle
            epoch, rows = pair_batch(train_rows, train_cfg.pairs_per_step, step, train_cfg.seed)

            # 2. log-probs of both answers under the policy and the reference, 3. DPO loss, accumulated
            optimizer.zero_grad(set_to_none=True)
            totals = {"loss": 0.0, **{name: 0.0 for name in _STAT_NAMES.values()}, "logps/chosen": 0.0, "logps/rejected": 0.0}
            tokens = 0
            for start in range(0, len(rows), train_cfg.pairs_per_forward):
                micro = rows[start : start + train_cfg.pairs_per_forward]
                batch = collate_pairs(micro, pad_id)
                with run.timed("reference"), torch.no_grad():
                    ref_logps = answer_logps(reference if reference is not None else model, batch, precision,
                                             adapter_off=reference is None)
                with run.timed("policy_forward_backward"):
                    logps = answer_logps(model, batch, precision)
                    half = batch.num_pairs
                    loss, stats = dpo_loss(logps[:half], logps[half:], ref_logps[:half], ref_logps[half:], **loss_args)
                    share = len(micro) / len(rows)  # the batch loss is the mean over all its pairs
                    (loss * share).backward()
                totals["loss"] += float(loss.detach()) * share
                for key, name in _STAT_NAMES.items():
                    totals[name] += stats[key] * share
                totals["logps/chosen"] += float(logps[:half].detach().mean()) * share
                totals["logps/rejected"] += float(logps[half:].detach().mean()) * share
                tokens += int(batch.completion_mask.sum())

            # 4. step
            with run.timed("optimizer"):
                grad_norm = clip_gradients(trainable, train_cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()

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


def answer_logps(model, batch: PreferenceBatch, precision: str, *, adapter_off: bool = False) -> torch.Tensor:
    """[2B] summed log-probs of each row's answer; ``adapter_off`` computes the LoRA model's reference."""
    device = next(model.parameters()).device
    with reference_logits_context(model) if adapter_off else nullcontext(), autocast(precision, device.type):
        token_logps, _ = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    return sequence_logprob(token_logps.float(), batch.completion_mask.to(device))


@torch.no_grad()
def preference_eval(model, reference, rows: list, pad_id: int, *, batch_pairs: int, precision: str, beta: float,
                    label_smoothing: float, loss_type: str) -> dict[str, float]:
    """Held-out figures: ``preference_accuracy`` (share of pairs whose chosen answer has the higher implicit reward),
    ``reward_margin``, ``loss``, and the mean implicit rewards."""
    was_training = model.training
    model.eval()
    policy, ref = [], []
    for start in range(0, len(rows), batch_pairs):
        batch = collate_pairs(rows[start : start + batch_pairs], pad_id)
        half = batch.num_pairs
        logps = answer_logps(model, batch, precision)
        ref_logps = answer_logps(reference if reference is not None else model, batch, precision, adapter_off=reference is None)
        policy.append((logps[:half], logps[half:]))
        ref.append((ref_logps[:half], ref_logps[half:]))
    model.train(was_training)
    loss, stats = dpo_loss(torch.cat([c for c, _ in policy]), torch.cat([r for _, r in policy]),
                           torch.cat([c for c, _ in ref]), torch.cat([r for _, r in ref]),
                           beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
    return {"preference_accuracy": stats["rewards/accuracy"], "reward_margin": stats["rewards/margin"], "loss": float(loss),
            "rewards/chosen": stats["rewards/chosen"], "rewards/rejected": stats["rewards/rejected"]}
