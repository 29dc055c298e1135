"""GRPO: Group Relative Policy Optimization on a task with verifiable rewards.

Launch::

    palaestra train                                  # embedded SmolLM2-135M on chain_sum
    palaestra train task=countdown algo.beta=0.04 train.steps=100
    palaestra train model=tiny experiment=quick_test

The loop, top to bottom: sample ``num_generations`` completions per prompt, score them with the
task's reward functions, normalise rewards within each group into advantages, and take a clipped
policy-gradient step (optionally with a k3 KL penalty to the reference model, which is the same
model with its LoRA adapter switched off). Every ``save_interval`` steps a checkpoint with
everything needed to resume bit-for-bit is written atomically.

Simplifications relative to the DeepSeekMath paper: one rollout batch per step and no separate
reward model (rewards are programs); ``num_iterations`` > 1 re-uses the batch with stored old
log-probs, as in the paper's inner loop.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from palaestra import checkpoint as ckpt
from palaestra.recipes.common import (
    StopSignals,
    append_jsonl,
    attach_log_file,
    clip_gradients,
    fmt,
    lr_lambda,
    memory_figures,
    remember,
    resolve_run_dir,
    seed_everything,
    timed,
)
from palaestra.algorithms.grpo import group_advantages, masked_mean, policy_loss
from palaestra.config import ConfigError, PalaestraConfig, reward_weights
from palaestra.distributed import Distributed
from palaestra.evaluation.evaluate import evaluate
from palaestra.models import (
    apply_lora, embedded_model_dir, frozen_reference_copy, load_model_and_tokenizer, model_id, reference_logits_context,
)
from palaestra.models.precision import autocast, resolve_precision, weights_dtype
from palaestra.models.logprobs import batch_logprobs, shared_prompt_rows
from palaestra.rewards import combine_rewards
from palaestra.rollout import HFGenerator, SamplingParams
from palaestra.tasks.build import build_task
from palaestra.tracking import MlflowTracker, flatten_config, plot_curves

log = logging.getLogger("palaestra")


def main(config: PalaestraConfig, *, evaluate_before_after: bool = False) -> dict:
    """Train with GRPO; return the run folder, the MLflow run id and the final figures."""
    train_cfg, algo = config.train, config.algo

    # ---- processes, seed and threads
    dist = Distributed.from_environment()
    prompts_per_step = train_cfg.batch_size // algo.num_generations
    if prompts_per_step % dist.world or (train_cfg.batch_size // dist.world) % train_cfg.micro_batch_size:
        raise ConfigError(
            f"{prompts_per_step} prompts per step (train.batch_size={train_cfg.batch_size}) cannot be split over {dist.world} "
            f"processes in micro-batches of {train_cfg.micro_batch_size}; use a batch that divides evenly"
        )
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    seed_everything(train_cfg.seed)
    if dist.rank:  # every process samples differently; rank 0 samples exactly like a single process
        torch.manual_seed(train_cfg.seed + 1000 * dist.rank)

    # ---- data (cheap, and fails before the model loads on a bad dataset)
    task = build_task(config.task)
    eval_examples = task.test[: config.eval.max_examples or None]

    # ---- model, adapter, reference
    device = dist.device()
    precision = resolve_precision(config.model.precision, device)
    dtype = weights_dtype(config.model.dtype, precision, config.model.lora.enabled)
    model, tokenizer = load_model_and_tokenizer(config.model.name, path=config.model.path, dtype=dtype, device=device)
    if config.model.lora.enabled:
        lora = config.model.lora
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    reference = None
    if algo.beta > 0 and not config.model.lora.enabled:
        reference = frozen_reference_copy(model)  # full fine-tuning needs a frozen copy; LoRA does not
    model.train()
    generator = _generator(config, model, tokenizer, precision)

    # ---- run folder, optimizer, resume
    run_dir, resume_from = dist.broadcast(resolve_run_dir(config.train, Path("runs") / f"{config.task.name}-{config.algo.name}"))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        attach_log_file(run_dir / "train.log")
    dist.barrier()
    log.info("device %s, compute precision %s, weights %s", device, precision, dtype)
    updates_total = train_cfg.steps * algo.num_iterations
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=train_cfg.learning_rate, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
        weight_decay=train_cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(updates_total, train_cfg.warmup_ratio, train_cfg.lr_schedule)
    )
    state = {"step": 0, "data_position": 0, "mlflow_run_id": None, "best_metric": None,
             "evals_without_improvement": 0, "history": {}}
    if resume_from is not None:
        state.update(ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                          restore_rng=dist.is_main))
        if dist.rank:
            torch.manual_seed(train_cfg.seed + 1000 * dist.rank + state["step"])
        log.info("resumed from %s at step %d", resume_from, state["step"])

    # ---- tracking (the main process only)
    tracker = _start_tracking(config, task, state["mlflow_run_id"], run_dir) if dist.is_main else None
    state["mlflow_run_id"] = tracker.run_id if tracker else None

    weights = reward_weights(config.task)
    micro_batches = train_cfg.batch_size // dist.world // train_cfg.micro_batch_size
    shared = shared_prompt_rows(train_cfg.micro_batch_size, algo.num_generations, train_cfg.share_prompt_forward)
    eval_sampling = _eval_sampling(config)
    results: dict = {"run_dir": str(run_dir), "mlflow_run_id": state["mlflow_run_id"]}

    def run_eval(step: int, label: str) -> dict | None:
        """Evaluate on the main process (the others wait); figures on the main process, else None."""
        if not dist.is_main:
            dist.barrier()
            return None
        result = evaluate(
            generator, task, eval_examples, reward_weights=weights, format_reward=config.task.format_reward,
            sampling=eval_sampling, num_samples=config.eval.num_samples, pass_k=list(config.eval.pass_k),
            batch_size=config.eval.batch_size, seed=train_cfg.seed, show_progress=True,
        )
        figures = result.metrics()
        log.info("eval (%s, step %d): %s", label, step, fmt(figures))
        remember(state, {f"eval/{k}": v for k, v in figures.items()}, step)
        if tracker:
            tracker.log_metrics({f"eval/{k}": v for k, v in figures.items()}, step=step)
            tracker.log_table(result.samples[:32], f"eval/samples_{label}_step{step:06d}.json")
        dist.barrier()
        return figures

    if evaluate_before_after and state["step"] == 0:
        results["before"] = run_eval(0, "before")

    stop = StopSignals()
    loop_started = time.perf_counter()
    out_of_time = False
    progress = tqdm(total=train_cfg.steps, initial=state["step"], desc="grpo", dynamic_ncols=True, disable=not dist.is_main)
    steps_this_run = 0
    try:
        while state["step"] < train_cfg.steps and not stop.requested:
            step = state["step"] + 1
            started = time.perf_counter()
            timings: dict[str, float] = {}  # where this step's time goes, in seconds
            temperature = _temperature(algo, step)

            # 1. roll out: G completions for each prompt of this step
            examples, state["data_position"] = _next_examples(
                task.train, state["data_position"], prompts_per_step, train_cfg.seed
            )
            examples = dist.share(examples)  # every process draws the same prompts and keeps its share
            with timed(timings, "generation"):
                if algo.rollout_engine == "vllm":
                    generator.sync_adapter()  # vLLM samples from the adapter as the last update left it
                rollout = generator.generate(
                    [task.prompt(e) for e in examples], algo.num_generations,
                    SamplingParams(algo.max_completion_length, temperature, algo.top_p, algo.top_k),
                )

            # 2. score: weighted sum of reward functions, each component kept for logging
            with timed(timings, "rewards"):
                columns = task.columns([e for e in examples for _ in range(algo.num_generations)])
                rewards, components = combine_rewards(rollout.texts, columns, weights)
                rewards = torch.tensor(rewards, dtype=torch.float32)

            # 3. advantages: normalised within each prompt's group (batch scaling sees every process)
            all_rewards = dist.gather(rewards)
            advantages = group_advantages(all_rewards, algo.num_generations, scale=algo.scale_rewards)
            advantages = advantages.chunk(dist.world)[dist.rank].to(device)
            loss_mask = rollout.completion_mask.float()
            if algo.mask_truncated_completions:
                loss_mask = loss_mask * (~rollout.truncated).float().unsqueeze(1)
            loss_mask = loss_mask.to(device)

            # 4. loss and step: old/ref log-probs once, then num_iterations clipped updates
            slices = [slice(i * train_cfg.micro_batch_size, (i + 1) * train_cfg.micro_batch_size) for i in range(micro_batches)]
            old_logps = ref_logps = None
            with torch.no_grad():
                if algo.num_iterations > 1:
                    with timed(timings, "old_logprobs"):
                        old_logps = [_logprobs(model, rollout, s, temperature, shared, precision)[0] for s in slices]
                if algo.beta > 0:
                    with timed(timings, "reference"), _reference(model, reference):
                        ref_model = reference if reference is not None else model
                        ref_logps = [_logprobs(ref_model, rollout, s, temperature, shared, precision)[0] for s in slices]
            stats: dict[str, float] = {}
            for _ in range(algo.num_iterations):
                stats, grad_norm = update_policy(
                    model, optimizer, scheduler, trainable, rollout, advantages, loss_mask, algo=algo, slices=slices,
                    shared=shared, precision=precision, temperature=temperature, old_logps=old_logps,
                    ref_logps=ref_logps, max_grad_norm=train_cfg.max_grad_norm, dist=dist, timings=timings,
                )
            state["step"] = step

            # 5. log / eval / checkpoint
            lengths = rollout.completion_mask.sum(dim=1).float()
            elapsed = time.perf_counter() - started
            timings["other"] = elapsed - sum(timings.values())
            metrics = {
                **stats,
                "reward/mean": float(all_rewards.mean()),
                "reward/std": float(all_rewards.std()) if len(all_rewards) > 1 else 0.0,
                **{f"reward/{_short(name)}/mean": float(np.mean(values)) for name, values in components.items()},
                "completion_length/mean": float(lengths.mean()),
                "completion_length/max": float(lengths.max()),
                "completion_length/min": float(lengths.min()),
                "truncated_fraction": float(rollout.truncated.float().mean()),
                "grad_norm": grad_norm,
                "learning_rate": scheduler.get_last_lr()[0],
                "temperature": temperature,
                "time/step": elapsed,
                **{f"time/{name}": seconds for name, seconds in timings.items()},
                "tokens_per_second": float(dist.sum(torch.tensor(float(rollout.num_completion_tokens)))) / elapsed,
                **memory_figures(),
            }
            remember(state, {"reward/mean": metrics["reward/mean"]}, step)
            if dist.is_main:
                append_jsonl(run_dir / "metrics.jsonl", {"step": step, **metrics})
            log.info("step %d: %s", step, fmt(metrics), extra={"console": False})
            if tracker:
                tracker.log_metrics(metrics, step=step)
                if train_cfg.log_samples_interval and step % train_cfg.log_samples_interval == 0:
                    tracker.log_table(_sample_rows(step, examples, rollout.texts, rewards, components, algo.num_generations),
                                      f"samples/step{step:06d}.json")
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", tok_s=f"{metrics['tokens_per_second']:.0f}")

            evaluated = None
            if train_cfg.eval_interval and step % train_cfg.eval_interval == 0:
                figures = run_eval(step, "train")
                evaluated = dist.broadcast(figures.get(train_cfg.best_metric) if figures else None)
            steps_this_run += 1
            out_of_time = dist.any(bool(train_cfg.max_seconds) and time.perf_counter() - loop_started >= train_cfg.max_seconds)
            interrupted = dist.any(bool(stop.requested or out_of_time or (
                train_cfg.stop_after_steps and steps_this_run >= train_cfg.stop_after_steps
            )))
            stop.save_requested = dist.any(stop.save_requested)
            last = step == train_cfg.steps
            if (train_cfg.save_interval and step % train_cfg.save_interval == 0) or stop.save_requested or interrupted or last or evaluated is not None:
                stop.save_requested = False
                _improved(state, evaluated)
                if dist.is_main:
                    path = ckpt.save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                                trainer_state=state, keep_last_n=train_cfg.keep_last_n or None)
                    if evaluated is not None and train_cfg.save_best:
                        ckpt.save_best(run_dir, path, train_cfg.best_metric, evaluated)
                dist.barrier()
            if interrupted:
                log.info("stopping at step %d (checkpoint saved); resume with train.resume=auto train.output_dir=%s", step, run_dir)
                break
            if train_cfg.early_stopping_patience and state["evals_without_improvement"] >= train_cfg.early_stopping_patience:
                log.info("early stopping at step %d: no eval improvement in %d evaluations", step, state["evals_without_improvement"])
                break
    except BaseException:
        if tracker:
            tracker.end("KILLED" if stop.requested else "FAILED")
        raise
    finally:
        progress.close()
        stop.restore()

    # ---- final evaluation, plots, cleanup
    finished = state["step"] >= train_cfg.steps
    if evaluate_before_after and (finished or out_of_time):
        results["after"] = run_eval(state["step"], "after")
    if tracker:
        _log_plots(tracker, state, run_dir)
        tracker.log_artifact(str(run_dir / "train.log"))
        tracker.end("FINISHED" if finished or not stop.requested else "KILLED")
        results["mlflow_hint"] = tracker.run_url_hint()
    results.update(step=state["step"], finished=finished, out_of_time=out_of_time,
                   train_seconds=time.perf_counter() - loop_started)
    return results


# ---------------------------------------------------------------------------------------- helpers


def update_policy(
    model, optimizer, scheduler, trainable, rollout, advantages, loss_mask, *, algo, slices, shared, precision,
    temperature, old_logps, ref_logps, max_grad_norm, dist: Distributed, timings: dict,
) -> tuple[dict[str, float], float]:
    """One optimizer update on this process's share of the batch, gradients averaged over processes.

    Every micro-batch's loss is scaled so that the summed gradients equal those of the whole
    batch in one process: the mean over micro-batches (and, after ``average_gradients``, over
    processes) for grpo, bnpo and dr_grpo; dapo divides by the completion tokens of the whole
    batch across processes instead.
    """
    micro_batches = len(slices)
    num_items = dist.sum(loss_mask.sum()).clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    totals = {"loss": 0.0, "kl": 0.0, "clip_ratio/low": 0.0, "clip_ratio/high": 0.0, "clip_ratio/region": 0.0,
              "entropy": 0.0}
    for index, rows in enumerate(slices):
        with timed(timings, "policy_forward_backward"):
            logp, entropy = _logprobs(model, rollout, rows, temperature, shared, precision, with_entropy=True)
            mask = loss_mask[rows]
            loss, loss_stats = policy_loss(
                logp, old_logps[index] if old_logps else logp.detach(), advantages[rows], mask,
                loss_type=algo.loss_type, epsilon=algo.epsilon, epsilon_high=algo.epsilon_high,
                beta=algo.beta, ref_logp=ref_logps[index] if ref_logps else None,
                max_completion_length=algo.max_completion_length, num_items_in_batch=num_items,
            )
            scaled = loss * dist.world if algo.loss_type == "dapo" else loss / micro_batches
            scaled.backward()
        totals["loss"] += float(scaled.detach()) / (dist.world if algo.loss_type == "dapo" else 1)
        totals["entropy"] += float(masked_mean(entropy, mask)) / micro_batches
        for key, value in loss_stats.items():
            totals[key] += value / micro_batches
    with timed(timings, "optimizer"):
        dist.average_gradients(trainable)
        grad_norm = clip_gradients(trainable, max_grad_norm)
        optimizer.step()
        scheduler.step()
    return totals, grad_norm


def _logprobs(model, rollout, rows: slice, temperature: float, shared_rows: int, precision: str, with_entropy: bool = False):
    """Log-probs of a micro-batch: packed, each run of ``shared_rows`` rows sharing one prompt computed
    once (the fast path), or ``shared_rows`` 0: the plain padded batch."""
    batch = (rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows], rollout.completion_mask[rows])
    with autocast(precision, next(model.parameters()).device.type):
        return batch_logprobs(model, *batch, shared_rows, temperature=temperature, with_entropy=with_entropy)


def _generator(config: PalaestraConfig, model, tokenizer, precision: str):
    """The rollout engine: palaestra's decode loop on the training model, or vLLM serving its adapter."""
    algo = config.algo
    if algo.rollout_engine == "vllm":
        from palaestra.rollout.vllm_engine import VLLMGenerator

        base = config.model.path or embedded_model_dir(config.model.name)
        return VLLMGenerator(model, tokenizer, str(base), max_prompt_length=algo.max_prompt_length,
                             max_lora_rank=max(8, config.model.lora.r), seed=config.train.seed)
    return HFGenerator(model, tokenizer, max_prompt_length=algo.max_prompt_length, precision=precision)


def _reference(model, reference):
    """The reference policy: a frozen copy (full fine-tuning) or the model with its adapter off."""
    return nullcontext() if reference is not None else reference_logits_context(model)


def _temperature(algo, step: int) -> float:
    """Linear schedule from algo.temperature to algo.temperature_final over the schedule's steps."""
    if algo.temperature_final is None or algo.temperature_schedule_steps <= 0:
        return algo.temperature
    fraction = min(1.0, (step - 1) / algo.temperature_schedule_steps)
    return algo.temperature + fraction * (algo.temperature_final - algo.temperature)


def _next_examples(examples: list, position: int, count: int, seed: int) -> tuple[list, int]:
    """The next ``count`` examples of a seeded shuffle per epoch; ``position`` counts examples consumed."""
    chosen = []
    while len(chosen) < count:
        epoch, offset = divmod(position, len(examples))
        order = list(range(len(examples)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = order[offset : offset + count - len(chosen)]
        chosen.extend(examples[i] for i in take)
        position += len(take)
    return chosen, position


def _improved(state: dict, value: float | None) -> dict:
    """Update best-metric bookkeeping (for save_best and early stopping) and return the state."""
    if value is not None:
        if state["best_metric"] is None or value > state["best_metric"]:
            state["best_metric"], state["evals_without_improvement"] = value, 0
        else:
            state["evals_without_improvement"] += 1
    return state


def _start_tracking(config: PalaestraConfig, task, run_id: str | None, run_dir: Path):
    if not config.tracking.enabled:
        return None
    name = config.tracking.run_name or f"{config.task.name}-{config.algo.name}-{config.model.name}"
    tracker = MlflowTracker(config.tracking.experiment, run_name=name, run_id=run_id, tracking_uri=config.tracking.tracking_uri)
    if run_id is None:
        resolved = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
        tracker.log_params(flatten_config(resolved))
        tracker.set_tags({
            "task": config.task.name, "algo": config.algo.name,
            "model": model_id(config.model.name, config.model.path), "dataset_version": task.dataset_version,
            "run_dir": str(run_dir.resolve()),
        })
        tracker.log_dict(resolved, "config.yaml")
    return tracker


def _eval_sampling(config: PalaestraConfig) -> SamplingParams:
    ev = config.eval
    max_new = ev.max_new_tokens or config.algo.max_completion_length
    return SamplingParams(max_new, ev.temperature, ev.top_p, ev.top_k, greedy=ev.greedy)


def _sample_rows(step, examples, texts, rewards, components, group_size) -> list[dict]:
    rows = []
    for index, text in enumerate(texts):
        example = examples[index // group_size]
        row = {"step": step, "question": example.question, "answer": example.answer, "completion": text,
               "reward": float(rewards[index])}
        row.update({f"reward/{_short(name)}": float(values[index]) for name, values in components.items()})
        rows.append(row)
    return rows


def _log_plots(tracker, state: dict, run_dir: Path) -> None:
    history = state["history"]
    curves = {k: [tuple(point) for point in v] for k, v in history.items() if k in ("reward/mean", "eval/accuracy")}
    if curves:
        path = plot_curves(curves, run_dir / "reward_curve.png", title="GRPO: reward and held-out accuracy", smooth=5)
        tracker.log_artifact(str(path), "plots")


def _short(reward_name: str) -> str:
    """A reward's logging name: "pkg.module:my_reward" -> "my_reward"."""
    return reward_name.rsplit(":", 1)[-1]

