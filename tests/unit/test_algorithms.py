"""Unit tests for palaestra.algorithms.grpo, with the arithmetic worked by hand in the comments."""

import math
import re

import pytest
import torch

from palaestra.algorithms.grpo import (
    LOSS_TYPES,
    entropy_from_logits,
    group_advantages,
    k3_kl,
    masked_mean,
    policy_loss,
    selective_log_softmax,
)

LN2 = math.log(2.0)


# ---------------------------------------------------------------- masked_mean


def test_masked_mean_all_and_per_row():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # all:     (1 + 2) / 2 = 1.5
    assert masked_mean(values, mask).item() == pytest.approx(1.5)
    # per row: [(1 + 2) / 2, 0 / max(0, 1)] = [1.5, 0.0]  (all-zero row gives 0, not NaN)
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([1.5, 0.0]))
    # a bool mask means the same
    torch.testing.assert_close(masked_mean(values, mask.bool(), dim=1), torch.tensor([1.5, 0.0]))


def test_masked_mean_all_zero_mask_is_zero():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


# ---------------------------------------------------------------- group_advantages

# Two groups of G = 4: [1, 0, 0, 1] (mean 0.5) and [2, 2, 2, 2] (mean 2, std 0).
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
CENTRED = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])


def test_group_advantages_group_scale():
    # group 1: deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.577350
    #          A = +-0.5 / (0.577350 + 1e-4) = +-0.865875
    # group 2: all equal -> deviations 0 -> A = 0 / (0 + 1e-4) = 0
    expected = CENTRED / torch.tensor([math.sqrt(1 / 3) + 1e-4] * 4 + [1.0] * 4)
    advantages = group_advantages(REWARDS, group_size=4, scale="group")
    torch.testing.assert_close(advantages, expected)
    assert advantages[0].item() == pytest.approx(0.865875, abs=1e-6)


def test_group_advantages_batch_scale():
    # batch mean = 10 / 8 = 1.25; squared deviations:
    #   0.0625 + 1.5625 + 1.5625 + 0.0625 + 4 * 0.5625 = 5.5; var = 5.5 / 7 = 0.785714
    #   std = 0.886405; A = centred / (0.886405 + 1e-4)
    advantages = group_advantages(REWARDS, group_size=4, scale="batch")
    torch.testing.assert_close(advantages, CENTRED / (math.sqrt(5.5 / 7) + 1e-4))
    assert advantages[0].item() == pytest.approx(0.5 / 0.886505, abs=1e-5)


def test_group_advantages_no_scale():
    # A = r - group mean, nothing else
    torch.testing.assert_close(group_advantages(REWARDS, group_size=4, scale="none"), CENTRED)


def test_group_advantages_pairs():
    # G = 2, [3, 1]: mean 2 -> [1, -1]; std = sqrt((1 + 1) / 1) = 1.414214 -> +-1 / 1.414314
    advantages = group_advantages(torch.tensor([3.0, 1.0]), group_size=2)
    torch.testing.assert_close(advantages, torch.tensor([1.0, -1.0]) / (math.sqrt(2) + 1e-4))


def test_group_advantages_constant_groups_are_zero():
    advantages = group_advantages(torch.tensor([2.0, 2.0, 2.0, 2.0]), group_size=4)
    torch.testing.assert_close(advantages, torch.zeros(4))


def test_group_advantages_group_of_one_is_zero_not_nan():
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 5.0]), 1), torch.zeros(2))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), group_size=2, scale="rank")


# ---------------------------------------------------------------- k3 KL


def test_k3_kl_zero_when_equal():
    logp = torch.tensor([[-1.0, -2.5, -0.1]])
    torch.testing.assert_close(k3_kl(logp, logp), torch.zeros(1, 3))


def test_k3_kl_worked_values():
    # d = ref - logp
    # d = +ln2: e^d - d - 1 = 2   - 0.693147 - 1 = 0.306853
    # d = -ln2: e^d - d - 1 = 0.5 + 0.693147 - 1 = 0.193147
    kl = k3_kl(torch.zeros(1, 2), torch.tensor([[LN2, -LN2]]))
    torch.testing.assert_close(kl, torch.tensor([[0.306853, 0.193147]]))


# ---------------------------------------------------------------- policy_loss

# A tiny 2 x 3 batch. old_logp = 0, so ratio = exp(logp) is set directly.
#   sequence 0, A = +1, ratios [1.0, 1.5, 0.5], mask [1, 1, 1]
#   sequence 1, A = -1, ratios [0.5, 1.1, 2.0], mask [1, 1, 0]
# L_tok = -min(r * A, clip(r, 0.8, 1.2) * A):
#   seq 0: r=1.0 -> -min(1.0, 1.0)   = -1.0
#          r=1.5 -> -min(1.5, 1.2)   = -1.2   (clipped high: r > 1.2 and A > 0)
#          r=0.5 -> -min(0.5, 0.8)   = -0.5   (r < 0.8 but A > 0: the min keeps r, no clip)
#   seq 1: r=0.5 -> -min(-0.5, -0.8) =  0.8   (clipped low: r < 0.8 and A < 0)
#          r=1.1 -> -min(-1.1, -1.1) =  1.1
#          r=2.0 -> masked out
# masked sum = (-1.0 - 1.2 - 0.5) + (0.8 + 1.1) = -2.7 + 1.9 = -0.8 over 5 tokens
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.1, 2.0]])
LOGP = RATIOS.log()
OLD = torch.zeros(2, 3)
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _loss(**kwargs):
    return policy_loss(LOGP, OLD, ADV, MASK, **kwargs)


def test_policy_loss_grpo():
    # per-sequence means: -2.7 / 3 = -0.9 and 1.9 / 2 = 0.95; mean = (-0.9 + 0.95) / 2 = 0.025
    loss, _ = _loss(loss_type="grpo")
    assert loss.item() == pytest.approx(0.025, abs=1e-6)


def test_policy_loss_bnpo():
    # -0.8 / 5 tokens = -0.16
    loss, _ = _loss(loss_type="bnpo")
    assert loss.item() == pytest.approx(-0.16, abs=1e-6)


def test_policy_loss_dr_grpo():
    # -0.8 / (B * max_completion_length) = -0.8 / (2 * 4) = -0.1
    loss, _ = _loss(loss_type="dr_grpo", max_completion_length=4)
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)


def test_policy_loss_dapo():
    # -0.8 / 10 tokens in the whole generation batch = -0.08
    loss, _ = _loss(loss_type="dapo", num_items_in_batch=10)
    assert loss.item() == pytest.approx(-0.08, abs=1e-6)
    # without num_items_in_batch: this batch's 5 tokens, same as bnpo
    loss, _ = _loss(loss_type="dapo")
    assert loss.item() == pytest.approx(-0.16, abs=1e-6)


def test_policy_loss_clip_stats():
    # low: seq 1 token 0 -> 1 / 5 = 0.2; high: seq 0 token 1 -> 1 / 5 = 0.2; region: 2 / 5 = 0.4
    # (seq 1 token 2 has r = 2.0 > 1.2 but A < 0, and it is masked anyway)
    _, stats = _loss()
    assert stats["clip_ratio/low"] == pytest.approx(0.2)
    assert stats["clip_ratio/high"] == pytest.approx(0.2)
    assert stats["clip_ratio/region"] == pytest.approx(0.4)
    assert stats["kl"] == 0.0
    assert all(isinstance(v, float) for v in stats.values())


def test_policy_loss_asymmetric_clip_higher():
    # epsilon_high = 0.28 (DAPO): seq 0 token 1 now clips at 1.28 -> L = -1.28
    # masked sum = -0.8 - 0.08 = -0.88; bnpo = -0.88 / 5 = -0.176; still clipped high
    loss, stats = _loss(loss_type="bnpo", epsilon_high=0.28)
    assert loss.item() == pytest.approx(-0.176, abs=1e-6)
    assert stats["clip_ratio/high"] == pytest.approx(0.2)
    # epsilon_high = 0.6: 1.5 < 1.6 is not clipped -> L = -1.5, sum = -1.1, bnpo = -0.22
    loss, stats = _loss(loss_type="bnpo", epsilon_high=0.6)
    assert loss.item() == pytest.approx(-0.22, abs=1e-6)
    assert stats["clip_ratio/high"] == 0.0
    assert stats["clip_ratio/low"] == pytest.approx(0.2)  # the low side still uses epsilon


def test_policy_loss_beta_adds_k3():
    # A = 0 so the policy term is 0; ref - logp = [+ln2, -ln2] -> k3 = [0.306853, 0.193147]
    # grpo loss = 0.1 * (0.306853 + 0.193147) / 2 = 0.1 * 0.25 = 0.025; kl stat = 0.25
    logp = torch.zeros(1, 2)
    ref = torch.tensor([[LN2, -LN2]])
    loss, stats = policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), beta=0.1, ref_logp=ref)
    assert loss.item() == pytest.approx(0.025, abs=1e-6)
    assert stats["kl"] == pytest.approx(0.25, abs=1e-6)


def test_policy_loss_gradient_only_through_logp():
    # ratio = 1, A = 2, grpo over 2 tokens: L = -(r * 2) averaged over 2 tokens
    # dL/dlogp_t = -2 * r / 2 = -1 for each token (dr/dlogp = r = 1)
    logp = torch.zeros(1, 2, requires_grad=True)
    old = torch.zeros(1, 2, requires_grad=True)
    ref = torch.zeros(1, 2, requires_grad=True)
    adv = torch.tensor([2.0], requires_grad=True)
    loss, _ = policy_loss(logp, old, adv, torch.ones(1, 2), beta=0.1, ref_logp=ref)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -1.0]]))
    assert old.grad is None and ref.grad is None and adv.grad is None


def test_policy_loss_masked_tokens_get_no_gradient():
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, OLD, ADV, MASK, loss_type="bnpo")
    loss.backward()
    assert logp.grad[1, 2].item() == 0.0
    # seq 0 token 1 is clipped (flat region of the min) -> no gradient either
    assert logp.grad[0, 1].item() == 0.0


def test_policy_loss_errors():
    with pytest.raises(ValueError, match=re.escape(str(LOSS_TYPES))):
        _loss(loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logp"):
        _loss(beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        _loss(loss_type="dr_grpo")


# ---------------------------------------------------------------- logits helpers


def test_selective_log_softmax_matches_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    index = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits, index)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # gradients agree too
    weights = torch.randn(3, 5)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), logits)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), logits)
    torch.testing.assert_close(grad_got, grad_expected, atol=1e-5, rtol=0)


def test_selective_log_softmax_half_precision():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    index = torch.randint(0, 7, (2, 4))
    expected = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits.bfloat16(), index)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=5e-2, rtol=0)


def test_entropy_matches_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 9)
    # H = -sum p log p, computed in one go; chunk_size=3 splits the 10 rows 3 + 3 + 3 + 1
    expected = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=3), expected)


def test_entropy_uniform_is_log_vocab():
    # uniform over V = 8: H = -8 * (1/8) * ln(1/8) = ln 8 = 2.079442
    expected = torch.full((1, 2), math.log(8))
    torch.testing.assert_close(entropy_from_logits(torch.zeros(1, 2, 8)), expected)
