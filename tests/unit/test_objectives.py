"""The objectives beside GRPO's clipped surrogate (CISPO, SAPO, GSPO's sequence-level ratio) and the advantage
estimators (RLOO, REINFORCE++): hand-worked numbers, then TRL's own loss code on the same random tensors."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from palaestra.algorithms.at_grpo import tree_advantages
from palaestra.algorithms.grpo import (
    LOSS_TYPES,
    accumulated_loss,
    entropy_bonus,
    group_advantages,
    informative_groups,
    keep_first,
    overlong_penalty,
    policy_loss,
)

# ---------------------------------------------------------------- advantage estimators


def test_rloo_subtracts_the_mean_of_the_other_answers():
    # group [1, 0, 0]: r_1 - mean(0, 0) = 1, r_2 - mean(1, 0) = -0.5, r_3 likewise; G/(G-1) = 3/2 times GRPO's
    # [2/3, -1/3, -1/3]
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0]), 3, scale="none", estimator="rloo")
    torch.testing.assert_close(advantages, torch.tensor([1.0, -0.5, -0.5]))
    # with group scaling: divided by the group's std, sqrt(1/3) = 0.57735
    scaled = group_advantages(torch.tensor([1.0, 0.0, 0.0]), 3, scale="group", eps=0.0, estimator="rloo")
    torch.testing.assert_close(scaled, torch.tensor([1.0, -0.5, -0.5]) / math.sqrt(1 / 3))


def test_reinforce_pp_normalises_group_baselined_rewards_over_the_batch():
    # groups [1, 0] and [1, 1]: less their means [0.5, -0.5, 0, 0]; batch mean 0, std sqrt(0.5 / 3) = 0.408248
    advantages = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, eps=0.0, estimator="reinforce_pp")
    torch.testing.assert_close(advantages, torch.tensor([0.5, -0.5, 0.0, 0.0]) / math.sqrt(0.5 / 3))
    # the scale setting is REINFORCE++'s own: "none" gives the same
    same = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, scale="none", eps=0.0, estimator="reinforce_pp")
    torch.testing.assert_close(same, advantages)


def test_tree_advantages_of_groups_of_different_sizes():
    groups = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2.0]), torch.tensor([1.0, 1.0])]
    rloo = tree_advantages(groups, "rloo", "none")
    torch.testing.assert_close(torch.cat(rloo), torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0, 0.0]))
    # reinforce_pp over all six answers: centred [2/3, -1/3, -1/3, 0, 0, 0], mean 0, std sqrt((4/9 + 2/9) / 5)
    spread = math.sqrt((4 / 9 + 1 / 9 + 1 / 9) / 5)
    reinforce = torch.cat(tree_advantages(groups, "reinforce_pp", eps=0.0))
    torch.testing.assert_close(reinforce, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]) / spread)
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.ones(2), 2, estimator="ppo")


# ---------------------------------------------------------------- dynamic sampling


def _scored(rewards: list[float], prompt_width: int, completion_width: int, first: int):
    """A scored batch of groups of 2 with recognisable tokens: completion row i holds first + i."""
    from palaestra.recipes.grpo import ScoredGroups
    from palaestra.rollout import Rollout

    rows = len(rewards)
    completions = torch.arange(first, first + rows).unsqueeze(1).repeat(1, completion_width)
    rollout = Rollout(torch.ones(rows, prompt_width, dtype=torch.long), torch.ones(rows, prompt_width, dtype=torch.long),
                      completions, torch.ones(rows, completion_width, dtype=torch.long), torch.zeros(rows, dtype=torch.bool),
                      [str(first + i) for i in range(rows)])
    return ScoredGroups([f"prompt {first + 2 * g}" for g in range(rows // 2)], rollout, torch.tensor(rewards),
                        {"r": list(rewards)})


def test_dynamic_sampling_keeps_the_first_groups_that_differ_until_the_step_is_full():
    from palaestra.recipes.grpo import ScoredGroups

    # round 1: groups [1, 1] (settled), [0, 1], [1, 1]; round 2: [0, 0], [1, 0], [0, 1]; a step of 2 groups
    first, second = _scored([1, 1, 0, 1, 1, 1], 3, 2, first=0), _scored([0, 0, 1, 0, 0, 1], 5, 4, first=10)
    keep_one = keep_first(informative_groups(first.rewards, 2), 2)
    assert keep_one.tolist() == [False, True, False]
    keep_two = keep_first(informative_groups(second.rewards, 2), 2 - int(keep_one.sum()))
    assert keep_two.tolist() == [False, True, False]  # the step is full after one more: the third group waits
    batch = ScoredGroups.concat([first.groups(keep_one, 2), second.groups(keep_two, 2)])
    assert batch.examples == ["prompt 2", "prompt 12"] and batch.rollout.texts == ["2", "3", "12", "13"]
    assert batch.rewards.tolist() == [0.0, 1.0, 1.0, 0.0] == batch.components["r"]
    assert group_advantages(batch.rewards, 2).abs().min() > 0  # no group without an advantage enters the loss
    # prompts left-padded and completions right-padded to the widest part
    assert batch.rollout.prompt_mask.tolist()[0] == [0, 0, 1, 1, 1] and batch.rollout.prompt_mask.tolist()[2] == [1] * 5
    assert batch.rollout.completion_ids.tolist()[0] == [2, 2, 0, 0] and batch.rollout.completion_mask.tolist()[0] == [1, 1, 0, 0]
    assert batch.rollout.completion_ids.tolist()[3] == [13] * 4
    # a round that keeps every group is the round itself
    assert first.groups(torch.ones(3, dtype=torch.bool), 2) is first


# ---------------------------------------------------------------- overlong shaping


def test_overlong_penalty_by_hand_and_as_trls_soft_overlong_punishment():
    from trl.rewards import get_soft_overlong_punishment

    # budget 24, band 8: 0 up to 16 tokens, then (16 - L) / 8: L = 20 -> -0.5, L = 24 -> -1
    assert overlong_penalty(torch.tensor([10, 16, 20, 24]), 24, 8).tolist() == [0.0, 0.0, -0.5, -1.0]
    for budget, band in [(100, 20), (24, 8), (10, 0), (16, 16), (7, 3)]:
        lengths = list(range(budget + 3))
        theirs = get_soft_overlong_punishment(max_completion_len=budget, soft_punish_cache=band)([[1] * n for n in lengths])
        torch.testing.assert_close(overlong_penalty(torch.tensor(lengths), budget, band), torch.tensor(theirs, dtype=torch.float32))


# ---------------------------------------------------------------- losses, by hand


def test_cispo_weights_a_reinforce_term_by_the_capped_ratio():
    # one token, A = 1, logp = -1, ratio = 3 capped at 2: L = -2 * 1 * (-1) = 2, dL/dlogp = -2 (the weight is a constant)
    logp = torch.tensor([[-1.0]], requires_grad=True)
    old = torch.tensor([[-1.0 - math.log(3.0)]])
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), loss_type="cispo", epsilon_high=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(2.0)
    assert logp.grad.item() == pytest.approx(-2.0)
    assert stats["clip_ratio/high"] == 1.0
    # dapo's normalisation: two tokens of a four-token generation batch, ratio 1: (1 + 2) / 4
    loss, _ = policy_loss(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -2.0]]), torch.tensor([1.0]),
                          torch.ones(1, 2), loss_type="cispo", epsilon_high=5.0, num_items_in_batch=4)
    assert loss.item() == pytest.approx(0.75)
    assert accumulated_loss(loss, loss_type="cispo", rows=1, total_rows=4) is loss  # summed as it is


def test_sapo_gate_is_the_surrogate_at_ratio_one_and_soft_away_from_it():
    # ratio 1: sigmoid(0) * 4 / tau * A = 2 A / tau; A = 1, tau_pos = 1: L = -2, dL/dlogp = -sigmoid'(0) * 4 = -1
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.tensor([[-1.0]]), torch.tensor([1.0]), torch.ones(1, 1), loss_type="sapo")
    loss.backward()
    assert loss.item() == pytest.approx(-2.0)
    assert logp.grad.item() == pytest.approx(-1.0)
    assert stats["clip_ratio/region"] == 0.0
    # A = -1 takes tau_neg = 1.05: L = 2 / 1.05
    loss, _ = policy_loss(torch.tensor([[-1.0]]), torch.tensor([[-1.0]]), torch.tensor([-1.0]), torch.ones(1, 1),
                          loss_type="sapo")
    assert loss.item() == pytest.approx(2 / 1.05)
    # ratio 2, A = 1: L = -sigmoid(1) * 4 = -2.924234; its gradient -sigmoid'(1) * 4 * 2 = -1.572895 (the hard clip: 0)
    logp = torch.tensor([[math.log(2.0)]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.tensor([[0.0]]), torch.tensor([1.0]), torch.ones(1, 1), loss_type="sapo")
    loss.backward()
    sigmoid = 1 / (1 + math.exp(-1))
    assert loss.item() == pytest.approx(-4 * sigmoid)
    assert logp.grad.item() == pytest.approx(-4 * sigmoid * (1 - sigmoid) * 2)


def test_sequence_level_ratio_is_the_geometric_mean_of_the_tokens():
    # log-ratios [ln 2, 0]: per token the ratios are 2 and 1, clipped at 1.2: L = mean(-1.2, -1) = -1.1;
    # per sequence exp(ln 2 / 2) = 1.41421 for both, clipped at 1.2: L = -1.2
    logp, old = torch.tensor([[math.log(2.0), 0.0]]), torch.zeros(1, 2)
    token, _ = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2))
    sequence, stats = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), importance_sampling_level="sequence")
    assert token.item() == pytest.approx(-1.1)
    assert sequence.item() == pytest.approx(-1.2)
    assert stats["clip_ratio/high"] == 1.0
    # the padding does not enter the mean: a third, masked token changes nothing
    padded, _ = policy_loss(torch.tensor([[math.log(2.0), 0.0, 5.0]]), torch.zeros(1, 3), torch.tensor([1.0]),
                            torch.tensor([[1.0, 1.0, 0.0]]), importance_sampling_level="sequence")
    assert padded.item() == pytest.approx(-1.2)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), importance_sampling_level="batch")


# ---------------------------------------------------------------- against TRL's own code


def _trl_loss(loss_type: str, level: str, *, logp, old, ref, advantages, mask, beta, epsilon, epsilon_high,
              max_completion_length, num_items, sapo_pos, sapo_neg, entropies=None, entropy_coef=0.0) -> torch.Tensor:
    """TRL's GRPOTrainer._compute_loss, its own code, on these tensors: a trainer object with the attributes the
    method reads (one process, no gradient accumulation), whose log-prob pass returns ``logp`` (and ``entropies``)."""
    from trl import GRPOTrainer

    trainer = object.__new__(GRPOTrainer)
    trainer.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, sapo_temperature_pos=sapo_pos,
                                   sapo_temperature_neg=sapo_neg, steps_per_generation=1)
    trainer.__dict__.update(
        loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon_low=epsilon, epsilon_high=epsilon_high,
        max_completion_length=max_completion_length, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=entropy_coef != 0.0, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        current_gradient_accumulation_steps=1, model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                    reduce=lambda x, reduction: x),
    )
    entropies = torch.zeros_like(logp) if entropies is None else entropies
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logp, entropies, None)
    batch, width = logp.shape
    inputs = {"prompt_ids": torch.zeros(batch, 1, dtype=torch.long), "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
              "completion_ids": torch.zeros(batch, width, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(num_items))}
    return trainer._compute_loss(None, inputs)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_equals_trls_on_random_tensors(loss_type, level):
    generator = torch.Generator().manual_seed(LOSS_TYPES.index(loss_type) * 2 + (level == "sequence"))
    for case in range(12):
        batch, width = int(torch.randint(1, 6, (1,), generator=generator)), int(torch.randint(1, 9, (1,), generator=generator))
        mask = (torch.rand(batch, width, generator=generator) < 0.75).long()
        mask[:, 0] = 1  # every completion has a token
        logp = (-torch.rand(batch, width, generator=generator) * 3).double()
        old = (logp + torch.randn(batch, width, generator=generator) * 0.3).double()
        ref = (logp + torch.randn(batch, width, generator=generator) * 0.3).double()
        advantages = torch.randn(batch, generator=generator).double()
        settings = dict(beta=0.04 if case % 2 else 0.0, epsilon=0.2, epsilon_high=5.0 if loss_type == "cispo" else 0.28,
                        max_completion_length=width + 2, num_items=int(mask.sum()) + case, sapo_pos=1.0, sapo_neg=1.05)
        ours_logp = logp.clone().requires_grad_(True)
        ours, _ = policy_loss(
            ours_logp, old, advantages, mask, loss_type=loss_type, epsilon=settings["epsilon"],
            epsilon_high=settings["epsilon_high"], beta=settings["beta"], ref_logp=ref,
            max_completion_length=settings["max_completion_length"], num_items_in_batch=settings["num_items"],
            importance_sampling_level=level, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
        )
        ours.backward()
        their_logp = logp.clone().requires_grad_(True)
        theirs = _trl_loss(loss_type, level, logp=their_logp, old=old, ref=ref, advantages=advantages, mask=mask, **settings)
        theirs.backward()
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-6), (case, ours.item(), theirs.item())
        torch.testing.assert_close(ours_logp.grad, their_logp.grad, atol=1e-6, rtol=0)  # the same gradient too


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_entropy_bonus_equals_trls_on_random_tensors(loss_type):
    """algo.entropy_coef: the loss less coef x the mean token entropy, the same for every loss type, as TRL's."""
    generator = torch.Generator().manual_seed(100 + LOSS_TYPES.index(loss_type))
    for case in range(8):
        batch, width = int(torch.randint(1, 6, (1,), generator=generator)), int(torch.randint(1, 9, (1,), generator=generator))
        mask = (torch.rand(batch, width, generator=generator) < 0.75).long()
        mask[:, 0] = 1
        logp = (-torch.rand(batch, width, generator=generator) * 3).double()
        old = (logp + torch.randn(batch, width, generator=generator) * 0.3).double()
        entropy = (torch.rand(batch, width, generator=generator) * 4).double()
        advantages = torch.randn(batch, generator=generator).double()
        settings = dict(beta=0.0, epsilon=0.2, epsilon_high=5.0 if loss_type == "cispo" else 0.28,
                        max_completion_length=width + 2, num_items=int(mask.sum()), sapo_pos=1.0, sapo_neg=1.05)
        ours_logp, ours_entropy = logp.clone().requires_grad_(True), entropy.clone().requires_grad_(True)
        surrogate, _ = policy_loss(ours_logp, old, advantages, mask, loss_type=loss_type, epsilon=0.2,
                                   epsilon_high=settings["epsilon_high"], max_completion_length=width + 2,
                                   num_items_in_batch=settings["num_items"])
        ours = surrogate - 0.03 * entropy_bonus(ours_entropy, mask)
        ours.backward()
        their_logp, their_entropy = logp.clone().requires_grad_(True), entropy.clone().requires_grad_(True)
        theirs = _trl_loss(loss_type, "token", logp=their_logp, old=old, ref=None, advantages=advantages, mask=mask,
                           entropies=their_entropy, entropy_coef=0.03, **settings)
        theirs.backward()
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-6), (case, ours.item(), theirs.item())
        torch.testing.assert_close(ours_logp.grad, their_logp.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours_entropy.grad, their_entropy.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_per_token_advantages_equal_to_the_completions_give_the_same_loss(loss_type, level):
    """On-policy distillation hands policy_loss one advantage per token; constant along a row, it is the [B] loss."""
    generator = torch.Generator().manual_seed(7)
    logp = -torch.rand(3, 4, generator=generator) * 2
    old = logp + torch.randn(3, 4, generator=generator) * 0.3
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    advantages = torch.tensor([0.7, -1.2, 0.4])
    options = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=4)
    per_row, row_stats = policy_loss(logp, old, advantages, mask, **options)
    per_token, token_stats = policy_loss(logp, old, advantages.unsqueeze(1).expand(3, 4), mask, **options)
    assert per_token.item() == pytest.approx(per_row.item(), abs=1e-7) and token_stats == row_stats
