"""PPO: Proximal Policy Optimization of a chat policy, with a value head, GAE and a KL penalty.

Launch::

    palaestra train --target=ppo                                  # planner data, planner_quality reward
    palaestra train --target=ppo algo.reward_model=runs/planner-reward/<stamp>/reward_model
    palaestra train --target=ppo model=tiny train.steps=5 algo.prompts_per_step=4 train.minibatch_size=2
    torchrun --nproc_per_node 2 -m palaestra.cli train --target=ppo   # data parallel: half the prompts each

The loop, top to bottom: sample one completion for each of ``algo.prompts_per_step`` prompts (the
system and user messages of the chat data), score each whole completion (a trained reward model,
or the sum of ``data.rewards`` functions over the row's structured columns), and compute, without
gradients, the sampling policy's log-probs and values (one forward: the value head reads the
policy's own final hidden states) and the reference's log-probs (the same model with its LoRA
adapter off). Each token's reward is a KL penalty to the reference, plus the score on the last
token; GAE turns rewards and values into advantages and value targets. Then ``algo.ppo_epochs``
passes over shuffled minibatches of ``train.minibatch_size`` completions, each one AdamW update
of the clipped policy loss plus ``vf_coef`` times the clipped value loss. Every ``save_interval``
steps a checkpoint (adapter, value head, optimizer, scheduler, RNG, data position) is written
atomically; ``train.resume=auto`` continues bit for bit. At the end the policy is exported, LoRA
merged, as a plain Hugging Face folder ``<run>/model``.

With several processes each samples, scores and evaluates an equal share of the step's prompts
(its own random stream; the held-out prompts split and their completions gathered); advantages are
whitened over every process's tokens, and each minibatch (drawn from all of the step's completions)
is the token mean over all processes' rows in it: each process scales its rows' loss by its share
of the minibatch's tokens and the gradients are summed, so the update is the one a single process
makes on the same completions.

Simplifications relative to InstructGPT (Ouyang et al., 2022): the critic is a linear head on the
policy's trunk (sharing its adapter) rather than a separate model started from the reward model;
the KL coefficient is fixed (no adaptive controller); no pretraining-data term (PPO-ptx).
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from palaestra import checkpoint as ckpt
from palaestra.algorithms.logprob_math import masked_mean
from palaestra.algorithms.ppo import gae, kl_penalty_rewards, ppo_policy_loss, value_loss, whiten
from palaestra.config.errors import ConfigError
from palaestra.recipes.ppo_config import PPOConfig
from palaestra.data.prompts import ChatPrompt, load_prompts
from palaestra.distributed import Distributed
from palaestra.export import export_policy
from palaestra.models import frozen_reference_copy, reference_logits_context
from palaestra.models.logprobs import completion_logprobs
from palaestra.models.precision import autocast
from palaestra.models.value_head import ValueHead, explained_variance, logprobs_and_values
from palaestra.plugins import lookup
from palaestra.data.order import next_items
from palaestra.models.loading import enable_gradient_checkpointing, load_policy, policy_identity
from palaestra.optim import adamw, optimizer_step
from palaestra.recipes.methods import best_metric
from palaestra.recipes.run import Run, track_data_method
from palaestra.runtime import seed_everything, timed, training_device
from palaestra.rewards import combine_rewards, resolve_reward
from palaestra.rollout import HFGenerator, SamplingParams

log = logging.getLogger("palaestra")

DEFAULT_EVAL_EXAMPLES = 16
"""Held-out prompts scored per evaluation when eval.max_examples is 0."""


def main(config: PPOConfig, *, evaluate_before_after: bool = False) -> dict:
    """Train with PPO; return the run folder, the MLflow run id, the figures and the exported model."""
    train_cfg, algo, data_cfg = config.train, config.algo, config.data

    # ---- processes, seed and threads
    dist = Distributed.from_environment()
    if algo.prompts_per_step % dist.world:
        raise ConfigError(f"algo.prompts_per_step={algo.prompts_per_step} cannot be split over {dist.world} processes; "
                          f"use a multiple of {dist.world}")
    seed_everything(train_cfg.seed, threads=train_cfg.threads)  # the same on every process: the same initial weights
    prompt_budget = min(algo.max_prompt_length, data_cfg.max_length - algo.max_completion_length)
    if prompt_budget < 1:
        raise ConfigError(f"data.max_length={data_cfg.max_length} leaves no room for a prompt beside "
                          f"algo.max_completion_length={algo.max_completion_length}; raise data.max_length")

    # ---- data and reward functions (cheap, and fail before the model loads)
    train_rows, heldout_rows, version = load_prompts(data_cfg)
    heldout_rows = heldout_rows[: config.eval.max_examples or DEFAULT_EVAL_EXAMPLES]
    reward_names = [] if algo.reward_model else _resolve_rewards(data_cfg.rewards)
    device = training_device(train_cfg.device, dist)
    score = _scorer(algo.reward_model, reward_names, device)
    extra_figures = lookup(data_cfg.metrics, {}, "data.metrics") if data_cfg.metrics else None

    # ---- model, adapter, reference, value head
    model, tokenizer, precision, dtype = load_policy(config.model, device)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    reference = None
    if algo.kl_coef > 0 and not config.model.lora.enabled:
        reference = frozen_reference_copy(model)  # full fine-tuning needs a frozen copy; LoRA does not
    value_head = ValueHead.for_model(model)
    model.train()
    generator = HFGenerator(model, tokenizer, max_prompt_length=prompt_budget, precision=precision)

    # ---- run folder, optimizer, resume, tracking
    run = Run(train_cfg, method="ppo", identity=policy_identity(config.model),
              runs_root=Path("runs") / f"{data_cfg.name}-{algo.name}", total_steps=train_cfg.steps,
              best=best_metric(config), dist=dist, state={"data_position": 0}, progress=("reward/mean", "kl", "value_loss"),
              curves=("reward/mean",), plot=("reward_curve.png", "PPO: reward and held-out reward"))
    log.info("device %s, compute precision %s, weights %s, %d train prompts, %d held-out",
             device, precision, dtype, len(train_rows), len(heldout_rows))
    minibatches = math.ceil(algo.prompts_per_step / train_cfg.minibatch_size)
    updates_total = train_cfg.steps * algo.ppo_epochs * minibatches
    policy_params = [p for p in model.parameters() if p.requires_grad]
    trainable = policy_params + list(value_head.parameters())
    optimizer, scheduler = adamw([{"params": policy_params}, {"params": list(value_head.parameters())}], train_cfg, updates_total)
    dist.broadcast_parameters(trainable)  # every process starts from the main process's weights
    run.resume(parts=_checkpoint_parts(model, value_head, optimizer, scheduler))
    if dist.rank and not run.rng_restored:  # a fresh start (or a checkpoint of fewer processes): the process's own
        torch.manual_seed(train_cfg.seed + 1000 * dist.rank + run.step)  # stream; rank 0 samples as one process does
    tracker = track_data_method(run, config, version)
    results: dict = {"outputs": {}}
    sampling = SamplingParams(algo.max_completion_length, algo.temperature, algo.top_p, algo.top_k)
    eval_sampling = SamplingParams(config.eval.max_new_tokens or algo.max_completion_length, greedy=True)

    def run_eval(step: int, label: str) -> dict | None:
        """Mean reward (and the planner metrics on planner data) of greedy completions on held-out prompts."""
        if not heldout_rows:
            return None
        texts, mine = [], dist.split(heldout_rows)
        for start in range(0, len(mine), config.eval.batch_size):
            batch = mine[start : start + config.eval.batch_size]
            texts += generator.generate([row.messages for row in batch], 1, eval_sampling).texts
        texts = dist.gather_objects(texts)  # every process scores them all: the same figures everywhere
        rewards, components = score(heldout_rows, texts)
        figures = {"reward": float(np.mean(rewards)),
                   **{f"reward/{_short(name)}": float(np.mean(values)) for name, values in components.items()}}
        if extra_figures:  # data.metrics: the domain's own figures (the planner's constraint respect, ...)
            figures.update(extra_figures(texts, [row.columns for row in heldout_rows]))
        if tracker:
            tracker.log_table(_sample_rows(step, heldout_rows, texts, rewards, components), f"eval/samples_{label}_step{step:06d}.json")
        return run.log_eval(step, label, figures)

    if evaluate_before_after and run.step == 0:
        results["before"] = run_eval(0, "before")

    with run:
        for step in run.steps():

            # 1. roll out: one completion for each prompt of this step (this process's share of them)
            rows, run.state["data_position"] = next_items(train_rows, run.state["data_position"], algo.prompts_per_step, train_cfg.seed)
            rows = dist.share(rows)
            with run.timed("generation"):
                rollout = generator.generate([row.messages for row in rows], 1, sampling)

            # 2. score: each whole completion gets one number
            with run.timed("rewards"):
                scores, components = score(rows, rollout.texts)
                scores = torch.tensor(scores, dtype=torch.float32, device=device)

            # 3. old log-probs and values (one forward), reference log-probs, KL-shaped rewards, GAE
            batch = {
                "prompt_ids": rollout.prompt_ids.to(device), "prompt_mask": rollout.prompt_mask.to(device),
                "completion_ids": rollout.completion_ids.to(device), "mask": rollout.completion_mask.to(device),
            }
            with torch.no_grad(), run.timed("old_logprobs_values"):
                batch["old_logp"], batch["old_values"] = _rollout_pass(
                    batch, train_cfg.minibatch_size, precision,
                    lambda mb: logprobs_and_values(model, value_head, *_inputs(mb), temperature=algo.temperature,
                                                   chunk_tokens=train_cfg.logprob_chunk_tokens)[:2],
                )
            with torch.no_grad(), run.timed("reference"):
                ref_logp = batch["old_logp"]  # no penalty: the reference pass is skipped
                if algo.kl_coef > 0:
                    ref_logp = _reference_logprobs(model, reference, batch, train_cfg.minibatch_size, precision, algo.temperature,
                                                   train_cfg.logprob_chunk_tokens)
            mask = batch["mask"].float()
            # r_t = -kl_coef * (log pi_old - log pi_ref), plus the score on the last token
            token_rewards = kl_penalty_rewards(scores, batch["old_logp"], ref_logp, mask, kl_coef=algo.kl_coef)
            advantages, batch["returns"] = gae(token_rewards, batch["old_values"], mask, gamma=algo.gamma, lam=algo.lam)
            batch["advantages"] = whiten(advantages, mask, reduce_sum=dist.sum) if algo.whiten_advantages else advantages

            # 4. loss and step: ppo_epochs passes over shuffled minibatches, one AdamW update each
            stats = ppo_update(
                model, value_head, optimizer, scheduler, trainable, batch, algo=algo,
                minibatch_size=train_cfg.minibatch_size, max_grad_norm=train_cfg.max_grad_norm,
                precision=precision, order_seed=(train_cfg.seed, step), timings=run.timings, dist=dist,
                chunk_tokens=train_cfg.logprob_chunk_tokens,
            )

            # 5. log (figures over every process's completions) / eval / checkpoint
            kl_tokens = (batch["old_logp"] - ref_logp) * mask  # k1 estimate of KL(pi_old || pi_ref) per token
            lengths = mask.sum(dim=1)
            all_scores = dist.gather(scores)
            tokens, kl_sum, value_sum, return_sum, penalty_sum, truncated = dist.totals(
                mask.sum(), kl_tokens.sum(), (batch["old_values"] * mask).sum(), (batch["returns"] * mask).sum(),
                (token_rewards.sum(dim=1) - scores * (lengths > 0)).sum(), rollout.truncated.sum())
            completions = len(all_scores)
            elapsed = run.step_seconds()
            run.log(step, {
                **stats,
                "reward/mean": float(all_scores.mean()),
                "reward/std": float(all_scores.std()) if completions > 1 else 0.0,
                **{f"reward/{_short(name)}/mean": float(np.mean(dist.gather_objects(values)))
                   for name, values in components.items()},
                "reward/kl_penalty": penalty_sum / completions,
                "kl": kl_sum / max(1.0, tokens),
                "kl/sequence": kl_sum / completions,
                # the processes' mean of their own explained variance
                "explained_variance": dist.totals(explained_variance(batch["old_values"], batch["returns"], mask))[0] / dist.world,
                "values/mean": value_sum / max(1.0, tokens),
                "returns/mean": return_sum / max(1.0, tokens),
                "completion_length/mean": tokens / completions,
                "truncated_fraction": truncated / completions,
                "learning_rate": scheduler.get_last_lr()[0],
                "tokens_per_second": tokens / elapsed,
            })
            if tracker and train_cfg.log_samples_interval and step % train_cfg.log_samples_interval == 0:
                tracker.log_table(_sample_rows(step, rows, rollout.texts, scores.tolist(), components), f"samples/step{step:06d}.json")
            if run.end_of_step(step, run_eval(step, "train") if run.eval_due(step) else None):
                break

    # ---- final evaluation, export, cleanup
    if evaluate_before_after and (run.finished or run.out_of_time):
        results["after"] = run_eval(run.step, "after")
    if (run.finished or run.out_of_time) and dist.is_main:
        if config.model.lora.enabled:
            model = model.float()  # merge in fp32: bf16 base weights would round most of a small update away
        model_dir = export_policy(model, tokenizer, run.run_dir / "model")
        value_dir = value_head.save(run.run_dir / "value_head")
        results["outputs"] = {"model_dir": str(model_dir), "value_head_dir": str(value_dir)}
        log.info("policy exported to %s", model_dir)
    return {**run.finish(), **results}


# ---------------------------------------------------------------------------------------- the update


def ppo_update(
    model, value_head, optimizer, scheduler, trainable, batch: dict, *, algo, minibatch_size: int,
    max_grad_norm: float, precision: str, order_seed: tuple[int, int], timings: dict, dist: Distributed | None = None,
    chunk_tokens: int = 0,
) -> dict[str, float]:
    """``algo.ppo_epochs`` passes over the rollout batch in shuffled minibatches, one update each.

    ``batch`` holds [B, P] prompt tensors and [B, C] completion tensors: ``mask``, ``old_logp``,
    ``old_values``, ``advantages`` and ``returns``. Each minibatch's loss is the clipped policy
    loss plus ``vf_coef`` times the clipped value loss, both token means over the minibatch. The
    shuffle depends only on ``order_seed`` (seed, step), so a resumed run repeats it exactly.

    With several processes (``dist``) ``batch`` is this process's block of the step's rows (equal
    blocks, in rank order): the shuffle runs over every process's rows, each process computes the
    minibatch rows it holds, scaled by its share of the minibatch's tokens, and the gradients are
    summed, which is the update of the whole minibatch. Returns the figures averaged over all updates.
    """
    dist = dist or Distributed()
    local_rows = batch["mask"].shape[0]
    rows, offset = local_rows * dist.world, local_rows * dist.rank
    totals: dict[str, float] = {}
    updates = 0
    for epoch in range(algo.ppo_epochs):
        order = np.random.default_rng([*order_seed, epoch]).permutation(rows)
        for start in range(0, rows, minibatch_size):
            held = [int(i) - offset for i in order[start : start + minibatch_size] if offset <= i < offset + local_rows]
            mine = torch.tensor(held, dtype=torch.long, device=batch["mask"].device)
            tokens = float(batch["mask"][mine].sum())
            share = tokens / max(1.0, dist.totals(tokens)[0])  # this process's share of the minibatch's tokens
            optimizer.zero_grad(set_to_none=True)
            figures = dict.fromkeys(("loss", "policy_loss", "value_loss", "clipfrac", "approx_kl", "value_clipfrac",
                                     "entropy"), 0.0)
            if held:
                mb = _trim({key: value[mine] for key, value in batch.items()})
                mask = mb["mask"].float()
                with timed(timings, "forward_backward"):
                    with autocast(precision, mask.device.type):
                        logp, values, entropy = logprobs_and_values(model, value_head, *_inputs(mb),
                                                                    temperature=algo.temperature, with_entropy=True,
                                                                    chunk_tokens=chunk_tokens)
                    policy_loss, policy_stats = ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mask, epsilon=algo.cliprange)
                    critic_loss, value_stats = value_loss(values, mb["old_values"], mb["returns"], mask, clip_range=algo.cliprange_value)
                    loss = policy_loss + algo.vf_coef * critic_loss
                    (loss * share).backward()
                figures = {
                    "loss": float(loss.detach()), "policy_loss": float(policy_loss.detach()),
                    "value_loss": float(critic_loss.detach()), "clipfrac": policy_stats["clip_fraction"],
                    "approx_kl": policy_stats["approx_kl"], "value_clipfrac": value_stats["value_clip_fraction"],
                    "entropy": float(masked_mean(entropy, mask)),
                }
            with timed(timings, "optimizer"):
                grad_norm = optimizer_step(trainable, optimizer, scheduler, max_grad_norm, dist)
            # token means over the whole minibatch: each process's means weighted by its share of the tokens
            figures = dict(zip(figures, dist.totals(*(value * share for value in figures.values()))))
            for key, value in {**figures, "grad_norm": grad_norm}.items():
                totals[key] = totals.get(key, 0.0) + value
            updates += 1
    return {key: value / updates for key, value in totals.items()}


def _inputs(mb: dict) -> tuple:
    return mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"], mb["mask"]


def _trim(mb: dict) -> dict:
    """Drop the columns that are padding in every row: left of the prompts, right of the completions."""
    first = int((mb["prompt_mask"].sum(dim=0) > 0).nonzero()[0])
    width = max(1, int(mb["mask"].sum(dim=1).max()))
    return {key: value[:, first:] if key.startswith("prompt") else value[:, :width] for key, value in mb.items()}


def _rollout_pass(batch: dict, size: int, precision: str, forward) -> list[torch.Tensor]:
    """Run ``forward`` (returning [b, c] tensors) over the batch in chunks; each output padded back to [B, C]."""
    rows, width = batch["mask"].shape
    outputs: list[list[torch.Tensor]] = []
    for start in range(0, rows, size):
        mb = _trim({key: batch[key][start : start + size] for key in ("prompt_ids", "prompt_mask", "completion_ids", "mask")})
        with autocast(precision, mb["mask"].device.type):
            pieces = forward(mb)
        outputs.append([F.pad(piece.float(), (0, width - piece.shape[1])) for piece in pieces])
    return [torch.cat(column, dim=0) for column in zip(*outputs)]


def _reference_logprobs(model, reference, batch: dict, size: int, precision: str, temperature: float,
                        chunk_tokens: int = 0) -> torch.Tensor:
    """[B, C] log-probs under the reference: the frozen copy (full fine-tuning) or the model with its adapter off."""
    ref_model = reference if reference is not None else model
    with nullcontext() if reference is not None else reference_logits_context(model):
        (logp,) = _rollout_pass(batch, size, precision,
                                lambda mb: completion_logprobs(ref_model, *_inputs(mb), temperature=temperature,
                                                               chunk_tokens=chunk_tokens)[:1])
    return logp


# ---------------------------------------------------------------------------------------- data and rewards


def _resolve_rewards(names: list) -> list[str]:
    for name in names:
        try:
            resolve_reward(name)
        except ValueError as error:
            raise ConfigError(f"data.rewards: {str(error).splitlines()[0]}") from None
    return list(names)


def _scorer(reward_model: str | None, reward_names: list[str], device: str):
    """``score(rows, texts) -> (rewards, components)`` from a reward model or the summed reward functions."""
    if reward_model:
        from palaestra.rewards.reward_model import load_reward_model

        scorer = load_reward_model(reward_model, device=device)

        def score(rows: list[ChatPrompt], texts: list[str]):
            values = [float(v) for v in scorer.score([row.messages for row in rows], texts)]
            return values, {"reward_model": values}

        return score

    weights = {name: 1.0 for name in reward_names}

    def score(rows: list[ChatPrompt], texts: list[str]):
        keys = dict.fromkeys(key for row in rows for key in row.columns)
        columns = {key: [row.columns.get(key) for row in rows] for key in keys}
        columns["prompt"] = [row.messages for row in rows]  # as reward_model:<folder> rewards expect
        return combine_rewards(texts, columns, weights)

    return score


def _checkpoint_parts(model, value_head, optimizer, scheduler) -> dict[str, ckpt.CheckpointPart]:
    """The policy (adapter, optimizer, scheduler) at the top of a checkpoint; the value head in policy-value_head/."""
    return {"": ckpt.model_part(model, optimizer, scheduler),
            "value_head": ckpt.CheckpointPart(dict(value_head.named_parameters()))}




def _sample_rows(step: int, rows: list[ChatPrompt], texts: list[str], rewards: list[float], components: dict) -> list[dict]:
    samples = []
    for index, (row, text) in enumerate(zip(rows, texts)):
        sample = {"step": step, "prompt": row.messages[-1]["content"], "completion": text, "reward": float(rewards[index])}
        sample.update({f"reward/{_short(name)}": float(values[index]) for name, values in components.items()})
        samples.append(sample)
    return samples



def _short(reward_name: str) -> str:
    """A reward's logging name: "pkg.module:my_reward" -> "my_reward"."""
    return reward_name.rsplit(":", 1)[-1]
