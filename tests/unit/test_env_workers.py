"""Environments stepped in worker processes: the same steps as in the trainer's process, and an environment
that hangs, dies or raises costs its episode only."""

from __future__ import annotations

import time

import pytest
import torch

from palaestra.envs.workers import EnvWorkerPool, LostEpisode, step_in_process
from palaestra.rollout.hf import Rollout
from palaestra.rollout.tree import tree_rollout
from tests.recipes.envs import CountingEnv, FlakyEnv


def _env(cls, seed: int, turns: int = 2):
    env = cls(max_turns=turns)
    env.reset(seed)
    return env


def test_a_pool_steps_as_the_trainers_process_does_and_returns_the_new_state():
    items = [(_env(CountingEnv, seed), agent, answer) for seed, agent, answer in
             [(0, "proposer", "a1"), (1, "checker", "9x"), (2, "checker", "xx")]]
    here = step_in_process([(env.copy(), agent, answer) for env, agent, answer in items])
    with EnvWorkerPool(2) as pool:
        there = pool(items)
    assert [result for _, result in there] == [result for _, result in here]
    assert [(env.turn, env.solved) for env, _ in there] == [(0, False), (1, True), (1, False)]  # stepped in the worker
    assert pool.lost == 0


def test_a_hung_dead_or_raising_environment_loses_its_episode_and_the_pool_goes_on():
    items = [(_env(FlakyEnv, seed), "checker", "9x") for seed in (0, 1, 2, 3)]
    with EnvWorkerPool(2, step_timeout_s=2.0) as pool:
        started = time.monotonic()
        out = pool(items)
        assert time.monotonic() - started < 30  # the hung step is cut at its timeout
        assert out[0][1].team_reward == 1.0 and not isinstance(out[0][0], LostEpisode)
        reasons = [result.info.get("error", "") for _, result in out[1:]]
        assert "took more than env.step_timeout_s=2 s" in reasons[0]
        assert "process died (exit code 3)" in reasons[1]
        assert reasons[2] == "the environment raised ValueError: the board is broken"
        assert all(isinstance(env, LostEpisode) and env.done and not env.success for env, _ in out[1:])
        assert all(result.local_reward == 0.0 and result.done for _, result in out[1:])
        assert pool.lost == 3
        again = pool([(_env(FlakyEnv, 4), "checker", "7")])  # the replaced workers step on
        assert again[0][1].team_reward == 1.0


def test_in_process_an_environment_that_raises_loses_its_episode():
    (env, result), = step_in_process([(_env(FlakyEnv, 3), "checker", "1")])
    assert isinstance(env, LostEpisode) and result.info["lost"] and "the board is broken" in result.info["error"]


def _scripted(agent, prompts, samples):
    texts = ["a1", "9x", "77", "x9"][: samples] * len(prompts)
    ids = torch.ones(len(texts), 2, dtype=torch.long)
    return Rollout(ids, torch.ones_like(ids), ids.clone(), torch.ones_like(ids), torch.zeros(len(texts), dtype=torch.bool), texts)


def test_a_tree_rollout_in_workers_equals_one_in_the_trainers_process_and_never_carries_a_lost_branch():
    seeds = [0, 4, 8]
    here = tree_rollout([CountingEnv(2) for _ in seeds], seeds, _scripted, samples_per_state=3, alpha=1.0)
    with EnvWorkerPool(2) as pool:
        there = tree_rollout([CountingEnv(2) for _ in seeds], seeds, _scripted, samples_per_state=3, alpha=1.0, step=pool)
    assert [g.rewards for g in here[0]] == [g.rewards for g in there[0]]
    assert [(e.success, e.turns) for e in here[1]] == [(e.success, e.turns) for e in there[1]]
    # seed 3 raises on every checker step: its episode is lost, unsolved; seed 0 beside it plays on
    groups, episodes = tree_rollout([FlakyEnv(2), FlakyEnv(2)], [0, 3], _scripted, samples_per_state=3, alpha=1.0)
    assert episodes[0].success and not episodes[1].success
    assert all(r.info.get("lost") for g in groups if g.problem == 1 and g.agent == "checker" for r in g.results)


def test_ray_tasks_step_and_lose_episodes_as_the_pool_does():
    pytest.importorskip("ray")
    from palaestra.envs.workers import RayEnvWorkers

    items = [(_env(FlakyEnv, seed), "checker", "9x") for seed in (0, 1, 2, 3)]
    workers = RayEnvWorkers(2, step_timeout_s=10.0)
    try:
        workers([(_env(FlakyEnv, seed), "checker", "1") for seed in (4, 8)])  # warm: both Ray workers started
        out = workers(items)
        assert out[0][1].team_reward == 1.0 and out[0][0].solved  # stepped on a Ray worker, its new state back
        reasons = [result.info.get("error", "") for _, result in out[1:]]
        assert "took more than env.step_timeout_s=10 s" in reasons[0]
        assert reasons[1] == "the environment's process died"
        assert reasons[2] == "the environment raised ValueError: the board is broken"
        assert workers.lost == 3
        assert workers([(_env(FlakyEnv, 4), "checker", "7")])[0][1].team_reward == 1.0
    finally:
        import ray

        ray.shutdown()
