"""Unit tests for palaestra.algorithms.preference and .ppo, with the arithmetic worked by hand."""

import math

import pytest
import torch

from palaestra.algorithms.ppo import gae, kl_penalty_rewards, ppo_policy_loss, value_loss, whiten
from palaestra.algorithms.preference import bradley_terry_loss, dpo_loss, sequence_logprob


def softplus_neg(x: float) -> float:
    """-log sigma(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


# ---------------------------------------------------------------- sequence_logprob


def test_sequence_logprob_sums_masked_tokens():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: -1 - 2 - 3 = -6;  row 1: -0.5 - 0.5 = -1 (the -9 is padding)
    torch.testing.assert_close(sequence_logprob(logps, mask), torch.tensor([-6.0, -1.0]))


# ---------------------------------------------------------------- bradley_terry_loss


def test_bradley_terry_two_pairs():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # r_c - r_r = [1, -1]
    # -log sigma(1) = log(1 + e^-1) = 0.313262;  -log sigma(-1) = log(1 + e) = 1.313262
    # mean = 0.813262; one of two pairs ranked right; mean margin (1 - 1) / 2 = 0
    loss, stats = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(0.813262, abs=1e-6)
    assert stats == {"accuracy": 0.5, "margin_mean": 0.0}


def test_bradley_terry_with_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # r_c - r_r - m = [1 - 0.5, -1 - 0.5] = [0.5, -1.5]
    # log(1 + e^-0.5) = 0.474077;  log(1 + e^1.5) = 1.701413;  mean = 1.087745
    loss, stats = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5, 0.5]))
    assert loss.item() == pytest.approx(1.087745, abs=1e-6)
    assert stats["accuracy"] == 0.5  # accuracy ignores the margin


def test_bradley_terry_gradient_separates_scores():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected)[0].backward()
    # dL/dr_c = -(1 - sigma(0)) = -0.5;  dL/dr_r = +0.5
    assert chosen.grad.item() == pytest.approx(-0.5)
    assert rejected.grad.item() == pytest.approx(0.5)


# ---------------------------------------------------------------- dpo_loss

# log pi(y_c) = [-1, -3], log pi(y_r) = [-2, -1], log pi_ref(y_c) = log pi_ref(y_r) = [-1.5, -2]
# chosen ratios   = [-1 + 1.5, -3 + 2] = [0.5, -1]
# rejected ratios = [-2 + 1.5, -1 + 2] = [-0.5, 1]
# h = [0.5 + 0.5, -1 - 1] = [1, -2];  with beta = 0.5: beta h = [0.5, -1]
PI_C, PI_R = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
REF_C, REF_R = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])


def test_dpo_sigmoid_worked():
    # L = mean(log(1 + e^-0.5), log(1 + e^1)) = mean(0.474077, 1.313262) = 0.893669
    loss, stats = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5)
    assert loss.item() == pytest.approx(0.893669, abs=1e-6)
    # implicit rewards beta * ratio: chosen [0.25, -0.5] (mean -0.125), rejected [-0.25, 0.5]
    # (mean 0.125); pair 1 ranked right, pair 2 not; margin mean(0.5, -1) = -0.25
    assert stats["rewards/chosen"] == pytest.approx(-0.125)
    assert stats["rewards/rejected"] == pytest.approx(0.125)
    assert stats["rewards/accuracy"] == 0.5
    assert stats["rewards/margin"] == pytest.approx(-0.25)


def test_dpo_label_smoothing():
    # -(1 - eps) log sigma(x) - eps log sigma(-x) = -log sigma(x) + eps * x   (since
    # log sigma(x) - log sigma(-x) = x).  With eps = 0.1 and beta h = [0.5, -1]:
    # pair 1: 0.474077 + 0.05 = 0.524077;  pair 2: 1.313262 - 0.1 = 1.213262;  mean = 0.868669
    loss, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.868669, abs=1e-6)
    expected = 0.9 * softplus_neg(0.5) + 0.1 * softplus_neg(-0.5)
    expected = (expected + 0.9 * softplus_neg(-1.0) + 0.1 * softplus_neg(1.0)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_dpo_ipo_worked():
    # target margin 1 / (2 beta) = 1;  (h - 1)^2 = [(1 - 1)^2, (-2 - 1)^2] = [0, 9];  mean = 4.5
    loss, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(4.5)


def test_dpo_gradients_reach_policy_only():
    pi_c, pi_r = PI_C.clone().requires_grad_(), PI_R.clone().requires_grad_()
    ref_c, ref_r = REF_C.clone().requires_grad_(), REF_R.clone().requires_grad_()
    dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)[0].backward()
    # dL/dpi_c = -beta * (1 - sigma(beta h)) / B < 0: raising the chosen log-prob lowers the loss
    # pair 1: -0.5 * (1 - sigma(0.5)) / 2 = -0.5 * 0.377541 / 2 = -0.094385
    assert pi_c.grad[0].item() == pytest.approx(-0.094385, abs=1e-6)
    assert (pi_c.grad < 0).all() and (pi_r.grad > 0).all()
    assert ref_c.grad is None and ref_r.grad is None


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, loss_type="hinge-ish")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.0)


# ---------------------------------------------------------------- gae (gamma 0.9, lam 0.8)

# gamma * lam = 0.72
# row a: r = [0, 0, 1], V = [0.5, 0.4, 0.6], all valid
#   t=2: delta = 1 + 0.9 * 0 - 0.6 = 0.4                 A2 = 0.4
#   t=1: delta = 0 + 0.9 * 0.6 - 0.4 = 0.14              A1 = 0.14 + 0.72 * 0.4 = 0.428
#   t=0: delta = 0 + 0.9 * 0.4 - 0.5 = -0.14             A0 = -0.14 + 0.72 * 0.428 = 0.16816
#   returns = A + V = [0.66816, 0.828, 1.0]
ROW_A = ([0.0, 0.0, 1.0], [0.5, 0.4, 0.6], [1, 1, 1])
ADV_A, RET_A = [0.16816, 0.428, 0.4], [0.66816, 0.828, 1.0]


def test_gae_one_by_three():
    rewards, values, mask = (torch.tensor([x], dtype=torch.float) for x in ROW_A)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([ADV_A]))
    torch.testing.assert_close(returns, torch.tensor([RET_A]))


def test_gae_two_by_three_right_padded():
    # row b: r = [0, 2, 5*], V = [1.0, 0.5, 9*], mask [1, 1, 0]  (* padding, must be ignored)
    #   t=2: padding -> A2 = 0, the carry stays at V_next = 0, A_next = 0
    #   t=1: delta = 2 + 0.9 * 0 - 0.5 = 1.5               A1 = 1.5   (bootstrap 0 after the end)
    #   t=0: delta = 0 + 0.9 * 0.5 - 1.0 = -0.55           A0 = -0.55 + 0.72 * 1.5 = 0.53
    #   returns = [0.53 + 1.0, 1.5 + 0.5, 0] = [1.53, 2.0, 0]
    rewards = torch.tensor([ROW_A[0], [0.0, 2.0, 5.0]])
    values = torch.tensor([ROW_A[1], [1.0, 0.5, 9.0]])
    mask = torch.tensor([ROW_A[2], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([ADV_A, [0.53, 1.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([RET_A, [1.53, 2.0, 0.0]]))


def test_gae_skips_a_hole_in_the_mask():
    # r = [0, 7*, 1], V = [0.5, 9*, 0.6], mask [1, 0, 1]: token 0 looks past the hole to token 2
    #   t=2: A2 = 1 - 0.6 = 0.4;   t=1: hole, A1 = 0
    #   t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04            A0 = 0.04 + 0.72 * 0.4 = 0.328
    advantages, _ = gae(torch.tensor([[0.0, 7.0, 1.0]]), torch.tensor([[0.5, 9.0, 0.6]]),
                        torch.tensor([[1, 0, 1]]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[0.328, 0.0, 0.4]]))


def test_gae_lambda_one_is_monte_carlo():
    # gamma = lam = 1: A_t = (sum of future rewards) - V_t = [1 - 0.5, 1 - 0.4, 1 - 0.6]
    rewards, values, mask = (torch.tensor([x], dtype=torch.float) for x in ROW_A)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.6, 0.4]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0]]))


# ---------------------------------------------------------------- whiten


def test_whiten_masked():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    # valid [1, 2, 3]: mean 2, unbiased var ((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1]; padding -> 0
    torch.testing.assert_close(whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    # shift_mean=False adds the mean back: [-1 + 2, 0 + 2, 1 + 2] = [1, 2, 3]
    unshifted = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(unshifted, torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


# ---------------------------------------------------------------- ppo_policy_loss


def test_ppo_policy_loss_clipping_and_stats():
    # ratios exp(logp - 0) = [[1.5, 0.9], [0.5, 7*]], A = [[1, -1], [-2, 5*]], eps = 0.2
    #   (0,0): min(1.5 * 1, 1.2 * 1) = 1.2          -> L = -1.2   clipped (|0.5| > 0.2)
    #   (0,1): min(0.9 * -1, 0.9 * -1) = -0.9       -> L = 0.9    inside the range
    #   (1,0): min(0.5 * -2, 0.8 * -2) = -1.6       -> L = 1.6    clipped (|-0.5| > 0.2)
    #   loss = (-1.2 + 0.9 + 1.6) / 3 = 0.433333;  clip_fraction = 2 / 3
    #   approx_kl = mean((r - 1) - ln r) = (0.094535 + 0.005361 + 0.193147) / 3 = 0.097681
    logp = torch.log(torch.tensor([[1.5, 0.9], [0.5, 7.0]])).requires_grad_()
    old_logp = torch.zeros(2, 2)
    advantages = torch.tensor([[1.0, -1.0], [-2.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = ppo_policy_loss(logp, old_logp, advantages, mask, epsilon=0.2)
    assert loss.item() == pytest.approx(1.3 / 3, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    assert stats["approx_kl"] == pytest.approx(0.097681, abs=1e-6)
    loss.backward()
    # clipped terms and padding give no gradient; (0,1): d(-r * A)/dlogp / 3 = -(0.9 * -1) / 3 = 0.3
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.3], [0.0, 0.0]]))


# ---------------------------------------------------------------- value_loss


def test_value_loss_clipping():
    # (0,0): v=1.0, v_old=0.0, R=1.0: (1-1)^2 = 0;  clip -> 0.2, (0.2-1)^2 = 0.64  -> 0.64 (clip)
    # (0,1): v=0.5, v_old=0.5, R=1.5: 1.0 both                                     -> 1.0
    # (1,0): v=2.0, v_old=1.0, R=0.0: 4.0;  clip -> 1.2, 1.44                      -> 4.0
    # (1,1): padding
    # loss = 0.5 * (0.64 + 1.0 + 4.0) / 3 = 0.94;  clipped error used on 1 of 3 tokens
    values = torch.tensor([[1.0, 0.5], [2.0, 50.0]])
    old_values = torch.tensor([[0.0, 0.5], [1.0, 0.0]])
    returns = torch.tensor([[1.0, 1.5], [0.0, -50.0]])
    loss, stats = value_loss(values, old_values, returns, torch.tensor([[1, 1], [1, 0]]))
    assert loss.item() == pytest.approx(0.94)
    assert stats["value_clip_fraction"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- kl_penalty_rewards


def test_kl_penalty_rewards_layout():
    # row 0 (3 valid): -0.1 * (logp - ref) = -0.1 * [0.5, 0, 0.5] = [-0.05, 0, -0.05]; +2 at t=2
    # row 1 (2 valid): -0.1 * [-0.5, 0, pad] = [0.05, 0, 0];                           -1 at t=1
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref_logp = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = kl_penalty_rewards(torch.tensor([2.0, -1.0]), logp, ref_logp, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.95], [0.05, -1.0, 0.0]]))
    assert not rewards.requires_grad


def test_kl_penalty_rewards_empty_completion_gets_nothing():
    rewards = kl_penalty_rewards(torch.tensor([3.0]), torch.zeros(1, 2), torch.zeros(1, 2),
                                 torch.zeros(1, 2), kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.zeros(1, 2))
