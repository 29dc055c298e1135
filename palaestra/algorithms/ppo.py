"""The math of PPO for language models: reward shaping, GAE, whitening and the two clipped losses.

Each completion token is one action of a token-level MDP. The reward is a per-token KL penalty
against the reference model plus the sequence score at the last token (Ziegler et al., 2019,
arXiv:1909.08593; Ouyang et al., 2022, arXiv:2203.02155). Advantages come from generalised
advantage estimation (Schulman et al., 2015, arXiv:1506.02438) over the value head's estimates, and
both the policy and the value head use PPO's clipped objectives (Schulman et al., 2017,
arXiv:1707.06347).

Every function is pure (tensors in, tensors out). Shapes use B for the number of completions and T
for completion tokens; ``mask`` is 1 on real completion tokens and 0 on padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from palaestra.algorithms.grpo import k3_kl
from palaestra.algorithms.logprob_math import masked_mean

__all__ = ["gae", "kl_penalty_rewards", "ppo_policy_loss", "value_loss", "whiten"]


def kl_penalty_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, *, kl_coef: float
) -> Tensor:
    """Per-token rewards: a KL penalty on every token plus the sequence score on the last one.

    Args:
        scores: [B] the reward model's (or verifier's) score of each whole completion.
        logp: [B, T] log-probs of the sampled tokens under the policy that sampled them.
        ref_logp: [B, T] log-probs of the same tokens under the reference model.
        mask: [B, T] 1 for completion tokens, 0 for padding.
        kl_coef: weight of the KL penalty.

    Returns:
        [B, T] rewards, 0 on padding; not differentiable (rewards are data, not a graph).
    """
    # r_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t))       on every valid token
    # r_last += score                                           on the last valid token
    mask = mask.to(logp.dtype)
    rewards = (-kl_coef * (logp - ref_logp) * mask).detach()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * mask).argmax(dim=1)  # [B] index of the last valid token
    has_tokens = mask.sum(dim=1) > 0  # an empty completion has nowhere to put its score
    rows = torch.arange(mask.shape[0], device=mask.device)
    scores = scores.detach().to(rewards.dtype)
    rewards[rows, last] += torch.where(has_tokens, scores, torch.zeros_like(scores))
    return rewards


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and value targets over the valid tokens.

    Padding is skipped: a valid token bootstraps from the *next valid* token's value, and from 0
    after the last valid token (the episode ends there).

    Args:
        rewards: [B, T] per-token rewards (e.g. from ``kl_penalty_rewards``).
        values: [B, T] value-head estimates V(s_t) from the rollout.
        mask: [B, T] 1 for completion tokens, 0 for padding.
        gamma: discount factor.
        lam: GAE lambda; 0 gives one-step TD, 1 gives Monte-Carlo returns minus V.

    Returns:
        (advantages [B, T], returns [B, T]) with returns = advantages + values; both 0 on padding
        and both detached.
    """
    rewards, values = rewards.detach(), values.detach()
    mask = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])  # V(s_{t+1}); 0 past the end
    next_adv = torch.zeros_like(values[:, 0])  # A_{t+1}
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        # delta_t = r_t + gamma * V_{t+1} - V_t
        # A_t = delta_t + gamma * lam * A_{t+1}
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = adv
        # Padding leaves the carry untouched, so the previous valid token looks past it.
        valid = mask[:, t] > 0
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
           reduce_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Normalise ``x`` to unit variance (and zero mean) over the valid positions.

    Args:
        x: [B, T] values, e.g. advantages.
        mask: [B, T] 1 for positions that count.
        shift_mean: if False, the mean is added back (only the scale changes).
        eps: added to the variance.
        reduce_sum: with data parallelism, the sum of a tensor over the processes, so that the mean and
            variance are those of every process's rows together.

    Returns:
        [B, T], 0 on masked positions.
    """
    # x' = (x - mean) / sqrt(var + eps), var with Bessel's correction n / (n - 1)
    mask = mask.to(x.dtype)
    if reduce_sum is not None:
        count = reduce_sum(mask.sum())
        mean = reduce_sum((x * mask).sum()) / count.clamp(min=1)
        var = reduce_sum(((x - mean) ** 2 * mask).sum()) / count.clamp(min=1)
    else:
        mean = masked_mean(x, mask)
        count = mask.sum()
        var = masked_mean((x - mean) ** 2, mask)
    if count > 1:
        var = var * count / (count - 1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, epsilon: float = 0.2
) -> tuple[Tensor, dict[str, float]]:
    """Token-level clipped surrogate loss, averaged over all valid tokens of the batch.

    Args:
        logp: [B, T] log-probs of the sampled tokens under the policy being trained.
        old_logp: [B, T] the same under the policy that sampled them (detached here).
        advantages: [B, T] per-token advantages, e.g. whitened GAE (detached here).
        mask: [B, T] 1 for completion tokens, 0 for padding.
        epsilon: clip range; the ratio is kept in [1 - epsilon, 1 + epsilon].

    Returns:
        (scalar loss, stats) where stats are python floats: ``clip_fraction`` (fraction of valid
        tokens with |ratio - 1| > epsilon) and ``approx_kl`` (k3 estimate of KL(old || new)).
    """
    mask = mask.to(logp.dtype)
    adv = advantages.detach()
    old_logp = old_logp.detach()
    # ratio = exp(logp - old_logp)
    # L = mean_tokens( -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) )
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * adv, clipped * adv)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        clip_hit = ((ratio - 1).abs() > epsilon).to(mask.dtype)
        # k3 with the samples' own policy (old) first: (ratio - 1) - log ratio
        stats = {
            "clip_fraction": masked_mean(clip_hit, mask).item(),
            "approx_kl": masked_mean(k3_kl(old_logp, logp.detach()), mask).item(),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_range: float = 0.2
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value-head loss, averaged over all valid tokens of the batch.

    Args:
        values: [B, T] value-head estimates under the parameters being trained.
        old_values: [B, T] the estimates made during the rollout (detached here).
        returns: [B, T] value targets from ``gae`` (detached here).
        mask: [B, T] 1 for completion tokens, 0 for padding.
        clip_range: the new estimate may move at most this far from the old one.

    Returns:
        (scalar loss, stats) where stats are python floats: ``value_clip_fraction`` (fraction of
        valid tokens where the clipped error is the larger one, i.e. the one used).
    """
    mask = mask.to(values.dtype)
    old_values, returns = old_values.detach(), returns.detach()
    # v_clip = clip(v, v_old - c, v_old + c)
    # L = 0.5 * mean_tokens( max((v - R)^2, (v_clip - R)^2) )
    clipped = torch.clamp(values, old_values - clip_range, old_values + clip_range)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        used_clip = (clipped_err > unclipped_err).to(mask.dtype)
        stats = {"value_clip_fraction": masked_mean(used_clip, mask).item()}
    return loss, stats
