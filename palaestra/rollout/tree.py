"""Multi-agent rollouts: tree rollout with greedy best-of-K (AT-GRPO), independent rollouts, and
the typed carriers that flow from rollout to training.

Tree mode (the reference): every turn, every agent in ``turn_order`` answers K times from the same
state of each environment; each answer is applied to its own copy of the environment and scored;
the branch with the highest agent reward is carried forward, the episode stops early when the
environment is done. The K answers form one GRPO group, keyed (environment, turn, agent).

No-tree mode: K independent episodes per problem, one answer per state; the group of an answer is
the K answers the same agent gave at the same turn of the same problem.

Generation is batched across all environments (and branches) that share a policy: one call per
(turn, agent) generates for every live environment at once; the answers are then stepped together too,
in the trainer's process or in worker processes (``step``: :mod:`palaestra.envs.workers`), where an
environment that crashes or hangs costs its episode (never the branch carried forward while another lives).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from palaestra.algorithms.at_grpo import agent_reward
from palaestra.envs import MultiAgentEnv, StepResult
from palaestra.envs.workers import LostEpisode, StepFn, step_in_process
from palaestra.rollout.hf import Rollout

# generate(agent, prompts, samples_per_prompt) -> Rollout whose rows are grouped prompt by prompt
GenerateFn = Callable[[str, list[list[dict]], int], Rollout]


@dataclass
class AgentGroup:
    """The K answers one agent gave at one turn of one problem (one GRPO group)."""

    problem: int  # index of the problem (environment) in this batch
    turn: int  # 0-based turn
    agent: str
    answers: list[tuple[Rollout, int]]  # each answer's generation batch and row in it
    results: list[StepResult]  # what each answer did
    rewards: list[float]  # alpha * team + local, per answer
    prompt: list[dict] = field(default_factory=list)  # the observation (kept for transcripts)


@dataclass
class Episode:
    """What one finished environment looked like: for success rates and transcripts."""

    problem: int
    seed: int
    success: bool
    turns: int
    steps: list[dict] = field(default_factory=list)  # turn, agent, prompt, answer, rewards, info


def tree_rollout(
    envs: list[MultiAgentEnv], seeds: list[int], generate: GenerateFn, *, samples_per_state: int, alpha: float,
    branch: bool = True, step: StepFn = step_in_process,
) -> tuple[list[AgentGroup], list[Episode]]:
    """Play every environment to the end; return the answer groups and the episodes.

    ``branch=True`` is the tree: ``samples_per_state`` answers per (turn, agent) of each
    environment, the best carried forward. ``branch=False`` plays each environment with one answer
    per state (evaluation, or the independent copies of no-tree mode). ``step`` steps a turn's answers,
    all environments' together (:func:`~palaestra.envs.workers.step_in_process`, or an
    :class:`~palaestra.envs.workers.EnvWorkerPool`).
    """
    k = samples_per_state if branch else 1
    for env, seed in zip(envs, seeds):
        env.reset(seed)
    episodes = [Episode(problem=i, seed=s, success=False, turns=0) for i, s in enumerate(seeds)]
    groups: list[AgentGroup] = []
    turn_order, max_turns = envs[0].turn_order, envs[0].max_turns
    for turn in range(max_turns):
        for agent in turn_order:
            live = [i for i, env in enumerate(envs) if not env.done]
            if not live:
                break
            prompts = [envs[i].observation(agent) for i in live]
            rollout = generate(agent, prompts, k)
            items = [(envs[i].copy() if k > 1 else envs[i], agent, rollout.texts[position * k + j])
                     for position, i in enumerate(live) for j in range(k)]
            stepped = step(items)  # every live environment's K answers at once
            for position, i in enumerate(live):
                rows = list(range(position * k, (position + 1) * k))
                branches = [stepped[row][0] for row in rows]
                results = [stepped[row][1] for row in rows]
                rewards = [agent_reward(r.local_reward, r.team_reward, alpha) for r in results]
                # greedy: the best branch goes on (one whose environment failed only when all did)
                best = max(range(k), key=lambda j: (not isinstance(branches[j], LostEpisode), rewards[j]))
                envs[i] = branches[best]
                answers = [(rollout, row) for row in rows]
                groups.append(AgentGroup(i, turn, agent, answers, results, rewards, prompts[position]))
                episodes[i].steps.append({
                    "turn": turn + 1, "agent": agent, "prompt": prompts[position][-1]["content"],
                    "answer": rollout.texts[rows[best]], "local_reward": results[best].local_reward,
                    "team_reward": results[best].team_reward, "info": _jsonable(results[best].info),
                })
        if all(env.done for env in envs):
            break
    for i, env in enumerate(envs):
        episodes[i].success = bool(env.success)
        episodes[i].turns = 1 + max((s["turn"] - 1 for s in episodes[i].steps), default=-1)
    return groups, episodes


def independent_groups(groups: list[AgentGroup], copies: int) -> list[AgentGroup]:
    """No-tree mode: merge the single answers of ``copies`` independent episodes per problem.

    Environments ``p * copies .. p * copies + copies - 1`` are copies of problem ``p``; the answers
    the same agent gave at the same turn of those copies become one group (copies that had already
    finished contribute nothing, so late groups can be smaller).
    """
    merged: dict[tuple[int, int, str], AgentGroup] = {}
    for group in groups:
        key = (group.problem // copies, group.turn, group.agent)
        if key not in merged:
            merged[key] = AgentGroup(key[0], group.turn, group.agent, [], [], [], group.prompt)
        target = merged[key]
        target.answers.extend(group.answers)
        target.results.extend(group.results)
        target.rewards.extend(group.rewards)
    return list(merged.values())


def stack_rows(pairs: list[tuple[Rollout, int]], pad_id: int) -> Rollout:
    """One left/right-padded Rollout from rows of several rollouts (for a policy's training batch)."""
    prompt_width = max(r.prompt_ids.shape[1] for r, _ in pairs)
    completion_width = max(r.completion_ids.shape[1] for r, _ in pairs)
    n = len(pairs)
    prompt_ids = torch.full((n, prompt_width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, prompt_width), dtype=torch.long)
    completion_ids = torch.full((n, completion_width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((n, completion_width), dtype=torch.long)
    truncated = torch.zeros(n, dtype=torch.bool)
    sampled = torch.zeros((n, completion_width)) if all(r.sampler_logprobs is not None for r, _ in pairs) else None
    trained = torch.zeros((n, completion_width), dtype=torch.long) if any(r.trained_mask is not None for r, _ in pairs) else None
    texts = []
    for out, (rollout, row) in enumerate(pairs):
        p, c = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
        prompt_ids[out, prompt_width - p :] = rollout.prompt_ids[row]
        prompt_mask[out, prompt_width - p :] = rollout.prompt_mask[row]
        completion_ids[out, :c] = rollout.completion_ids[row]
        completion_mask[out, :c] = rollout.completion_mask[row]
        truncated[out] = rollout.truncated[row]
        if sampled is not None:  # the rollout workers' log-probs (the mismatch correction's)
            sampled[out, :c] = rollout.sampler_logprobs[row]
        if trained is not None:  # tool-calling answers: the policy's own tokens, not the tools' results
            trained[out, :c] = rollout.sampled_mask[row]
        texts.append(rollout.texts[row])
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, texts, sampled, trained)


def _jsonable(info: dict) -> dict:
    """Step info reduced to what JSON can hold (for transcripts)."""
    out = {}
    for key, value in info.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        else:
            out[key] = repr(value)[:200]
    return out
