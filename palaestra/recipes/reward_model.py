"""Reward model: a one-number score head on the policy's architecture, trained on preference pairs.

Launch::

    palaestra train --target=reward                                 # SmolLM2-135M on the shipped planner pairs
    palaestra train algo=reward model=tiny algo.max_steps=20
    palaestra train algo=reward data.path=pairs.jsonl               # {"prompt" | "messages", "chosen", "rejected"} rows
    torchrun --nproc_per_node 2 -m palaestra.cli train algo=reward  # data parallel: each process a block of every batch

The loop, top to bottom: take a batch of pairs, score the chosen and the rejected answer of every
pair with the same network (one forward over 2B rows), and minimise the Bradley-Terry loss
``-log sigma(r_chosen - r_rejected - margin)``, optionally plus ``c * (r_chosen + r_rejected)^2``
to keep rewards centred on 0. After every epoch the held-out *pairwise accuracy* (the share of
pairs ranked the right way round) is measured. The result is a plain Hugging Face
sequence-classification folder, ``<run>/reward_model``, which PPO and ``reward_model:<folder>``
rewards load (:mod:`palaestra.rewards.reward_model`).

The network is the causal LM's body with a linear head on the hidden state of the last answer
token (``AutoModelForSequenceClassification``, ``num_labels=1``); LoRA adapts the body and the
head trains in full. With several processes each scores a block of every batch's pairs (and of the
held-out pairs, gathered for the figures) and the gradients are summed: one process's update on the
whole batch. Simplification relative to InstructGPT (Ouyang et al., 2022): one comparison per prompt
instead of all pairs of K ranked answers.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch

from palaestra.algorithms.preference import bradley_terry_loss
from palaestra.config.errors import ConfigError
from palaestra.recipes.reward_model_config import RewardModelConfig
from palaestra.data.preferences import PreferenceBatch, collate_pairs
from palaestra.distributed import Distributed
from palaestra.export import export_policy
from palaestra.models import load_model_and_tokenizer, model_id
from palaestra.models.precision import autocast, resolve_precision, weights_dtype
from palaestra.data.preferences import load_pairs, pair_batch, pair_epoch, pair_rows, pair_steps
from palaestra.models.loading import enable_gradient_checkpointing, policy_identity
from palaestra.optim import adamw, optimizer_step
from palaestra.recipes.methods import best_metric
from palaestra.recipes.run import Run, track_data_method
from palaestra.runtime import seed_everything, training_device
from palaestra.rewards.reward_model import METADATA_FILE

log = logging.getLogger("palaestra")


def main(config: RewardModelConfig, *, evaluate_before_after: bool = False) -> dict:
    """Train a reward model; return the run folder, MLflow run id, figures and ``outputs["reward_model_dir"]``."""
    train_cfg, algo, data = config.train, config.algo, config.data

    # ---- processes, seed and threads
    dist = Distributed.from_environment()
    seed_everything(train_cfg.seed, threads=train_cfg.threads)

    # ---- data (cheap, and fails before the model loads on a bad file)
    train_pairs, val_pairs = load_pairs(data, train_cfg.seed)

    # ---- model: the policy's body with a one-output head; LoRA on the body, the head trains in full
    device = training_device(train_cfg.device, dist)
    precision = resolve_precision(config.model.precision, device)
    dtype = weights_dtype(config.model.dtype, precision, config.model.lora.enabled)
    model, tokenizer = build_reward_model(config.model.name, path=config.model.path, dtype=dtype, device=device)
    if config.model.lora.enabled:
        lora = config.model.lora
        model = apply_reward_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    if train_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    pad_id = tokenizer.pad_token_id
    # The head reads the last answer token; no end-of-sequence token (for SmolLM2 it is the pad token).
    train_rows, val_rows = pair_rows(tokenizer, train_pairs, val_pairs, max_length=data.max_length, add_eos=False)

    # ---- run folder, optimizer, resume, tracking
    per_epoch, total_steps = pair_steps(len(train_rows), train_cfg.pairs_per_step, algo.epochs, algo.max_steps)
    run = Run(train_cfg, method="reward", runs_root=Path("runs") / f"{data.name}-{algo.name}", total_steps=total_steps,
              identity=policy_identity(config.model),
              best=best_metric(config), dist=dist,
              progress=("loss", "accuracy", "margin"), curves=("loss", "accuracy"),
              plot=("reward_model_curve.png", "Reward model: loss and pairwise accuracy"))
    log.info("reward model on %d pairs (%d held out), %d updates (%d per epoch); device %s, precision %s, weights %s",
             len(train_rows), len(val_rows), total_steps, per_epoch, device, precision, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = adamw(trainable, train_cfg, total_steps)
    run.resume(model=model, optimizer=optimizer, scheduler=scheduler)
    tracker = track_data_method(run, config)
    results: dict = {"outputs": {}}

    def run_eval(step: int, label: str) -> dict:
        figures = pairwise_eval(model, val_rows, pad_id, batch_pairs=train_cfg.pairs_per_forward, precision=precision,
                                margin=algo.margin, dist=dist)
        return run.log_eval(step, label, figures)

    if evaluate_before_after and run.step == 0:
        results["before"] = run_eval(0, "before")

    with run:
        for step in run.steps():
            # 1. batch: the step's pairs of this epoch's seeded shuffle
            epoch, rows = pair_batch(train_rows, train_cfg.pairs_per_step, step, train_cfg.seed)

            # 2. score and loss: chosen and rejected in one forward per micro-batch (of this process's block of
            #    the pairs), gradients accumulated
            optimizer.zero_grad(set_to_none=True)
            totals = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0}
            mine = dist.split(rows)
            with run.timed("forward_backward"):
                for start in range(0, len(mine), train_cfg.pairs_per_forward):
                    micro = mine[start : start + train_cfg.pairs_per_forward]
                    batch = collate_pairs(micro, pad_id)
                    loss, stats = reward_loss(model, batch, precision=precision, margin=algo.margin,
                                              center_coefficient=algo.center_rewards_coefficient)
                    share = len(micro) / len(rows)  # the batch loss is the mean over all its pairs
                    (loss * share).backward()
                    totals["loss"] += float(loss.detach()) * share
                    for key in ("accuracy", "margin", "rewards/chosen", "rewards/rejected"):
                        totals[key] += stats[key] * share

            # 3. step (the gradients summed over the processes)
            with run.timed("optimizer"):
                grad_norm = optimizer_step(trainable, optimizer, scheduler, train_cfg.max_grad_norm, dist)
                totals = dict(zip(totals, dist.totals(*totals.values())))

            # 4. log / eval (every epoch) / checkpoint
            elapsed = run.step_seconds()
            run.log(step, {**totals, "grad_norm": grad_norm, "learning_rate": scheduler.get_last_lr()[0],
                           "epoch": pair_epoch(step, epoch, train_cfg.pairs_per_step, len(train_rows)),
                           "pairs_per_second": len(rows) / elapsed})
            if run.end_of_step(step, run_eval(step, "train") if run.eval_due(step, epoch_steps=per_epoch) else None):
                break

    # ---- final figures, the merged reward model (the main process writes it), cleanup
    if run.finished or run.out_of_time:  # a spent time budget ends the run too (it can still be resumed)
        results["after"] = run.evaluation_at(run.step) or run_eval(run.step, "after")
    if (run.finished or run.out_of_time) and dist.is_main:
        folder = export_reward_model(model, tokenizer, run.run_dir / "reward_model", max_length=data.max_length)
        results["outputs"]["reward_model_dir"] = str(folder)
        log.info("reward model written to %s", folder)
        if tracker and config.tracking.registered_model:  # the folder is large: logged only to register it
            tracker.log_artifacts(folder, "model")
            from palaestra.registry.models import register  # the registry only when asked for

            register(tracker, config.tracking.registered_model, results)
    return {**run.finish(), **results}


# ---------------------------------------------------------------------------------------- building blocks



def build_reward_model(name: str, *, path: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer)``: the causal LM ``name``/``path`` as a one-label sequence classifier.

    The body's weights are the causal LM's (loaded as ``load_model_and_tokenizer`` loads them);
    the new head ``score`` starts from the architecture's initialiser (seeded by the global RNG).
    ``pad_token_id`` is set, so the score is read at the last token that is not padding.
    """
    from transformers import AutoModelForSequenceClassification

    causal, tokenizer = load_model_and_tokenizer(name, path=path, dtype=dtype, device="cpu")
    model_config = copy.deepcopy(causal.config)
    model_config.num_labels = 1
    model_config.pad_token_id = tokenizer.pad_token_id
    model_config.architectures = None
    try:
        model = AutoModelForSequenceClassification.from_config(model_config, dtype=causal.dtype)
    except ValueError as error:
        raise ConfigError(f"model {model_id(name, path)} has no sequence-classification variant: {str(error).splitlines()[0]}") from None
    body = getattr(model, model.base_model_prefix)
    body.load_state_dict(getattr(causal, causal.base_model_prefix).state_dict())
    del causal
    return model.to(device), tokenizer


def apply_reward_lora(model, *, r: int, alpha: int, dropout: float, target_modules):
    """LoRA on the body (peft task SEQ_CLS); the head ``score`` is a fully trained module of its own."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from palaestra.models.lora import leave_input_dtype_to_autocast

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    lora = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      modules_to_save=["score"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        model = get_peft_model(model, lora)
    for name, module in model.named_modules():  # the head's own copy: fp32 master weights even over a bf16 body
        if name.endswith("modules_to_save.default"):
            module.float()
            module.register_forward_pre_hook(lambda head, args: tuple(a.to(head.weight.dtype) for a in args))
    leave_input_dtype_to_autocast(model)
    return model


def rewards_of(model, batch: PreferenceBatch, precision: str) -> torch.Tensor:
    """[2B] scalar rewards of a batch's rows (chosen first), in float32."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.model_inputs().items()}
    with autocast(precision, device.type):
        return model(**inputs, use_cache=False).logits[:, 0].float()


def reward_loss(model, batch: PreferenceBatch, *, precision: str, margin: float = 0.0,
                center_coefficient: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry loss of one batch, plus ``center_coefficient * mean((r_c + r_r)^2)``."""
    rewards = rewards_of(model, batch, precision)
    chosen, rejected = rewards[: batch.num_pairs], rewards[batch.num_pairs :]
    loss, stats = bradley_terry_loss(chosen, rejected, torch.full_like(chosen, margin) if margin else None)
    if center_coefficient:
        # keeps the scale anchored: only differences are learned, so the mean would otherwise drift
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    return loss, {"accuracy": stats["accuracy"], "margin": stats["margin_mean"],
                  "rewards/chosen": float(chosen.detach().mean()), "rewards/rejected": float(rejected.detach().mean())}


@torch.no_grad()
def pairwise_eval(model, rows: list, pad_id: int, *, batch_pairs: int, precision: str, margin: float = 0.0,
                  dist: Distributed | None = None) -> dict[str, float]:
    """Held-out figures: ``pairwise_accuracy`` (share of pairs with r_c > r_r), ``margin``, ``loss``, mean rewards.
    With several processes each scores a block of ``rows`` and the rewards are gathered in order."""
    was_training = model.training
    model.eval()
    dist = dist or Distributed()
    chosen, rejected = [torch.zeros(0)], [torch.zeros(0)]
    mine = dist.split(rows)
    for start in range(0, len(mine), batch_pairs):
        batch = collate_pairs(mine[start : start + batch_pairs], pad_id)
        rewards = rewards_of(model, batch, precision).cpu()
        chosen.append(rewards[: batch.num_pairs])
        rejected.append(rewards[batch.num_pairs :])
    model.train(was_training)
    chosen, rejected = dist.gather_rows(torch.cat(chosen)), dist.gather_rows(torch.cat(rejected))
    loss, stats = bradley_terry_loss(chosen, rejected, torch.full_like(chosen, margin) if margin else None)
    return {"pairwise_accuracy": stats["accuracy"], "margin": stats["margin_mean"], "loss": float(loss),
            "rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean())}


def export_reward_model(model, tokenizer, folder: Path, *, max_length: int) -> Path:
    """The merged reward model as a plain Hugging Face folder (atomic), with the token budget it was trained at."""
    folder = export_policy(model, tokenizer, folder, merge=True)
    metadata = folder / METADATA_FILE
    tmp = metadata.with_name(f".{metadata.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"max_length": max_length}) + "\n")
    os.replace(tmp, metadata)
    return folder
