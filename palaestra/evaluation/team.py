"""Team evaluation: play test problems of a multi-agent environment with the team's policies.

Used by the AT-GRPO recipe (before, during and after training) and by ``palaestra eval algo=at_grpo``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from palaestra.distributed import Distributed
from palaestra.envs import test_seeds
from palaestra.rollout import SamplingParams
from palaestra.envs.workers import StepFn, step_in_process
from palaestra.rollout.tree import AgentGroup, Episode, tree_rollout

__all__ = ["evaluate_team", "everyones", "rollout_metrics", "team_sampling"]


def rollout_metrics(groups: list[AgentGroup], episodes: list[Episode]) -> dict[str, float]:
    """Success rate, episode length, and reward per agent and per turn of a batch of episodes; ``lost_steps``:
    the steps whose environment crashed, raised or hung (each lost its episode)."""
    metrics = {
        "success_rate": float(np.mean([e.success for e in episodes])),
        "episode_length": float(np.mean([e.turns for e in episodes])),
        "reward/mean": float(np.mean([r for g in groups for r in g.rewards])) if groups else 0.0,
        "lost_steps": float(sum(bool(r.info.get("lost")) for g in groups for r in g.results)),
    }
    for key in sorted({g.agent for g in groups}):
        rewards = [r for g in groups if g.agent == key for r in g.rewards]
        metrics[f"reward/{key}"] = float(np.mean(rewards))
    for turn in sorted({g.turn for g in groups}):
        rewards = [r for g in groups if g.turn == turn for r in g.rewards]
        metrics[f"reward/turn{turn + 1}"] = float(np.mean(rewards))
    return metrics


def everyones(groups: list[AgentGroup], episodes: list[Episode], dist: Distributed) -> tuple[list[AgentGroup], list[Episode]]:
    """Every process's groups (their answers left out: rewards and results only) and episodes, in rank order;
    with one process, ``groups`` and ``episodes`` themselves."""
    if not dist.enabled:
        return groups, episodes
    light = [replace(group, answers=[], prompt=[]) for group in groups]
    return dist.gather_objects(light), dist.gather_objects(episodes)


def team_sampling(ev, max_completion_length: int) -> tuple[SamplingParams, int]:
    """(sampling, plays per problem) of the ``eval`` section: greedy once, or ``eval.num_samples`` samples."""
    sampling = SamplingParams(ev.max_new_tokens or max_completion_length, ev.temperature, ev.top_p, ev.top_k, greedy=ev.greedy)
    return sampling, 1 if ev.greedy else ev.num_samples


def evaluate_team(make_env, generate, count: int, *, sampling: SamplingParams, plays: int = 1, alpha: float = 1.0,
                  seed: int = 0, base_seed: int = 0, dist: Distributed | None = None,
                  step: StepFn = step_in_process) -> tuple[dict, list[Episode]]:
    """Play ``count`` test problems (seeds from ``base_seed``) ``plays`` times each without branching:
    success rate, episode length, per-agent and per-turn rewards (means of the acting agent's local
    and the team reward, agent reward = ``alpha`` * team + local). ``seed`` seeds the sampling
    (the caller's random state is left as it was). With several processes (``dist``) each plays a
    block of the problems and the figures are those of every process's episodes, on every process. ``step``
    steps the environments (:mod:`palaestra.envs.workers`).
    """
    dist = dist or Distributed()
    seeds = dist.split([s for s in test_seeds(count, base=base_seed) for _ in range(plays)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1000 * dist.rank)
        groups, episodes = tree_rollout([make_env() for _ in seeds], seeds,
                                        lambda agent, prompts, n: generate(agent, prompts, n, sampling),
                                        samples_per_state=1, alpha=alpha, branch=False, step=step)
    groups, episodes = everyones(groups, episodes, dist)
    figures = rollout_metrics(groups, episodes)
    for agent in sorted({g.agent for g in groups}):
        results = [r for g in groups if g.agent == agent for r in g.results]
        figures[f"local_reward/{agent}"] = float(np.mean([r.local_reward for r in results]))
        figures[f"team_reward/{agent}"] = float(np.mean([r.team_reward for r in results]))
    return figures, episodes
