"""The GRPO update component (palaestra.recipes.update): accumulation over micro-batches equals one
batch, with gradients worked by hand on a policy whose log-probs are its parameter."""

from __future__ import annotations

import math

import pytest
import torch

from palaestra.algorithms.grpo import LOSS_TYPES, accumulated_loss
from palaestra.models import build_tiny_model
from palaestra.recipes.update import micro_batch_logprobs, policy_update
from palaestra.rollout.hf import Rollout

# A "policy" of 4 completions of up to 2 tokens whose log-probs are the parameter itself:
# d loss / d theta is then the per-token weight of the loss, easy to work by hand.
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])  # lengths 2, 1, 2, 1: 6 tokens
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, 2.0])
WHOLE, HALVES, UNEQUAL = [slice(0, 4)], [slice(0, 2), slice(2, 4)], [slice(0, 1), slice(1, 4)]


class _NoStep:
    """An optimizer and scheduler that leave the parameters (and their gradients) alone."""

    def __init__(self, params):
        self.params = params

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        pass


def _theta_update(slices, loss_type="grpo", old=None, **kwargs):
    theta = torch.nn.Parameter(torch.zeros(4, 2))
    optimizer = _NoStep([theta])
    stats, grad_norm = policy_update(
        optimizer, optimizer, [theta], ADVANTAGES, MASK, slices=slices, logprobs=lambda rows: (theta[rows], None),
        old_logps=old, loss_type=loss_type, epsilon=0.2, epsilon_high=5.0 if loss_type == "cispo" else 0.28,  # CISPO caps
        max_completion_length=2, **kwargs,                                                              # the weight itself
    )
    return theta.grad, stats, grad_norm


# --------------------------------------------------------------------------- accumulated_loss


def test_accumulated_loss_weighs_rows_and_leaves_dapo_whole():
    loss = torch.tensor(0.6)
    # 2 of 8 rows: 0.6 * 2 / 8 = 0.15, exactly loss / 4 (four equal micro-batches)
    assert torch.equal(accumulated_loss(loss, loss_type="grpo", rows=2, total_rows=8), loss / 4)
    # 3 of 5 rows: 0.6 * 3 / 5 = 0.36
    assert float(accumulated_loss(loss, loss_type="dr_grpo", rows=3, total_rows=5)) == pytest.approx(0.36)
    # dapo already divides by the whole batch's tokens (every process's): summed as is
    assert torch.equal(accumulated_loss(loss, loss_type="dapo", rows=3, total_rows=5), loss)
    with pytest.raises(ValueError, match="loss_type"):
        accumulated_loss(loss, loss_type="ppo", rows=1, total_rows=2)
    with pytest.raises(ValueError, match="micro-batch"):
        accumulated_loss(loss, loss_type="grpo", rows=0, total_rows=2)


# --------------------------------------------------------------------------- gradients by hand

# ratio 1 (no old log-probs), so d L_tok / d theta = -A_b on every real token; then each reduction:
#   grpo:    -A_b / (len_b * B)      B = 4
#   bnpo:    -A_b / 6                6 tokens
#   dr_grpo: -A_b / (B * 2)          max_completion_length 2
#   dapo:    -A_b / 6                the whole batch's tokens
EXPECTED = {
    "grpo": [[-0.125, -0.125], [0.25, 0.0], [-0.0625, -0.0625], [-0.5, 0.0]],
    "bnpo": [[-1 / 6, -1 / 6], [1 / 6, 0.0], [-1 / 12, -1 / 12], [-1 / 3, 0.0]],
    "dr_grpo": [[-0.125, -0.125], [0.125, 0.0], [-0.0625, -0.0625], [-0.25, 0.0]],
    "dapo": [[-1 / 6, -1 / 6], [1 / 6, 0.0], [-1 / 12, -1 / 12], [-1 / 3, 0.0]],
}
# at ratio 1 CISPO's token gradient is -A_b too (its weight is 1), reduced as dapo; SAPO's gate has the
# surrogate's slope there (sigmoid'(0) * 4 = 1), reduced as grpo
EXPECTED["cispo"], EXPECTED["sapo"] = EXPECTED["dapo"], EXPECTED["grpo"]
SURROGATES = ("grpo", "bnpo", "dr_grpo", "dapo")
"""The losses whose value at ratio 1 is -A_b per token (CISPO's is -A_b log p, SAPO's -2 A_b / tau)."""


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_by_hand_whatever_the_micro_batches(loss_type):
    expected = torch.tensor(EXPECTED[loss_type])
    for slices in (WHOLE, HALVES, UNEQUAL):
        if loss_type == "bnpo" and slices is UNEQUAL:
            continue  # bnpo means over a micro-batch's tokens: see the next test
        grad, stats, grad_norm = _theta_update(slices, loss_type)
        torch.testing.assert_close(grad, expected, atol=1e-7, rtol=0)
        assert grad_norm == pytest.approx(float(expected.norm()))
        # the loss is the whole batch's: sum of -A_b weighted as the gradient weighs its tokens
        if loss_type in SURROGATES:
            assert stats["loss"] == pytest.approx(float((expected * MASK).sum()), abs=1e-7)


def test_bnpo_means_over_each_micro_batchs_tokens_and_weighs_its_rows():
    # micro-batch [0:1]: 1 row of 4, 2 tokens: -A_0 / 2 * 1/4 = -0.125
    # micro-batch [1:4]: 3 rows of 4, 4 tokens: -A_b / 4 * 3/4 = -A_b * 0.1875
    # (the whole batch's bnpo only when every micro-batch has the same tokens per row, as [0:2], [2:4])
    grad, _, _ = _theta_update(UNEQUAL, "bnpo")
    expected = torch.tensor([[-0.125, -0.125], [0.1875, 0.0], [-0.09375, -0.09375], [-0.375, 0.0]])
    torch.testing.assert_close(grad, expected, atol=1e-7, rtol=0)


def test_clip_ratios_are_token_fractions_weighed_by_rows():
    # theta = 0 and old = -0.5 on row 0 token 0: ratio e^0.5 = 1.65 > 1 + 0.28 with A > 0 (clipped high);
    # old = +0.5 on row 1 token 0: ratio e^-0.5 = 0.61 < 1 - 0.2 with A < 0 (clipped low)
    old = torch.zeros(4, 2)
    old[0, 0], old[1, 0] = -0.5, 0.5
    _, stats, _ = _theta_update(WHOLE, old=[old])
    # one micro-batch: 1 of 6 tokens each
    assert stats["clip_ratio/high"] == pytest.approx(1 / 6) and stats["clip_ratio/low"] == pytest.approx(1 / 6)
    assert stats["clip_ratio/region"] == pytest.approx(2 / 6)
    _, stats, _ = _theta_update(UNEQUAL, old=[old[:1], old[1:]])
    # [0:1]: high 1 of 2 tokens, weight 1/4 -> 0.125; [1:4]: low 1 of 4 tokens, weight 3/4 -> 0.1875
    assert stats["clip_ratio/high"] == pytest.approx(0.125) and stats["clip_ratio/low"] == pytest.approx(0.1875)
    assert stats["clip_ratio/region"] == pytest.approx(0.3125)
    assert "entropy" not in stats  # the log-prob callable gave none
    # a clipped token passes no gradient: row 0 token 0 and row 1 token 0 are flat
    grad, _, _ = _theta_update(WHOLE, old=[old])
    assert grad[0, 0] == 0.0 and grad[1, 0] == 0.0 and grad[0, 1] == -0.125


def test_old_and_reference_log_probs_as_lists_or_callables_agree():
    old = torch.tensor([[-0.1, 0.2], [0.3, 0.0], [-0.2, 0.1], [0.05, 0.0]])
    ref = torch.tensor([[0.4, -0.3], [0.1, 0.0], [0.2, 0.2], [-0.1, 0.0]])
    calls = []

    def reference(rows):
        calls.append(rows)
        return ref[rows]

    by_list = _theta_update(UNEQUAL, old=[old[:1], old[1:]], ref_logps=[ref[:1], ref[1:]], beta=0.1)
    by_callable = _theta_update(UNEQUAL, old=lambda rows: old[rows], ref_logps=reference, beta=0.1)
    assert calls == UNEQUAL
    torch.testing.assert_close(by_list[0], by_callable[0], atol=0, rtol=0)
    assert by_list[1] == by_callable[1]
    # k3 at theta = 0 is e^ref - ref - 1 per token; the stat is each micro-batch's token mean weighed by its rows:
    #   [0:1] (k3(0.4) + k3(-0.3)) / 2 * 1/4 + [1:4] (k3(0.1) + 2 k3(0.2) + k3(-0.1)) / 4 * 3/4 = 0.026483
    k3 = lambda r: math.exp(r) - r - 1  # noqa: E731
    expected = (k3(0.4) + k3(-0.3)) / 2 / 4 + (k3(0.1) + 2 * k3(0.2) + k3(-0.1)) / 4 * 3 / 4
    assert by_list[1]["kl"] == pytest.approx(expected, rel=1e-6) and expected == pytest.approx(0.026483, abs=1e-6)


class _TwinProcess:
    """A data-parallel world of 2 whose other process holds the same batch: every sum over the processes doubles."""

    world, rank, enabled = 2, 0, True

    def sum(self, value):
        return value * 2

    def totals(self, *values):
        return tuple(2.0 * float(v) for v in values)

    def any(self, flag):
        return flag

    def sum_gradients(self, parameters):
        for parameter in parameters:
            parameter.grad = parameter.grad * 2


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_twin_process_makes_the_single_process_update(loss_type):
    # the whole batch is both processes' rows: twice the rows and tokens, the same means -> the same gradient
    single, single_stats, _ = _theta_update(HALVES, loss_type)
    twin, twin_stats, _ = _theta_update(HALVES, loss_type, dist=_TwinProcess())
    torch.testing.assert_close(twin, single, atol=1e-7, rtol=0)
    # the logged figures are the whole batch's: each process's share of the rows (and of dapo's tokens) added up
    assert twin_stats == pytest.approx(single_stats)


def test_timings_and_one_optimizer_step():
    theta = torch.nn.Parameter(torch.zeros(4, 2))
    optimizer = torch.optim.SGD([theta], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    timings: dict[str, float] = {}
    policy_update(optimizer, scheduler, [theta], ADVANTAGES, MASK, slices=HALVES, logprobs=lambda rows: (theta[rows], None),
                  timings=timings)
    assert set(timings) == {"policy_forward_backward", "optimizer"}
    torch.testing.assert_close(theta.detach(), -torch.tensor(EXPECTED["grpo"]), atol=1e-7, rtol=0)  # one SGD step, lr 1
    assert scheduler.last_epoch == 1
    with pytest.raises(ValueError, match="at least one completion"):
        policy_update(optimizer, scheduler, [theta], ADVANTAGES, MASK, slices=[], logprobs=lambda rows: (theta[rows], None))


# --------------------------------------------------------------------------- the tiny model


def _tiny_batch():
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 200, (2, 6), generator=g).repeat_interleave(4, 0)
    completions = torch.randint(3, 200, (8, 5), generator=g)
    lengths = torch.tensor([5, 3, 1, 4, 5, 2, 5, 3])
    mask = (torch.arange(5)[None] < lengths[:, None]).long()
    batch = Rollout(prompts, torch.ones_like(prompts), completions, mask, torch.zeros(8, dtype=torch.bool), [""] * 8)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, 0.8, -0.6, -0.4])
    return batch, advantages


def _tiny_gradients(loss_type: str, slices, *, full_mask: bool):
    model, _ = build_tiny_model(seed=0)
    model.train()
    batch, advantages = _tiny_batch()
    if full_mask:
        batch.completion_mask = torch.ones_like(batch.completion_mask)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = _NoStep(parameters)
    with torch.no_grad():  # old and reference policies a little away from the model: ratios clip, KL counts
        logp = micro_batch_logprobs(model, batch, slice(0, 8), 1.0, 0, "fp32")[0]
        old = logp + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
        ref = logp + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2))
    stats, _ = policy_update(
        optimizer, optimizer, parameters, advantages, batch.completion_mask.float(), slices=slices,
        logprobs=lambda rows: micro_batch_logprobs(model, batch, rows, 1.0, 0, "fp32", with_entropy=True),
        old_logps=lambda rows: old[rows], ref_logps=lambda rows: ref[rows], loss_type=loss_type, epsilon=0.2,
        epsilon_high=0.28, beta=0.04, max_completion_length=5,
    )
    return [p.grad.clone() for p in parameters], stats


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_tiny_model_micro_batches_accumulate_to_the_whole_batch(loss_type):
    # bnpo means over each micro-batch's tokens: the same as the whole batch when every row is full
    full_mask = loss_type == "bnpo"
    whole, whole_stats = _tiny_gradients(loss_type, [slice(0, 8)], full_mask=full_mask)
    assert any(float(g.abs().max()) > 1e-4 for g in whole)
    for slices in ([slice(0, 4), slice(4, 8)], [slice(0, 3), slice(3, 8)], [slice(0, 1), slice(1, 6), slice(6, 8)]):
        accumulated, stats = _tiny_gradients(loss_type, slices, full_mask=full_mask)
        for a, b in zip(accumulated, whole):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert stats["loss"] == pytest.approx(whole_stats["loss"], abs=1e-6)
        assert set(stats) == {"loss", "kl", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "entropy"}


def _entropy_of(theta):
    """A stand-in per-token entropy of the theta policy: 2 theta + 1 (1 at theta = 0, gradient 2 per token)."""
    return 2 * theta + 1


@pytest.mark.parametrize("slices", [WHOLE, UNEQUAL], ids=["whole", "unequal"])
def test_the_entropy_bonus_lowers_each_tokens_loss_by_its_entropy(slices):
    # grpo at theta = 0 (ratio 1): d loss / d theta_bt = -A_b m_bt / (len_b B); the bonus, -c x the batch's mean
    # token entropy (6 tokens, whatever the loss type), adds -c * 2 m_bt / 6 = -1/30. Row 0 (A = 1, 2 tokens):
    # -1/8 - 1/30 per token; row 1 (A = -1, 1 token): 1/4 - 1/30; row 2 (A = 0.5, 2 tokens): -1/16 - 1/30;
    # row 3 (A = 2, 1 token): -1/2 - 1/30
    theta = torch.nn.Parameter(torch.zeros(4, 2))
    optimizer = _NoStep([theta])
    stats, _ = policy_update(optimizer, optimizer, [theta], ADVANTAGES, MASK, slices=slices,
                             logprobs=lambda rows: (theta[rows], _entropy_of(theta[rows])), loss_type="grpo",
                             entropy_coef=0.1)
    expected = torch.tensor([[-1 / 8, -1 / 8], [1 / 4, 0.0], [-1 / 16, -1 / 16], [-1 / 2, 0.0]]) - MASK / 30
    torch.testing.assert_close(theta.grad, expected, atol=1e-7, rtol=0)
    assert stats["entropy"] == pytest.approx(1.0)  # the logged entropy is the bonus's: 1 on every token
    # the loss: the surrogate's at ratio 1, -mean_b A_b = -0.625, less 0.1 x the mean entropy 1
    assert stats["loss"] == pytest.approx(-0.725, abs=1e-6)
    with pytest.raises(ValueError, match="entropy_coef > 0 needs the policy's entropies"):
        policy_update(optimizer, optimizer, [theta], ADVANTAGES, MASK, slices=slices,
                      logprobs=lambda rows: (theta[rows], None), entropy_coef=0.1)


def test_a_teacher_gives_every_token_its_own_advantage():
    # distillation at theta = 0 (the sampler's log-probs): A_bt = 0.5 A_b + 2 (teacher_bt - 0); grpo's gradient
    # is -A_bt m_bt / (len_b B): row 0 token 1, A = 1, teacher -0.5: -(0.5 - 1) / 8 = 0.0625
    teacher = torch.tensor([[-1.0, -0.5], [-0.2, 0.0], [-0.1, -2.0], [-0.3, 0.0]])
    theta = torch.nn.Parameter(torch.zeros(4, 2))
    optimizer = _NoStep([theta])
    stats, _ = policy_update(optimizer, optimizer, [theta], ADVANTAGES, MASK, slices=UNEQUAL,
                             logprobs=lambda rows: (theta[rows], None), teacher_logps=[teacher[:1], teacher[1:]],
                             reward_coef=0.5, teacher_coef=2.0, loss_type="grpo")
    assert float(theta.grad[0, 1]) == pytest.approx(0.0625)
    theta_b = torch.nn.Parameter(torch.zeros(4, 2))  # the same update given the [B, T] advantages directly
    token_advantages = 0.5 * ADVANTAGES.unsqueeze(1) + 2.0 * teacher
    policy_update(_NoStep([theta_b]), _NoStep([theta_b]), [theta_b], token_advantages, MASK, slices=UNEQUAL,
                  logprobs=lambda rows: (theta_b[rows], None), loss_type="grpo")
    torch.testing.assert_close(theta.grad, theta_b.grad, atol=0, rtol=0)
    # the reverse-KL estimate is 0 - teacher, each micro-batch's token mean weighed by its rows:
    #   [0:1] (1 + 0.5) / 2 * 1/4 + [1:4] (0.2 + 0.1 + 2 + 0.3) / 4 * 3/4 = 0.1875 + 0.4875 = 0.675
    assert stats["distill/reverse_kl"] == pytest.approx(0.675)
