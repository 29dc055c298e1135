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
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from palaestra import checkpoint as ckpt
from palaestra.algorithms.preference import dpo_loss, sequence_logprob
from palaestra.config import PalaestraConfig
from palaestra.data.preferences import PreferenceBatch, batch_for_step, collate_pairs, encode_pair, identical_pairs
from palaestra.export import export_policy
from palaestra.models import apply_lora, frozen_reference_copy, load_model_and_tokenizer, reference_logits_context
from palaestra.models.logprobs import completion_logprobs
from palaestra.models.precision import autocast, resolve_precision, weights_dtype
from palaestra.recipes.common import (
    StopSignals,
    stop_now,
    append_jsonl,
    attach_log_file,
    clip_gradients,
    fmt,
    lr_lambda,
    remember,
    resolve_run_dir,
    seed_everything,
    timed,
)
from palaestra.recipes.reward_model import load_pairs, start_tracking, track_best
from palaestra.tracking import plot_curves

log = logging.getLogger("palaestra")

_STAT_NAMES = {"rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
               "rewards/margin": "rewards/margins", "rewards/accuracy": "rewards/accuracies"}
"""dpo_loss's stats -> the names logged (TRL's, so dashboards read the same)."""


def main(config: PalaestraConfig, *, evaluate_before_after: bool = False) -> dict:
    """Train the policy with DPO; return the run folder, MLflow run id, figures and ``outputs["model_dir"]``."""
    train_cfg, algo, data = config.train, config.algo, config.data

    # ---- seed and threads
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    seed_everything(train_cfg.seed)

    # ---- data (cheap, and fails before the model loads on a bad file)
    train_pairs, val_pairs = load_pairs(config)

    # ---- policy, adapter, reference
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(config.model.precision, device)
    dtype = weights_dtype(config.model.dtype, precision, config.model.lora.enabled)
    model, tokenizer = load_model_and_tokenizer(config.model.name, path=config.model.path, dtype=dtype, device=device)
    if config.model.lora.enabled:
        lora = config.model.lora
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    reference = None if config.model.lora.enabled else frozen_reference_copy(model)  # LoRA: adapter off instead
    model.train()
    pad_id = tokenizer.pad_token_id
    # Answers end with the end-of-sequence token: the policy learns where a good answer stops.
    train_rows = [encode_pair(tokenizer, pair, data.max_length, add_eos=True) for pair in train_pairs]
    val_rows = [encode_pair(tokenizer, pair, data.max_length, add_eos=True) for pair in val_pairs]

    # ---- run folder, optimizer, resume
    run_dir, resume_from = resolve_run_dir(train_cfg, Path("runs") / f"{data.name}-{algo.name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    attach_log_file(run_dir / "train.log")
    per_epoch = math.ceil(len(train_rows) / train_cfg.batch_size)
    total_steps = algo.max_steps or algo.epochs * per_epoch
    log.info("device %s, precision %s, weights %s; %d training pairs, %d held out; %d updates (%d per epoch)",
             device, precision, dtype, len(train_rows), len(val_rows), total_steps, per_epoch)
    if identical_pairs(train_rows):
        log.warning("%d training pairs are identical after truncation to data.max_length=%d; raise data.max_length",
                    identical_pairs(train_rows), data.max_length)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=train_cfg.learning_rate, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
        weight_decay=train_cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, train_cfg.warmup_ratio, train_cfg.lr_schedule))
    state = {"step": 0, "mlflow_run_id": None, "best_metric": None, "evals_without_improvement": 0, "history": {},
             "last_eval": None, "last_eval_step": None}
    if resume_from is not None:
        state.update(ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler))
        log.info("resumed from %s at step %d", resume_from, state["step"])

    # ---- tracking
    tracker = start_tracking(config, state["mlflow_run_id"], run_dir)
    state["mlflow_run_id"] = tracker.run_id if tracker else None
    results: dict = {"run_dir": str(run_dir), "mlflow_run_id": state["mlflow_run_id"], "outputs": {}}
    loss_args = {"beta": algo.beta, "label_smoothing": algo.label_smoothing, "loss_type": algo.loss_type}

    def run_eval(step: int, label: str) -> dict:
        figures = preference_eval(model, reference, val_rows, pad_id, batch_pairs=train_cfg.micro_batch_size,
                                  precision=precision, **loss_args)
        log.info("eval (%s, step %d): %s", label, step, fmt(figures))
        remember(state, {f"eval/{k}": v for k, v in figures.items()}, step)
        if tracker:
            tracker.log_metrics({f"eval/{k}": v for k, v in figures.items()}, step=step)
        return figures

    if evaluate_before_after and state["step"] == 0:
        results["before"] = run_eval(0, "before")

    stop = StopSignals()
    loop_started = time.perf_counter()
    out_of_time = False
    steps_this_run = 0
    progress = tqdm(total=total_steps, initial=state["step"], desc="dpo", dynamic_ncols=True)
    try:
        while state["step"] < total_steps and not stop.requested:
            step = state["step"] + 1
            started = time.perf_counter()
            timings: dict[str, float] = {}

            # 1. batch: the step's pairs of this epoch's seeded shuffle (the step number alone fixes it)
            epoch, indices = batch_for_step(len(train_rows), train_cfg.batch_size, step, train_cfg.seed)
            rows = [train_rows[i] for i in indices]

            # 2. log-probs of both answers under the policy and the reference, 3. DPO loss, accumulated
            optimizer.zero_grad(set_to_none=True)
            totals = {"loss": 0.0, **{name: 0.0 for name in _STAT_NAMES.values()}, "logps/chosen": 0.0, "logps/rejected": 0.0}
            tokens = 0
            for start in range(0, len(rows), train_cfg.micro_batch_size):
                micro = rows[start : start + train_cfg.micro_batch_size]
                batch = collate_pairs(micro, pad_id)
                with timed(timings, "reference"), torch.no_grad():
                    ref_logps = answer_logps(reference if reference is not None else model, batch, precision,
                                             adapter_off=reference is None)
                with timed(timings, "policy_forward_backward"):
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
            with timed(timings, "optimizer"):
                grad_norm = clip_gradients(trainable, train_cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
            state["step"] = step

            # 5. log / eval / checkpoint
            elapsed = time.perf_counter() - started
            metrics = {**totals, "grad_norm": grad_norm, "learning_rate": scheduler.get_last_lr()[0],
                       "epoch": epoch + min(((step - 1) % per_epoch + 1) * train_cfg.batch_size, len(train_rows)) / len(train_rows),
                       "time/step": elapsed, **{f"time/{k}": v for k, v in timings.items()},
                       "tokens_per_second": tokens / elapsed}
            remember(state, {"loss": metrics["loss"], "rewards/margins": metrics["rewards/margins"]}, step)
            append_jsonl(run_dir / "metrics.jsonl", {"step": step, **metrics})
            log.info("step %d: %s", step, fmt(metrics), extra={"console": False})
            if tracker:
                tracker.log_metrics(metrics, step=step)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['rewards/accuracies']:.2f}",
                                 margin=f"{metrics['rewards/margins']:.3f}")

            evaluated = None
            epoch_done = step % per_epoch == 0 or step == total_steps
            if epoch_done or (train_cfg.eval_interval and step % train_cfg.eval_interval == 0):
                state["last_eval"], state["last_eval_step"] = run_eval(step, "epoch" if epoch_done else "train"), step
                evaluated = state["last_eval"].get(train_cfg.best_metric, state["last_eval"]["preference_accuracy"])
            steps_this_run += 1
            more = step < total_steps  # past the last step there is nothing left to stop
            out_of_time, interrupted = stop_now(train_cfg, stop, loop_started, steps_this_run)
            out_of_time, interrupted = more and out_of_time, more and interrupted
            if (train_cfg.save_interval and step % train_cfg.save_interval == 0) or stop.save_requested or interrupted \
                    or step == total_steps or evaluated is not None:
                stop.save_requested = False
                track_best(state, evaluated)
                path = ckpt.save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                            trainer_state=state, keep_last_n=train_cfg.keep_last_n or None)
                if evaluated is not None and train_cfg.save_best:
                    ckpt.save_best(run_dir, path, train_cfg.best_metric, evaluated)
            if interrupted:
                log.info("stopping at step %d (checkpoint saved); resume with train.resume=auto train.output_dir=%s", step, run_dir)
                break
            if train_cfg.early_stopping_patience and state["evals_without_improvement"] >= train_cfg.early_stopping_patience:
                log.info("early stopping at step %d: no improvement in %d evaluations", step, state["evals_without_improvement"])
                break
    except BaseException:
        if tracker:
            tracker.end("KILLED" if stop.requested else "FAILED")
        raise
    finally:
        progress.close()
        stop.restore()

    # ---- final figures, the merged policy, plots, cleanup
    early_stopped = bool(train_cfg.early_stopping_patience and state["evals_without_improvement"] >= train_cfg.early_stopping_patience)
    finished = state["step"] >= total_steps or early_stopped
    if finished or out_of_time:  # a spent time budget ends the run too (it can still be resumed)
        fresh = state["last_eval"] is not None and state["last_eval_step"] == state["step"]
        results["after"] = state["last_eval"] if fresh else run_eval(state["step"], "after")
        folder = export_policy(model, tokenizer, run_dir / "model", merge=True)  # merges the adapter in place: last use
        results["outputs"]["model_dir"] = str(folder)
        log.info("policy written to %s", folder)
    if tracker:
        _log_plots(tracker, state, run_dir)
        tracker.log_artifact(str(run_dir / "train.log"))
        if results["outputs"]:  # the policy is the run's "model" artifact (tokenizer inside), as SFT's is
            tracker.log_artifacts(results["outputs"]["model_dir"], "model")
            if config.tracking.registered_model:
                _register(tracker, config.tracking.registered_model, results)
        tracker.end("FINISHED" if finished or not stop.requested else "KILLED")
        results["mlflow_hint"] = tracker.run_url_hint()
    results.update(step=state["step"], finished=finished, out_of_time=out_of_time, train_seconds=time.perf_counter() - loop_started)
    return results


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


# ---------------------------------------------------------------------------------------- helpers


def _register(tracker, name: str, results: dict) -> None:
    from palaestra.registry.models import register_model

    version = register_model(tracker, tracker.run_id, name)
    tracker.set_tags({"registered_model": name, "registered_model_version": version})
    results["registered_model_version"] = version
    log.info("registered models:/%s/%s", name, version)


def _log_plots(tracker, state: dict, run_dir: Path) -> None:
    curves = {k: [tuple(p) for p in v] for k, v in state["history"].items()
              if k in ("loss", "rewards/margins", "eval/preference_accuracy")}
    if curves:
        path = plot_curves(curves, run_dir / "dpo_curve.png", title="DPO: loss, reward margin and held-out preference accuracy", smooth=5)
        tracker.log_artifact(str(path), "plots")
