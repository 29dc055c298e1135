"""GRPO: Group Relative Policy Optimization on a task with verifiable rewards.

Launch::

    palaestra train                                  # embedded SmolLM2-135M on chain_sum
    palaestra train task=countdown algo.beta=0.04 train.steps=100
    palaestra train model=tiny experiment=quick_test
    torchrun --nproc_per_node 2 -m palaestra.cli train train.strategy=fsdp   # 2 processes, each 1/2 of the weights

The loop, top to bottom: sample ``num_generations`` completions per prompt, score them with the
task's reward functions, normalise rewards within each group into advantages, and take a clipped
policy-gradient step (optionally with a k3 KL penalty to the reference model, which is the same
model with its LoRA adapter switched off). Every ``save_interval`` steps a checkpoint with
everything needed to resume bit-for-bit is written atomically. With several processes each rolls out
its share of the step's prompts; with ``train.strategy=fsdp`` each also holds only its shard of the
weights (:mod:`palaestra.sharding`), gathered whole while it samples and scores.

With ``agent.tools`` each completion is a tool-calling episode (:mod:`palaestra.agents.episodes`): the policy's
turns with the tools' results between them, trained on its own sampled tokens only.

With ``agent.program`` each episode is a run of the user's agent program against an endpoint served from the policy
(:mod:`palaestra.agents.program`); each of its calls is a row of the batch, trained with the episode's advantage.

With ``algo.teacher`` (on-policy distillation) a frozen teacher scores every sampled token too, and each
token's advantage adds the teacher's verdict on it (:func:`palaestra.algorithms.grpo.distillation_advantages`).

Simplifications relative to the DeepSeekMath paper: one rollout batch per step and no separate
reward model (rewards are programs); ``num_iterations`` > 1 re-uses the batch with stored old
log-probs, as in the paper's inner loop.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from palaestra.agents.episodes import tool_agent
from palaestra.algorithms.grpo import group_advantages, informative_groups, keep_first, overlong_penalty
from palaestra.config import reward_weights
from palaestra.config.errors import ConfigError
from palaestra.config.rollout import resolved_correction
from palaestra.config.sampling import objective_settings
from palaestra.recipes.grpo_config import GRPOConfig
from palaestra.distributed import Distributed
from palaestra.evaluation.evaluate import evaluate
from palaestra.models import embedded_model_dir, frozen_reference_copy, model_id, reference_logits_context
from palaestra.models.logprobs import shared_prompt_rows
from palaestra.data.order import next_items
from palaestra.models.loading import enable_gradient_checkpointing, load_policy, policy_identity
from palaestra.models.teacher import load_teacher
from palaestra.optim import adamw
from palaestra.runtime import seed_everything
from palaestra.recipes.methods import best_metric
from palaestra.recipes.run import Run, config_dict
from palaestra.recipes.update import micro_batch_logprobs, policy_update
from palaestra.rewards import combine_rewards
from palaestra.rollout import HFGenerator, Rollout, SamplingParams
from palaestra.sharding import full_weights, shard_model
from palaestra.tasks.build import build_task

log = logging.getLogger("palaestra")


def main(config: GRPOConfig, *, evaluate_before_after: bool = False) -> dict:
    """Train with GRPO; return the run folder, the MLflow run id and the final figures."""
    train_cfg, algo = config.train, config.algo

    # ---- processes, seed and threads
    dist = Distributed.from_environment()
    prompts_per_step = train_cfg.completions_per_step // algo.num_generations
    if prompts_per_step % dist.world or (train_cfg.completions_per_step // dist.world) % train_cfg.completions_per_forward:
        raise ConfigError(
            f"{prompts_per_step} prompts per step (train.completions_per_step={train_cfg.completions_per_step}) cannot be split over {dist.world} "
            f"processes in micro-batches of {train_cfg.completions_per_forward}; use a batch that divides evenly"
        )
    seed_everything(train_cfg.seed, threads=train_cfg.threads)  # the same on every process: the same initial weights

    # ---- data (cheap, and fails before the model loads on a bad dataset); rollout workers answering
    task = build_task(config.task)
    eval_examples = task.test[: config.eval.max_examples or None]
    if config.rollout.engine == "server":
        from palaestra.rollout.servers import check_servers

        check_servers(config.rollout.servers, wait_s=config.rollout.server_wait_s, api_key=config.rollout.api_key)

    # ---- model, adapter, reference
    device = dist.device(config.train.device)
    model, tokenizer, precision, dtype = load_policy(config.model, device)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    dist.broadcast_parameters([p for p in model.parameters() if p.requires_grad])  # every process: the main one's weights
    teacher = load_teacher(algo.teacher, config.model, device, dtype, tokenizer) if algo.teacher else None
    reference = None
    if algo.beta > 0 and not config.model.lora.enabled:
        reference = frozen_reference_copy(model)  # full fine-tuning needs a frozen copy; LoRA does not
    if train_cfg.strategy == "fsdp" and dist.enabled:
        for policy in (model, reference) if reference is not None else (model,):
            shard_model(policy, dist, precision=precision, cpu_offload=train_cfg.fsdp_cpu_offload)
    model.train()

    # ---- run folder, rollout engine, optimizer, resume, tracking
    run = Run(train_cfg, method="grpo", runs_root=Path("runs") / f"{config.task.name}-{algo.name}", total_steps=train_cfg.steps,
              identity=policy_identity(config.model),
              best=best_metric(config), dist=dist, state={"data_position": 0, "task_state": {}},
              progress=("reward/mean", "tokens_per_second") + (("tool/used_share",) if config.agent.tools else ()),
              curves=("reward/mean", "tool/used_share", "tool/calls_per_episode", "program/calls_per_episode"),
              plot=("reward_curve.png", "GRPO: reward and held-out accuracy"))
    log.info("device %s, compute precision %s, weights %s", device, precision, dtype)
    generator = _generator(config, model, tokenizer, precision, run.run_dir)
    agent = tool_agent(config.agent, generator, config.task.instruction) if config.agent.tools else None
    if agent is not None:
        generator = agent  # the same generate call, running tool-calling episodes
    program = _program_agent(config, generator) if config.agent.program else None
    if program is not None:
        from palaestra.agents.program import evaluate_program, program_rewards
    task.bind(generator)  # a workflow task's executor may be the policy with its adapter off
    correction = resolved_correction(config.rollout)
    updates_total = train_cfg.steps * algo.num_iterations
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = adamw(trainable, train_cfg, updates_total)
    run.resume(model=model, optimizer=optimizer, scheduler=scheduler)
    if dist.rank and not run.rng_restored:  # a fresh start (or a checkpoint of fewer processes): the process's own
        torch.manual_seed(train_cfg.seed + 1000 * dist.rank + run.step)  # stream; rank 0 samples as one process does
    task.load_state_dict(run.state["task_state"])  # a task with state: the workflow task's experience buffer
    tracker = run.track(config.tracking, run_name=f"{config.task.name}-{algo.name}-{config.model.name}",
                        tags={"task": config.task.name, "algo": algo.name, "model": model_id(config.model.name, config.model.path),
                              "dataset_version": task.dataset_version},
                        config=config_dict(config))

    weights = reward_weights(config.task)
    # a program's calls have prompts of their own: no group shares one
    shared = shared_prompt_rows(train_cfg.completions_per_forward, 1 if program else algo.num_generations,
                                train_cfg.share_prompt_forward)
    eval_sampling = _eval_sampling(config)
    results: dict = {}

    def run_eval(step: int, label: str) -> dict | None:
        """Evaluate on the main process (the others wait); figures on the main process, else None."""
        with full_weights(model):  # sharded weights gathered on every process: the main one evaluates alone
            if not dist.is_main:
                dist.barrier()
                return None
            if config.rollout.engine != "hf":
                generator.sync_adapter()  # the engine evaluates the weights as they are now
            if program is not None:
                result = evaluate_program(program, task, eval_examples, reward_weights=weights, sampling=eval_sampling,
                                          batch_size=config.eval.batch_size, seed=train_cfg.seed)
            else:
                with generator.exact() if isinstance(generator, HFGenerator) else nullcontext():  # the policy itself
                    result = evaluate(
                        generator, task, eval_examples, reward_weights=weights, format_reward=config.task.format_reward,
                        sampling=eval_sampling, num_samples=config.eval.num_samples, pass_k=list(config.eval.pass_k),
                        batch_size=config.eval.batch_size, seed=train_cfg.seed, show_progress=True,
                    )
            metrics = result.metrics()
            metrics.update(task.evaluation_figures(result.samples))  # the workflow task's per-domain figures
            for episodes in (agent, program):
                if episodes is not None:
                    metrics.update(episodes.figures())  # tool or program use over the evaluation's episodes
            figures = run.log_eval(step, label, metrics)
            if tracker:
                tracker.log_table(result.samples[:32], f"eval/samples_{label}_step{step:06d}.json")
            dist.barrier()
            return figures

    def sample_and_score(examples: list, temperature: float) -> ScoredGroups:
        """1. G completions for each of ``examples``, 2. their rewards (with their components)."""
        sampling = SamplingParams(algo.max_completion_length, temperature, algo.top_p, algo.top_k)
        if program is not None:  # G runs of the agent program per example, each call of each a row
            with run.timed("generation"):
                episodes = program.run_episodes(list(examples), algo.num_generations, sampling)
            with run.timed("rewards"):
                columns = task.columns([e for e in examples for _ in range(algo.num_generations)])
                rewards, components = program_rewards(episodes, columns, weights)
            return ScoredGroups(list(examples), episodes.rollout, rewards, components, episodes.row_episode, episodes.answers)
        with run.timed("generation"):
            rollout = generator.generate([task.prompt(e) for e in examples], algo.num_generations, sampling)
        with run.timed("rewards"):  # a workflow task's executor may run the policy
            columns = task.columns([e for e in examples for _ in range(algo.num_generations)])
            rewards, components = combine_rewards(rollout.texts, columns, weights)
            rewards = torch.tensor(rewards, dtype=torch.float32)
            if algo.overlong_buffer:  # DAPO's soft punishment of completions near the length budget
                overlong = algo.overlong_penalty * overlong_penalty(
                    rollout.sampled_mask.sum(dim=1), algo.max_completion_length, algo.overlong_buffer)
                rewards, components["overlong"] = rewards + overlong, overlong.tolist()
        return ScoredGroups(list(examples), rollout, rewards, components)

    if evaluate_before_after and run.step == 0:
        results["before"] = run_eval(0, "before")

    with run:
        for step in run.steps():
            temperature = _temperature(algo, step)

            # 1-2. roll out G completions for each prompt of this step and score them (a weighted sum of reward
            #      functions, each component kept for logging); with algo.dynamic_sampling, groups whose rewards
            #      all agree are dropped and rounds of fresh prompts drawn until the step has prompts_per_step
            #      groups, or algo.max_sampling_rounds rounds are spent
            parts, drawn, kept_groups, generated_tokens = [], [], 0, 0
            if config.rollout.engine != "hf":
                with run.timed("adapter_sync"):
                    generator.sync_adapter()  # the engine samples from the adapter as the last update left it
            with full_weights(model):  # on each process alone (sharded weights gathered whole)
                while len(drawn) < (algo.max_sampling_rounds if algo.dynamic_sampling else 1) and kept_groups < prompts_per_step:
                    examples, run.state["data_position"] = next_items(
                        task.train, run.state["data_position"], prompts_per_step, train_cfg.seed
                    )
                    scored = sample_and_score(dist.share(examples), temperature)  # each process its share
                    generated_tokens += scored.rollout.num_completion_tokens
                    drawn.append(dist.gather(scored.rewards))  # every process's, in draw order
                    keep = informative_groups(drawn[-1], algo.num_generations) if algo.dynamic_sampling else \
                        torch.ones(prompts_per_step, dtype=torch.bool)
                    keep = keep_first(keep, prompts_per_step - kept_groups)
                    kept_groups += int(keep.sum())
                    parts.append(scored.groups(keep.chunk(dist.world)[dist.rank], algo.num_generations))
            batch = ScoredGroups.concat(parts)
            rollout, rewards, components = batch.rollout, batch.rewards, batch.components
            all_drawn = torch.cat(drawn)

            # 3. advantages: normalised within each prompt's group (batch scaling sees every process's groups)
            all_rewards = dist.gather_rows(rewards)
            advantages = group_advantages(all_rewards, algo.num_generations, scale=algo.scale_rewards, estimator=algo.advantage)
            start = sum(dist.gather_objects([len(rewards)])[: dist.rank])
            advantages = advantages[start : start + len(rewards)].to(device)
            if batch.row_episode is not None:  # a program episode's calls: each trained with its episode's advantage
                advantages = advantages[batch.row_episode.to(device)]
            loss_mask = rollout.sampled_mask.float()  # a tool's results between the turns are not the policy's
            if algo.mask_truncated_completions:
                loss_mask = loss_mask * (~rollout.truncated).float().unsqueeze(1)
            loss_mask = loss_mask.to(device)

            # 4. loss and step: old/ref/teacher log-probs once, then num_iterations clipped updates
            rows = rollout.completion_ids.shape[0]  # completions (or a program's calls)
            slices = [slice(i, i + train_cfg.completions_per_forward) for i in range(0, rows, train_cfg.completions_per_forward)]
            old_logps = ref_logps = teacher_logps = None
            sampler_logps = None if rollout.sampler_logprobs is None else [rollout.sampler_logprobs[s] for s in slices]
            with torch.no_grad():
                if algo.num_iterations > 1:
                    with run.timed("old_logprobs"):
                        old_logps = [micro_batch_logprobs(model, rollout, s, temperature, shared, precision,
                                                          chunk_tokens=train_cfg.logprob_chunk_tokens)[0] for s in slices]
                if algo.beta > 0:
                    with run.timed("reference"), _reference(model, reference):
                        ref_model = reference if reference is not None else model
                        ref_logps = [micro_batch_logprobs(ref_model, rollout, s, temperature, shared, precision,
                                                          chunk_tokens=train_cfg.logprob_chunk_tokens)[0] for s in slices]
                if teacher is not None:  # on-policy distillation: the teacher scores the student's tokens
                    with run.timed("teacher"):
                        teacher_logps = [micro_batch_logprobs(teacher, rollout, s, temperature, shared, precision,
                                                              chunk_tokens=train_cfg.logprob_chunk_tokens)[0] for s in slices]
            stats: dict[str, float] = {}
            grad_norm = 0.0
            for _ in range(algo.num_iterations if kept_groups else 0):  # no group to learn from: no update
                stats, grad_norm = update_policy(
                    model, optimizer, scheduler, trainable, rollout, advantages, loss_mask, algo=algo, slices=slices,
                    shared=shared, precision=precision, temperature=temperature, old_logps=old_logps,
                    ref_logps=ref_logps, teacher_logps=teacher_logps, max_grad_norm=train_cfg.max_grad_norm, dist=dist,
                    timings=run.timings, chunk_tokens=train_cfg.logprob_chunk_tokens, sampler_logps=sampler_logps,
                    correction=correction, correction_cap=config.rollout.correction_cap,
                )
            if stats.get("rollout/logprob_gap/mean", 0.0) > 0.5:
                log.warning("step %d: the rollout engine's log-probs differ from the trainer's by %.2f nats a token; does "
                            "it serve the same base model (model.path)? (top_p or top_k sampling widens the gap too)",
                            step, stats["rollout/logprob_gap/mean"])

            # 5. log / eval / checkpoint
            lengths = rollout.sampled_mask.sum(dim=1).float()
            elapsed = run.step_seconds()
            sampling = {"sampling/rounds": len(drawn), "sampling/groups": kept_groups,
                        "sampling/dropped_share": 1 - kept_groups / (len(drawn) * prompts_per_step)} if algo.dynamic_sampling else {}
            run.log(step, {
                **stats,
                "reward/mean": float(all_drawn.mean()),  # every completion drawn this step
                "reward/std": float(all_drawn.std()) if len(all_drawn) > 1 else 0.0,
                **sampling,
                **{f"reward/{_short(name)}/mean": float(np.mean(values)) for name, values in components.items()},
                "completion_length/mean": float(lengths.mean()),
                "completion_length/max": float(lengths.max()),
                "completion_length/min": float(lengths.min()),
                "truncated_fraction": float(rollout.truncated.float().mean()),
                "grad_norm": grad_norm,
                "learning_rate": scheduler.get_last_lr()[0],
                "temperature": temperature,
                "tokens_per_second": float(dist.sum(torch.tensor(float(generated_tokens)))) / elapsed,
                **({"rollout/resent_requests": float(generator.resent)} if config.rollout.engine == "server" else {}),
                **(agent.figures() if agent is not None else {}),
                **(program.figures() if program is not None else {}),
            })
            if tracker and train_cfg.log_samples_interval and step % train_cfg.log_samples_interval == 0:
                # the whole episodes, results included (dynamic sampling may keep only some of the last call's groups)
                texts = agent.transcripts() if agent is not None and not algo.dynamic_sampling else rollout.texts
                texts = batch.answers if batch.answers is not None else texts  # a program episode: what it returned
                tracker.log_table(_sample_rows(step, batch.examples, texts, rewards, components, algo.num_generations),
                                  f"samples/step{step:06d}.json")
            run.state["task_state"] = task.state_dict()
            if run.end_of_step(step, run_eval(step, "train") if run.eval_due(step) else None):
                break

    # ---- final evaluation, plots, cleanup
    if evaluate_before_after and (run.finished or run.out_of_time):
        results["after"] = run_eval(run.step, "after")
        if run.tracker and results.get("before") and results.get("after"):
            plot = task.plot_outcomes(results["before"], results["after"], run.run_dir / "workflow_outcomes.png")
            if plot is not None:
                run.tracker.log_artifact(str(plot), "plots")
    if config.rollout.engine == "server":
        generator.close()
    if program is not None:
        program.close()
    return {**run.finish(), **results}


# ---------------------------------------------------------------------------------------- helpers


@dataclass
class ScoredGroups:
    """Completions sampled in groups, with their rewards: one group of G per prompt, in prompt order."""

    examples: list
    """The prompts' examples, one per group."""
    rollout: Rollout
    """G completions per example, group after group."""
    rewards: torch.Tensor
    """[B] each completion's reward (the weighted sum)."""
    components: dict[str, list[float]]
    """Each reward function's unweighted values, [B] each."""
    row_episode: torch.Tensor | None = None
    """With agent.program: [R] the completion (episode) each rollout row belongs to (a row per endpoint call)."""
    answers: list[str] | None = None
    """With agent.program: [B] what each episode's program returned as its answer."""

    def groups(self, keep: torch.Tensor, group_size: int) -> "ScoredGroups":
        """The groups where ``keep`` ([B / G] bool) is true."""
        rows = keep.repeat_interleave(group_size)
        if bool(rows.all()):
            return self
        chosen = [index for index, kept in enumerate(rows.tolist()) if kept]
        return ScoredGroups([e for e, kept in zip(self.examples, keep.tolist()) if kept], self.rollout.select(rows),
                            self.rewards[rows], {name: [values[i] for i in chosen] for name, values in self.components.items()})

    @staticmethod
    def concat(parts: list["ScoredGroups"]) -> "ScoredGroups":
        """The groups of every part, one part after the other."""
        if len(parts) == 1:
            return parts[0]
        return ScoredGroups([e for p in parts for e in p.examples], Rollout.concat([p.rollout for p in parts]),
                            torch.cat([p.rewards for p in parts]),
                            {name: [v for p in parts for v in p.components[name]] for name in parts[0].components})


def update_policy(
    model, optimizer, scheduler, trainable, rollout, advantages, loss_mask, *, algo, slices, shared, precision,
    temperature, old_logps, ref_logps, max_grad_norm, dist: Distributed, timings: dict, chunk_tokens: int = 0,
    teacher_logps=None, sampler_logps=None, correction: str = "none", correction_cap: float = 2.0,
) -> tuple[dict[str, float], float]:
    """One optimizer update on this process's share of the batch, gradients summed over processes:
    :func:`palaestra.recipes.update.policy_update` on the rollout's micro-batches, entropy logged.

    ``old_logps`` / ``ref_logps`` / ``teacher_logps`` / ``sampler_logps`` (the rollout engine's): one tensor per
    micro-batch of ``slices`` (computed once before the ``num_iterations`` updates), or None.
    """
    distillation = {"teacher_coef": algo.teacher_coef, "reward_coef": algo.reward_coef} if teacher_logps is not None else {}
    return policy_update(
        optimizer, scheduler, trainable, advantages, loss_mask, slices=slices,
        logprobs=lambda rows: micro_batch_logprobs(model, rollout, rows, temperature, shared, precision, with_entropy=True,
                                                   chunk_tokens=chunk_tokens, entropy_gradient=algo.entropy_coef > 0),
        old_logps=old_logps, ref_logps=ref_logps, teacher_logps=teacher_logps, **distillation,
        sampler_logps=sampler_logps, correction=correction, correction_cap=correction_cap,
        max_completion_length=algo.max_completion_length, **objective_settings(algo),
        max_grad_norm=max_grad_norm, dist=dist, timings=timings,
    )


def _generator(config: GRPOConfig, model, tokenizer, precision: str, run_dir: Path):
    """The rollout engine: palaestra's decode loop on the training model, vLLM serving its adapter, or rollout
    workers to which the adapter is pushed."""
    algo, rollout = config.algo, config.rollout
    if rollout.engine == "server":
        from palaestra.rollout.servers import ServerGenerator

        return ServerGenerator(model, tokenizer, list(rollout.servers), adapter_dir=rollout.adapter_dir or run_dir / "rollout_adapters",
                               max_prompt_length=algo.max_prompt_length, precision=precision,
                               request_timeout_s=rollout.request_timeout_s, server_wait_s=rollout.server_wait_s,
                               api_key=rollout.api_key)
    if rollout.engine == "vllm":
        from palaestra.rollout.vllm_engine import VLLMGenerator

        base = config.model.path or embedded_model_dir(config.model.name)
        return VLLMGenerator(model, tokenizer, str(base), max_prompt_length=algo.max_prompt_length,
                             max_lora_rank=max(8, config.model.lora.r), seed=config.train.seed)
    return HFGenerator(model, tokenizer, max_prompt_length=algo.max_prompt_length, precision=precision,
                       quantize=rollout.quantize)


def _program_agent(config: GRPOConfig, generator):
    """The user's agent program, served from the policy through a recording endpoint."""
    from palaestra.agents.program import ProgramAgent
    from palaestra.config.agent import program_function

    settings = config.agent
    log.info("agent: the program %s, up to %d endpoint calls an episode", settings.program, settings.program_max_calls)
    return ProgramAgent(generator, program_function(settings.program), max_calls=settings.program_max_calls,
                        timeout_s=settings.program_timeout_s, workers=settings.program_workers)


def _reference(model, reference):
    """The reference policy: a frozen copy (full fine-tuning) or the model with its adapter off."""
    return nullcontext() if reference is not None else reference_logits_context(model)


def _temperature(algo, step: int) -> float:
    """Linear schedule from algo.temperature to algo.temperature_final over the schedule's steps."""
    if algo.temperature_final is None or algo.temperature_schedule_steps <= 0:
        return algo.temperature
    fraction = min(1.0, (step - 1) / algo.temperature_schedule_steps)
    return algo.temperature + fraction * (algo.temperature_final - algo.temperature)



def _eval_sampling(config: GRPOConfig) -> SamplingParams:
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



def _short(reward_name: str) -> str:
    """A reward's logging name: "pkg.module:my_reward" -> "my_reward"."""
    return reward_name.rsplit(":", 1)[-1]

