"""AT-GRPO building blocks: agent rewards, group filters, tree rollout and grouping."""

from __future__ import annotations

import torch

from palaestra.algorithms.at_grpo import agent_reward, select_samples
from palaestra.algorithms.grpo import group_advantages
from palaestra.rollout.hf import Rollout
from palaestra.rollout.tree import independent_groups, stack_rows, tree_rollout
from tests.recipes.envs import CountingEnv


def _scripted(answers_by_agent: dict[str, list[str]]):
    """A generate function that answers from a script: row r of a call gets script[r % len]."""
    calls = []

    def generate(agent, prompts, samples):
        calls.append((agent, len(prompts), samples))
        script = answers_by_agent[agent]
        texts = [script[i % len(script)] for i in range(len(prompts) * samples)]
        n = len(texts)
        ids = torch.ones(n, 3, dtype=torch.long)
        return Rollout(ids, torch.ones_like(ids), ids.clone(), torch.ones_like(ids), torch.zeros(n, dtype=torch.bool), texts)

    return generate, calls


def test_agent_reward_mixes_team_and_local():
    assert agent_reward(local=0.5, team=1.0, alpha=0.7) == 0.5 + 0.7 * 1.0
    assert agent_reward(local=-2.0, team=0.0, alpha=1.0) == -2.0


def test_group_filters_by_hand():
    groups = [torch.tensor([0.0, 0.0, 0.0, 0.0]),  # mean 0, std 0
              torch.tensor([1.0, 0.0, 1.0, 0.0]),  # mean 0.5, std 0.5
              torch.tensor([2.0, 2.0, 2.0, 3.0])]  # mean 2.25, std 0.433
    assert [m.all().item() for m in select_samples(groups, "none")] == [True, True, True]
    # dapo drops the zero-variance group only
    assert [m.any().item() for m in select_samples(groups, "dapo")] == [False, True, True]
    # mean, ratio 0.5: int(0.5 * 3) = 1 group dropped, the lowest mean (group 0)
    assert [m.any().item() for m in select_samples(groups, "mean", 0.5)] == [False, True, True]
    # std, ratio 0.7: int(2.1) = 2 groups dropped: std 0 (group 0) and 0.433 (group 2)
    assert [m.any().item() for m in select_samples(groups, "std", 0.7)] == [False, True, False]
    # uid, ratio 0.25: int(0.25 * 4) = 1 answer per group: the one furthest from the mean;
    # group 2: distances |2-2.25| = 0.25 x3 and |3-2.25| = 0.75 -> the 3.0 goes
    assert select_samples(groups, "uid", 0.25)[2].tolist() == [True, True, True, False]


def test_tree_rollout_groups_branches_and_carries_the_best_forward():
    # proposer branches: "a1" (share 0.5), "bb" (0), "77" (1.0); checker: "9x" succeeds, "x9" does not
    generate, calls = _scripted({"proposer": ["a1", "bb", "77"], "checker": ["x9", "9x", "xx"]})
    envs = [CountingEnv(max_turns=2), CountingEnv(max_turns=2)]
    groups, episodes = tree_rollout(envs, [3, 4], generate, samples_per_state=3, alpha=1.0)
    # one call per (turn, agent), batched across both environments, K=3 samples each
    assert calls == [("proposer", 2, 3), ("checker", 2, 3)]
    assert [(g.problem, g.turn, g.agent) for g in groups] == [
        (0, 0, "proposer"), (1, 0, "proposer"), (0, 0, "checker"), (1, 0, "checker")]
    # proposer rewards = local share (team 0): [0.5, 0.0, 1.0]
    assert groups[0].rewards == [0.5, 0.0, 1.0]
    # checker: "x9" -> 0.5 local + 0 team; "9x" -> 0.5 + 1.0 team = 1.5 (best); "xx" -> 0
    assert groups[2].rewards == [0.5, 1.5, 0.0]
    # the best checker branch succeeded in both environments, so the episodes end after one turn
    assert all(e.success and e.turns == 1 for e in episodes)
    assert episodes[0].steps[0]["answer"] == "77" and episodes[0].steps[1]["answer"] == "9x"
    # advantages inside a group: r - mean over std; the group [0.5, 1.5, 0.0] has mean 2/3
    adv = group_advantages(torch.tensor(groups[2].rewards), 3)
    assert adv.argmax().item() == 1 and abs(float(adv.sum())) < 1e-6


def test_no_tree_mode_groups_independent_copies():
    generate, _ = _scripted({"proposer": ["1", "a"], "checker": ["x", "y"]})
    copies = [5, 5, 6, 6]  # two copies each of two problems
    groups, episodes = tree_rollout([CountingEnv(max_turns=1) for _ in copies], copies, generate,
                                    samples_per_state=1, alpha=1.0, branch=False)
    merged = independent_groups(groups, copies=2)
    assert [(g.problem, g.turn, g.agent, len(g.rewards)) for g in merged] == [
        (0, 0, "proposer", 2), (1, 0, "proposer", 2), (0, 0, "checker", 2), (1, 0, "checker", 2)]
    assert merged[0].rewards == [1.0, 0.0]  # "1" is all digits, "a" none


def test_stack_rows_pads_rows_from_different_rollouts():
    a = Rollout(torch.tensor([[5, 6]]), torch.tensor([[1, 1]]), torch.tensor([[7]]), torch.tensor([[1]]),
                torch.tensor([False]), ["x"])
    b = Rollout(torch.tensor([[4, 5, 6]]), torch.tensor([[1, 1, 1]]), torch.tensor([[8, 9]]), torch.tensor([[1, 1]]),
                torch.tensor([True]), ["y"])
    batch = stack_rows([(a, 0), (b, 0)], pad_id=0)
    assert batch.prompt_ids.tolist() == [[0, 5, 6], [4, 5, 6]] and batch.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert batch.completion_ids.tolist() == [[7, 0], [8, 9]] and batch.completion_mask.tolist() == [[1, 0], [1, 1]]
    assert batch.truncated.tolist() == [False, True] and batch.texts == ["x", "y"]


def test_per_role_policy_updates_only_the_acting_roles_adapter():
    from palaestra.recipes.at_grpo_config import ATGRPOConfig
    from palaestra.models.policies import build_policies
    from palaestra.recipes.at_grpo import _train_policy
    from palaestra.rollout import SamplingParams

    policies, role_policy = build_policies(
        "per_role", ("proposer", "checker"), model_name="tiny", model_path=None, dtype="float32", device="cpu",
        lora=dict(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), role_models={}, max_prompt_length=64,
        precision="fp32",
    )
    assert policies["proposer"].model is policies["checker"].model  # one base in memory
    for policy in policies.values():
        policy.activate()
        policy.optimizer = torch.optim.SGD(list(policy.parameters().values()), lr=1.0)
        policy.scheduler = torch.optim.lr_scheduler.LambdaLR(policy.optimizer, lambda _: 1.0)
    before = {name: {k: v.detach().clone() for k, v in p.parameters().items()} for name, p in policies.items()}

    def generate(agent, prompts, n):
        policy = policies[role_policy[agent]]
        policy.activate()
        return policy.generator.generate(prompts, n, SamplingParams(max_new_tokens=6))

    groups, _ = tree_rollout([CountingEnv(1)], [1], generate, samples_per_state=4, alpha=1.0)
    proposer_groups = [g for g in groups if g.agent == "proposer"]
    advantages = [torch.tensor([1.0, -1.0, 0.5, -0.5]) for _ in proposer_groups]
    keep = [torch.ones(4, dtype=torch.bool) for _ in proposer_groups]
    config = ATGRPOConfig()
    stats = _train_policy(policies["proposer"], proposer_groups, advantages, keep, role_policy, config)
    assert stats["proposer/samples"] == 4.0
    _train_policy(policies["checker"], proposer_groups, advantages, keep, role_policy, config)  # no checker answers

    moved = lambda name: any(not torch.equal(before[name][k], v) for k, v in policies[name].parameters().items())  # noqa: E731
    assert moved("proposer")
    assert not moved("checker")


def test_shared_prompt_training_only_for_whole_groups_with_one_prompt():
    from palaestra.recipes.at_grpo import _rows_sharing_prompt

    same = torch.tensor([[0, 5, 6]] * 4 + [[7, 8, 9]] * 4)
    batch = Rollout(same, (same > 0).long(), same, same, torch.zeros(8, dtype=torch.bool), [""] * 8)
    # two tree groups of K=4, micro-batches of 4 or 8: each group's prompt runs once
    assert _rows_sharing_prompt(batch, [4, 4], 8, 4, True) == 4
    assert _rows_sharing_prompt(batch, [4, 4], 2, 4, True) == 2
    assert _rows_sharing_prompt(batch, [4, 4], 8, 4, False) == 0  # packing off: the plain padded forward
    # a filter dropped answers of a group: blocks no longer line up
    assert _rows_sharing_prompt(batch, [3, 4], 8, 4, True) == 1
    # no-tree groups: the answers of a group were given to different prompts
    mixed = same.clone()
    mixed[1, 2] = 42
    diverged = Rollout(mixed, (mixed > 0).long(), mixed, mixed, torch.zeros(8, dtype=torch.bool), [""] * 8)
    assert _rows_sharing_prompt(diverged, [4, 4], 8, 4, True) == 1
