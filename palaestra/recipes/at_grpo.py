"""AT-GRPO: train a team of LLM agents in a multi-turn environment (PettingLLMs, arXiv 2510.11062).

Launch::

    palaestra train algo=at_grpo env=plan_path policy=shared
    palaestra train algo=at_grpo env=sokoban policy=per_role algo.samples_per_state=8
    palaestra eval algo=at_grpo env=plan_path eval.checkpoint=runs/plan_path-at_grpo/<stamp>
    torchrun --nproc_per_node 2 -m palaestra.cli train algo=at_grpo env=plan_path policy=per_role

Each step plays ``env.train_envs`` fresh problems. Every turn, every agent in the environment's
turn order answers K times from the same state; each answer is applied to its own copy of the
environment and scored (agent reward = alpha * team + local); the best branch is carried forward.
The K answers of one (problem, turn, agent) form a GRPO group; their normalised rewards are the
advantages. Each policy then takes a clipped policy-gradient step on the answers of the roles it
serves — with ``policy=per_role`` each role's LoRA adapter learns only from its own answers.

With several processes each plays a block of the step's problems (its own random stream) and of the
test problems; the group filter and the figures see every process's groups; each policy's update
counts every process's answers of its roles, and its gradients are summed only with its own
(each role's adapter or model with itself), so every process applies the same update.

With ``rollout.engine=server`` the team samples on rollout workers (:mod:`palaestra.rollout.servers`): each
policy's adapter is pushed to them before every rollout (``per_role``: one adapter per role, side by side over
one base in every worker) and the update corrects the workers' mismatch (``rollout.correction``).

Simplifications relative to the paper: one optimizer step per policy per rollout batch (one PPO
epoch, as in the reference) and no critic; evaluation plays each test problem without branching.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from palaestra.agents.episodes import tool_agent
from palaestra.algorithms.at_grpo import select_samples, tree_advantages
from palaestra.config.errors import ConfigError
from palaestra.config.rollout import resolved_correction
from palaestra.config.sampling import objective_settings
from palaestra.recipes.at_grpo_config import ATGRPOConfig
from palaestra.envs import resolve_env, train_seeds
from palaestra.envs.workers import StepFn, env_workers, step_in_process
from palaestra.distributed import Distributed
from palaestra.evaluation.team import evaluate_team, everyones, rollout_metrics, team_sampling
from palaestra.models import model_id
from palaestra.models.logprobs import shared_prompt_rows
from palaestra.models.policies import Policy, build_policies, exact_sampling, reusing_weights
from palaestra.models.precision import resolve_precision, weights_dtype
from palaestra.models.loading import enable_gradient_checkpointing, policy_identity
from palaestra.optim import adamw
from palaestra.runtime import seed_everything, training_device
from palaestra.recipes.methods import best_metric
from palaestra.recipes.run import Run, config_dict
from palaestra.recipes.update import micro_batch_logprobs, policy_update
from palaestra.rollout import SamplingParams
from palaestra.rollout.tree import AgentGroup, Episode, independent_groups, stack_rows, tree_rollout

log = logging.getLogger("palaestra")


def main(config: ATGRPOConfig, *, evaluate_before_after: bool = True) -> dict:
    """Train a team with AT-GRPO; return the run folder, the MLflow run id and the figures."""
    train_cfg, algo, env_cfg = config.train, config.algo, config.env
    dist = Distributed.from_environment()
    seed_everything(train_cfg.seed, threads=train_cfg.threads)  # the same on every process: the same initial weights

    # ---- environments (cheap; fails before any model loads on bad parameters)
    env_class = resolve_env(env_cfg.name)
    try:
        make_env = lambda: env_class(**dict(env_cfg.params))  # noqa: E731 - a factory, one env per problem
        make_env()
    except (TypeError, ValueError) as error:
        raise ConfigError(f"env.params for {env_cfg.name}: {str(error).splitlines()[0]}") from None
    roles = tuple(make_env().turn_order)
    if config.rollout.engine == "server":  # rollout workers answering, before any model loads
        from palaestra.rollout.servers import check_servers

        check_servers(config.rollout.servers, wait_s=config.rollout.server_wait_s, api_key=config.rollout.api_key)

    # ---- policies: models, adapters, optimizers
    device = training_device(train_cfg.device, dist)
    precision = resolve_precision(config.model.precision, device)
    lora = config.model.lora
    lora_args = dict(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules) if lora.enabled else None
    policies, role_policy = build_policies(
        config.policy.mode, roles, model_name=config.model.name, model_path=config.model.path,
        dtype=weights_dtype(config.model.dtype, precision, lora.enabled),
        device=device, lora=lora_args, role_models=dict(config.policy.role_models),
        max_prompt_length=algo.max_prompt_length, precision=precision, quantize=config.rollout.quantize,
    )
    if train_cfg.gradient_checkpointing:
        for model in {id(policy.model): policy.model for policy in policies.values()}.values():
            enable_gradient_checkpointing(model)
    for policy in policies.values():
        policy.activate()
        policy.optimizer, policy.scheduler = adamw(list(policy.parameters().values()), train_cfg, train_cfg.steps)
        dist.broadcast_parameters(list(policy.parameters().values()))  # every process starts from the main one's

    # ---- run folder, resume, tracking
    run = Run(train_cfg, method="at_grpo", runs_root=Path("runs") / f"{env_cfg.name}-{algo.name}", total_steps=train_cfg.steps,
              identity={**policy_identity(config.model), "policy": config.policy.mode},
              best=best_metric(config), dist=dist, progress=("success_rate", "reward/mean", "tokens_per_second"),
              curves=("success_rate",), plot=("success_curve.png", "AT-GRPO: success rate"))
    log.info("env %s, roles %s -> policies %s, device %s, precision %s", env_cfg.name, roles, role_policy, device, precision)
    if config.rollout.engine == "server":
        _sample_on_servers(policies, config, run.run_dir)
    if config.agent.tools:  # every role's answers are tool-calling episodes
        agents = {}
        for policy in policies.values():
            if id(policy.generator) not in agents:
                agents[id(policy.generator)] = tool_agent(config.agent, policy.generator)
            policy.generator = agents[id(policy.generator)]
    run.resume(parts={name: policy.checkpoint_part() for name, policy in policies.items()})
    if dist.rank and not run.rng_restored:  # a fresh start (or a checkpoint of fewer processes): the process's own
        torch.manual_seed(train_cfg.seed + 1000 * dist.rank + run.step)  # stream; rank 0 samples as one process does
    tracker = run.track(
        config.tracking, run_name=f"{env_cfg.name}-{algo.name}-{config.policy.mode}-{config.model.name}",
        tags={"env": env_cfg.name, "task": env_cfg.name, "algo": algo.name, "policy": config.policy.mode,
              "model": model_id(config.model.name, config.model.path),
              "dataset_version": f"{env_cfg.name}:{sorted(dict(env_cfg.params).items())}:seed={env_cfg.seed}"},
        config=config_dict(config),
    )

    train_sampling = SamplingParams(algo.max_completion_length, algo.temperature, algo.top_p, algo.top_k)
    step_envs = env_workers(env_cfg.backend, env_cfg.workers, env_cfg.step_timeout_s)  # in process for 0 workers
    eval_sampling, plays = team_sampling(config.eval, algo.max_completion_length)
    results: dict = {}

    def generate(agent: str, prompts: list[list[dict]], samples: int, sampling: SamplingParams):
        policy = policies[role_policy[agent]]
        policy.activate()
        if config.rollout.engine == "server":  # the workers serve each policy's adapter under its own name
            return policy.generator.generate(prompts, samples, sampling, adapter=policy.adapter or "default")
        return policy.generator.generate(prompts, samples, sampling)

    def sync_adapters() -> None:
        """Rollout workers: every policy's adapter as the last update left it."""
        if config.rollout.engine == "server":
            for policy in policies.values():
                policy.generator.sync_adapter(policy.adapter or "default")

    def run_eval(step: int, label: str) -> dict:
        sync_adapters()
        with reusing_weights(policies), exact_sampling(policies):  # the policies themselves, at full precision
            figures, episodes = evaluate_team(make_env, generate, env_cfg.test_envs, sampling=eval_sampling, plays=plays,
                                              alpha=algo.alpha, seed=train_cfg.seed, base_seed=env_cfg.seed, dist=dist,
                                              step=step_envs)
        if tracker:
            tracker.log_dict({"episodes": [vars(e) for e in episodes[:4]]}, f"transcripts/{label}_step{step:06d}.json")
        return run.log_eval(step, label, {**figures, **_tool_figures(policies)})

    if evaluate_before_after and run.step == 0:
        results["before"] = run_eval(0, "before")

    with run:
        for step in run.steps():

            # 1. roll out: a tree of K answers per (turn, agent) over fresh training problems (this process's block)
            seeds = train_seeds(env_cfg.train_envs, base=env_cfg.seed + (step - 1) * env_cfg.train_envs)
            sync_adapters()
            with run.timed("rollout"), reusing_weights(policies):
                groups, episodes = _rollout(make_env, dist.split(seeds), generate, train_sampling, algo, step_envs)
            all_groups, all_episodes = everyones(groups, episodes, dist)  # for the filter and the figures

            # 2. score and 3. advantages: normalised inside each (problem, turn, agent) group; the filter
            #    ranks every process's groups and keeps this process's part of its choice
            offset = sum(dist.gather_objects([len(groups)])[: dist.rank])
            keep = select_samples([torch.tensor(g.rewards) for g in all_groups], algo.group_filter,
                                  algo.filter_ratio)[offset : offset + len(groups)]
            keep = [mask & torch.tensor([not r.info.get("lost") for r in g.results])  # an environment's failure is no
                    for mask, g in zip(keep, groups)]                                 # verdict on the answer: not trained on
            advantages = tree_advantages([torch.tensor(g.rewards) for g in all_groups], algo.advantage,
                                         algo.scale_rewards)[offset : offset + len(groups)]

            # 4. loss and step: each policy on the answers of the roles it serves
            stats: dict[str, float] = {}
            with run.timed("train"):
                for name, policy in policies.items():
                    stats.update(_train_policy(policy, groups, advantages, keep, role_policy, config, dist))

            # 5. log / eval / checkpoint
            elapsed = run.step_seconds()
            tokens = dist.totals(sum(int(rollout.sampled_mask[row].sum()) for g in groups for rollout, row in g.answers))[0]
            run.log(step, {**stats, **rollout_metrics(all_groups, all_episodes), **_tool_figures(policies),
                           "learning_rate": next(iter(policies.values())).scheduler.get_last_lr()[0],
                           "tokens_per_second": tokens / elapsed})
            if tracker and train_cfg.log_samples_interval and step % train_cfg.log_samples_interval == 0:
                tracker.log_dict({"episodes": [vars(e) for e in all_episodes[:2]]}, f"transcripts/train_step{step:06d}.json")
            if run.end_of_step(step, run_eval(step, "train") if run.eval_due(step) else None):
                break

    if evaluate_before_after and (run.finished or run.out_of_time):
        results["after"] = run_eval(run.step, "after")
    for generator in {id(p.generator): p.generator for p in policies.values()}.values():
        getattr(generator, "close", lambda: None)()
    if env_cfg.workers:
        step_envs.close()
    return {**run.finish(), **results}


# ------------------------------------------------------------------------------------------ pieces


def _sample_on_servers(policies: dict[str, Policy], config: ATGRPOConfig, run_dir: Path) -> None:
    """Give every policy a generator on the rollout workers: one per model (``per_role``'s adapters share it)."""
    from palaestra.rollout.servers import ServerGenerator

    rollout, generators = config.rollout, {}
    for policy in policies.values():
        if id(policy.model) not in generators:
            generators[id(policy.model)] = ServerGenerator(
                policy.model, policy.tokenizer, list(rollout.servers), adapter_dir=rollout.adapter_dir or run_dir / "rollout_adapters",
                max_prompt_length=config.algo.max_prompt_length, precision=policy.generator.precision,
                request_timeout_s=rollout.request_timeout_s, server_wait_s=rollout.server_wait_s, api_key=rollout.api_key)
        policy.generator = generators[id(policy.model)]


def _rollout(make_env, seeds: list[int], generate, sampling: SamplingParams, algo,
             step: StepFn = step_in_process) -> tuple[list[AgentGroup], list[Episode]]:
    """Tree rollout (K branches per state), or K independent episodes per problem (no_tree); ``step`` steps the
    environments (in the trainer's process or in workers)."""
    k = algo.samples_per_state
    gen = lambda agent, prompts, n: generate(agent, prompts, n, sampling)  # noqa: E731
    if algo.rollout == "tree":
        envs = [make_env() for _ in seeds]
        return tree_rollout(envs, seeds, gen, samples_per_state=k, alpha=algo.alpha, step=step)
    copies = [s for s in seeds for _ in range(k)]
    groups, episodes = tree_rollout([make_env() for _ in copies], copies, gen, samples_per_state=1, alpha=algo.alpha,
                                    branch=False, step=step)
    return [g for g in independent_groups(groups, k) if len(g.rewards) > 1], episodes


def _train_policy(policy: Policy, groups, advantages, keep, role_policy, config,
                  dist: Distributed | None = None) -> dict[str, float]:
    """One clipped policy-gradient step of ``policy`` on the kept answers of its roles (every process's: a
    process with none of them still takes part in the step)."""
    algo, train_cfg = config.algo, config.train
    dist = dist or Distributed()
    pairs, advs, block_sizes = [], [], []
    for group, group_adv, mask in zip(groups, advantages, keep):
        if role_policy[group.agent] != policy.name:
            continue
        kept_rows = [(answer, adv) for answer, adv, kept in zip(group.answers, group_adv.tolist(), mask.tolist()) if kept]
        pairs += [answer for answer, _ in kept_rows]
        advs += [adv for _, adv in kept_rows]
        block_sizes.append(len(kept_rows))
    name = policy.name
    (samples,) = dist.totals(len(pairs))
    if not samples:
        return {f"{name}/loss": 0.0, f"{name}/samples": 0.0}
    policy.activate()
    model = policy.model
    device = next(model.parameters()).device
    precision = policy.generator.precision
    size = train_cfg.answers_per_forward
    slices = [slice(i, i + size) for i in range(0, len(pairs), size)]
    batch, shared, loss_mask = None, 0, torch.zeros(0, 1)
    if pairs:
        batch = stack_rows(pairs, policy.tokenizer.pad_token_id)
        shared = _rows_sharing_prompt(batch, block_sizes, size, algo.samples_per_state, train_cfg.share_prompt_forward)
        loss_mask = batch.sampled_mask.float().to(device)  # tools' results between an answer's turns are not trained

    def reference(rows: slice) -> torch.Tensor:
        """The micro-batch's log-probs under the base model: the policy with its adapter off."""
        with torch.no_grad(), model.disable_adapter():
            return micro_batch_logprobs(model, batch, rows, algo.temperature, shared, precision,
                                        chunk_tokens=train_cfg.logprob_chunk_tokens)[0]

    totals, grad_norm = policy_update(
        policy.optimizer, policy.scheduler, list(policy.parameters().values()), torch.tensor(advs, dtype=torch.float32),
        loss_mask, slices=slices,
        logprobs=lambda rows: micro_batch_logprobs(model, batch, rows, algo.temperature, shared, precision,
                                                   chunk_tokens=train_cfg.logprob_chunk_tokens,
                                                   entropy_gradient=algo.entropy_coef > 0),
        ref_logps=reference if algo.beta > 0 else None, max_completion_length=algo.max_completion_length,
        sampler_logps=(lambda rows: batch.sampler_logprobs[rows]) if batch is not None and batch.sampler_logprobs is not None else None,
        correction=resolved_correction(config.rollout), correction_cap=config.rollout.correction_cap,
        max_grad_norm=train_cfg.max_grad_norm, dist=dist, **objective_settings(algo),
    )
    logged = ("loss", "kl", "clip_ratio/region", "entropy", "rollout/logprob_gap/mean", "rollout/logprob_gap/max",
              "rollout/is_ratio/mean", "rollout/is_capped_share")
    return {f"{name}/{key}": totals[key] for key in logged if key in totals} | {
        f"{name}/grad_norm": grad_norm, f"{name}/samples": samples}


def _rows_sharing_prompt(batch, block_sizes: list[int], micro_batch_size: int, group_size: int, enabled: bool) -> int:
    """Rows per shared-prompt block of the training batch (1: run every row's prompt; 0: no packing).

    Tree rollout gives every (state, agent) group K answers to one prompt; when every group kept
    all K answers and the micro-batches split into whole blocks, each block's prompt can go through
    the model once. No-tree groups (diverged episodes) have different prompts and fall back.
    """
    shared = shared_prompt_rows(micro_batch_size, group_size, enabled)
    if shared <= 1 or any(size != group_size for size in block_sizes):
        return min(shared, 1)
    ids, mask = batch.prompt_ids.view(-1, shared, batch.prompt_ids.shape[1]), batch.prompt_mask.view(-1, shared, batch.prompt_mask.shape[1])
    same = (ids == ids[:, :1]).all() and (mask == mask[:, :1]).all()
    return shared if bool(same) else 1


def _tool_figures(policies: dict) -> dict[str, float]:
    """Tool use since the last call, per policy when the team has several generators (agent.tools)."""
    agents = {id(p.generator): (name, p.generator) for name, p in policies.items() if hasattr(p.generator, "figures")}
    figures = {}
    for name, agent in agents.values():
        prefix = f"{name}/" if len(agents) > 1 else ""
        figures.update({prefix + key: value for key, value in agent.figures().items()})
    return figures
