"""The mismatch correction of rollouts sampled by another engine: the weights worked by hand for every mode,
the update unchanged when the sampler is exact, and the corrected gradients by hand."""

from __future__ import annotations

import math

import pytest
import torch

from palaestra.algorithms.rollout_correction import correction_weights
from palaestra.config.errors import ConfigError
from palaestra.config.rollout import RolloutSettings, resolved_correction, validate_rollout
from palaestra.recipes.update import policy_update
from palaestra.rollout.hf import Rollout, rollout_from_token_ids

# log pi_trainer - log pi_sampler: row 0 [0, 1, -1], row 1 [0, 0.5, (padding)]
TRAINER = torch.tensor([[0.0, -1.0, -2.0], [-1.0, -1.0, 0.0]])
SAMPLER = torch.tensor([[0.0, -2.0, -1.0], [-1.0, -1.5, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
E = math.e


def _close(tensor: torch.Tensor, expected) -> None:
    torch.testing.assert_close(tensor.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode, cap, expected, capped", [
    # token ratios [1, e, 1/e] and [1, e^0.5]; e is over the cap 2
    ("token_truncate", 2.0, [[1, 2, 1 / E], [1, E ** 0.5, 0]], 1 / 5),
    ("token_mask", 2.0, [[1, 0, 1 / E], [1, E ** 0.5, 0]], 1 / 5),
    # sequence ratios: e^(0 + 1 - 1) = 1 and e^0.5 = 1.6487, over the cap 1.5
    ("sequence_truncate", 1.5, [[1, 1, 1], [1.5, 1.5, 0]], 2 / 5),
    ("sequence_mask", 1.5, [[1, 1, 1], [0, 0, 0]], 2 / 5),
])
def test_weights_by_hand(mode, cap, expected, capped):
    weights, stats = correction_weights(TRAINER, SAMPLER, MASK, mode=mode, cap=cap)
    _close(weights, expected)
    assert stats["rollout/is_capped_share"] == pytest.approx(capped)
    # |log ratio| over the 5 tokens: 0, 1, 1, 0, 0.5
    assert stats["rollout/logprob_gap/mean"] == pytest.approx(2.5 / 5)
    assert stats["rollout/logprob_gap/max"] == pytest.approx(1.0)


def test_ratio_figures_by_hand():
    _, stats = correction_weights(TRAINER, SAMPLER, MASK, mode="token_truncate", cap=2.0)
    assert stats["rollout/is_ratio/mean"] == pytest.approx((1 + E + 1 / E + 1 + E ** 0.5) / 5, rel=1e-6)
    assert stats["rollout/is_ratio/max"] == pytest.approx(E, rel=1e-6)
    _, stats = correction_weights(TRAINER, SAMPLER, MASK, mode="sequence_mask", cap=2.0)
    assert stats["rollout/is_ratio/mean"] == pytest.approx((3 * 1 + 2 * E ** 0.5) / 5, rel=1e-6)


def test_an_exact_sampler_weighs_every_token_one_and_a_huge_gap_stays_finite():
    weights, stats = correction_weights(TRAINER, TRAINER.clone(), MASK, mode="sequence_truncate", cap=2.0)
    assert torch.equal(weights, MASK.float())
    assert stats["rollout/logprob_gap/mean"] == 0.0 and stats["rollout/is_capped_share"] == 0.0
    far = TRAINER - 100.0  # the sampler found these tokens e^100 times less likely
    weights, stats = correction_weights(TRAINER, far, MASK, mode="sequence_mask", cap=2.0)
    assert torch.equal(weights, torch.zeros_like(weights)) and math.isfinite(stats["rollout/is_ratio/max"])
    with pytest.raises(ValueError, match="mode"):
        correction_weights(TRAINER, SAMPLER, MASK, mode="none")


# ------------------------------------------------------------------ the update (log-probs = the parameter)

UPDATE_MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, 2.0])


def _grad(sampler=None, **kwargs):
    theta = torch.nn.Parameter(torch.zeros(4, 2))

    class _Optimizer:
        def zero_grad(self, set_to_none=True):
            theta.grad = None

        def step(self):
            pass

    optimizer = _Optimizer()
    stats, _ = policy_update(optimizer, optimizer, [theta], ADVANTAGES, UPDATE_MASK, slices=[slice(0, 2), slice(2, 4)],
                             logprobs=lambda rows: (theta[rows], None), loss_type="grpo", epsilon=0.2,
                             sampler_logps=None if sampler is None else [sampler[0:2], sampler[2:4]], **kwargs)
    return theta.grad, stats


def test_the_corrected_update_equals_the_plain_one_when_the_sampler_is_exact():
    plain, _ = _grad()
    corrected, stats = _grad(torch.zeros(4, 2), correction="token_truncate", correction_cap=2.0)
    assert torch.equal(plain, corrected)
    assert stats["rollout/logprob_gap/mean"] == 0.0 and stats["rollout/is_ratio/mean"] == pytest.approx(1.0)


def test_corrected_gradients_by_hand():
    # grpo at ratio 1: d L / d theta_bt = -A_b w_bt / (len_b * 4). The sampler gave token (0, 0) log 1/3 (w = 3, capped
    # at 2) and token (1, 0) log 2 (w = 1/2); every other token log 1 (w = 1).
    sampler = torch.zeros(4, 2)
    sampler[0, 0], sampler[1, 0] = -math.log(3), math.log(2)
    grad, stats = _grad(sampler, correction="token_truncate", correction_cap=2.0)
    expected = [[-0.125 * 2, -0.125], [0.25 * 0.5, 0.0], [-0.0625, -0.0625], [-0.5, 0.0]]
    _close(grad, expected)
    assert stats["rollout/is_capped_share"] == pytest.approx(0.5 * (1 / 3) + 0.5 * 0)  # each half: its share of rows
    grad, _ = _grad(sampler, correction="token_mask", correction_cap=2.0)
    assert grad[0, 0] == 0.0 and grad[1, 0] == pytest.approx(0.125)
    # measured but not corrected
    grad, stats = _grad(sampler, correction="none")
    assert torch.equal(grad, _grad()[0]) and stats["rollout/logprob_gap/max"] == pytest.approx(math.log(3))


# ------------------------------------------------------------------ carriers and settings


def test_rollouts_carry_the_samplers_log_probs_through_select_and_concat():
    rollout = rollout_from_token_ids([[5, 6], [7]], [[1, 2], [3], [4, 2, 9], [2]], 2, [False, True, False, False],
                                     pad_id=0, stop_ids=[2], decode=str, logprobs=[[-0.5, -0.1], [-1.0], [-0.2, -0.3, -9.0], [-0.7]])
    # the token after the stop token (9) is not the completion's: its log-prob is dropped with it
    _close(rollout.sampler_logprobs, [[-0.5, -0.1, 0], [-1.0, 0, 0], [-0.2, -0.3, 0], [-0.7, 0, 0]])
    picked = rollout.select(torch.tensor([False, True, True, False]))
    _close(picked.sampler_logprobs, [[-1.0, 0, 0], [-0.2, -0.3, 0]])
    joined = Rollout.concat([picked, rollout.select(torch.tensor([True, False, False, False]))])
    _close(joined.sampler_logprobs, [[-1.0, 0, 0], [-0.2, -0.3, 0], [-0.5, -0.1, 0]])
    assert rollout_from_token_ids([[5]], [[2]], 1, [False], pad_id=0, stop_ids=[2], decode=str).sampler_logprobs is None


@pytest.mark.parametrize("settings, message", [
    (RolloutSettings(engine="server"), "rollout.engine=server needs rollout.servers"),
    (RolloutSettings(engine="server", servers=["localhost:8000"]), "is not an http(s) URL"),
    (RolloutSettings(engine="server", servers=["http://h:8000:1"]), "'http://h:8000:1' is not a valid URL"),
    (RolloutSettings(servers=["http://a:1"]), "use rollout.engine=server"),
    (RolloutSettings(correction="token_mask"), "with hf the trainer samples itself"),
    (RolloutSettings(engine="server", servers=["http://a:1"], correction_cap=0.5), "correction_cap=0.5 must be >= 1"),
    (RolloutSettings(engine="sglang"), "rollout.engine='sglang' is unknown"),
])
def test_bad_rollout_settings_are_one_line(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_rollout(settings)


def test_auto_correction_follows_the_engine():
    assert resolved_correction(RolloutSettings(engine="vllm")) == "token_truncate"
    assert resolved_correction(RolloutSettings(engine="server", servers=["http://a:1"], correction="sequence_mask")) == "sequence_mask"
    assert resolved_correction(RolloutSettings()) == "none"
