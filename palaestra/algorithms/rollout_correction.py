"""Mismatch correction: the training update's weights for tokens sampled by another engine.

When the completions come from an inference engine (a ``palaestra serve`` or vLLM worker, in-process
vLLM) the sampler's probabilities differ from the trainer's for the same weights: other kernels,
another precision, an adapter applied another way. The update then learns from slightly off-policy
tokens, and on long runs the gap grows until GRPO collapses (Yao et al., "Your efficient RL framework
secretly brings you off-policy RL training", 2025). Truncated importance sampling corrects it: each
token's policy-gradient term is weighted by the trainer's probability of the token over the sampler's,

    w_t = pi_trainer(y_t) / pi_sampler(y_t),  computed from the log-probs and detached,

capped so one unlikely token cannot dominate. The modes (TRL's names):

* ``token_truncate``: ``min(w_t, cap)`` per token (the paper's TIS);
* ``token_mask``: ``w_t``, or 0 where ``w_t > cap`` (the token leaves the update);
* ``sequence_truncate``: one weight per completion, ``min(prod_t w_t, cap)``, shared by its tokens;
* ``sequence_mask``: ``prod_t w_t``, or 0 for the whole completion where it exceeds ``cap`` (a
  completion the trainer would hardly have sampled is dropped).

The trainer's log-probs are those of the policy that the step's update starts from: with one update per
rollout batch the update's own forward, detached, so the correction costs no extra pass. When the
sampler is exact (its log-probs equal the trainer's) every weight is 1 and the update is unchanged. The
trainer's log-probs are of logits / temperature: with top-p or top-k sampling the sampler's renormalised
probabilities are higher, so the weights sit below 1 by design.
"""

from __future__ import annotations

import torch
from torch import Tensor

from palaestra.algorithms.logprob_math import masked_mean

__all__ = ["CORRECTION_MODES", "correction_weights"]

CORRECTION_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

# a completion's summed log-ratio is clamped here before exp(): far past any cap, and finite
_MAX_SEQUENCE_LOG_RATIO = 20.0


def correction_weights(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, mode: str = "token_truncate",
                       cap: float = 2.0) -> tuple[Tensor, dict[str, float]]:
    """The per-token weights [B, T] of the policy-gradient terms, and the mismatch's figures.

    Args:
        trainer_logp: [B, T] log-probs of the sampled tokens under the trainer's policy (detached here).
        sampler_logp: [B, T] the log-probs the sampling engine reported for the same tokens.
        mask: [B, T] 1 on the completion tokens, 0 on padding (padding gets weight 0 and counts nowhere).
        mode: one of ``CORRECTION_MODES`` other than none.
        cap: the largest weight kept (truncate) or allowed (mask).

    Returns:
        (weights, stats): stats are ``rollout/logprob_gap/mean`` and ``/max`` (|trainer - sampler| over the
        tokens), ``rollout/is_ratio/mean`` and ``/max`` (the uncapped ratio w: per token, or per completion in
        the sequence modes) and ``rollout/is_capped_share`` (the share of tokens whose weight the cap cut or
        zeroed).

    >>> trainer = torch.tensor([[0.0, -1.0, -2.0]])
    >>> sampler = torch.tensor([[0.0, -2.0, -1.0]])
    >>> mask = torch.tensor([[1, 1, 0]])
    >>> weights, stats = correction_weights(trainer, sampler, mask, mode="token_truncate", cap=2.0)
    >>> [round(w, 4) for w in weights[0].tolist()]  # e^0 = 1, e^1 = 2.718 capped at 2, padding 0
    [1.0, 2.0, 0.0]
    >>> stats["rollout/logprob_gap/mean"], stats["rollout/is_capped_share"]
    (0.5, 0.5)
    """
    if mode not in CORRECTION_MODES or mode == "none":
        raise ValueError(f"mode must be one of {CORRECTION_MODES[1:]}, got {mode!r}")
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    mask = mask.to(trainer_logp.dtype)
    log_ratio = (trainer_logp.detach() - sampler_logp.to(trainer_logp.dtype)) * mask  # 0 on padding
    if mode.startswith("token"):
        ratio = torch.exp(log_ratio)
    else:  # one ratio per completion: the product of its tokens'
        summed = log_ratio.sum(dim=1, keepdim=True).clamp(-_MAX_SEQUENCE_LOG_RATIO, _MAX_SEQUENCE_LOG_RATIO)
        ratio = torch.exp(summed).expand_as(trainer_logp)
    capped = ratio > cap
    weights = ratio.clamp(max=cap) if mode.endswith("truncate") else ratio.masked_fill(capped, 0.0)
    weights = weights * mask

    real = mask > 0
    gap = log_ratio.abs()
    stats = {
        "rollout/logprob_gap/mean": float(masked_mean(gap, mask)),
        "rollout/logprob_gap/max": float(gap[real].max()) if bool(real.any()) else 0.0,
        "rollout/is_ratio/mean": float(masked_mean(ratio, mask)),
        "rollout/is_ratio/max": float(ratio[real].max()) if bool(real.any()) else 0.0,
        "rollout/is_capped_share": float(masked_mean(capped.to(mask.dtype), mask)),
    }
    return weights.detach(), stats
