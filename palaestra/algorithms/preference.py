"""The math of learning from preferences: sequence log-probs, Bradley-Terry and DPO losses.

A preference pair is a prompt with a *chosen* and a *rejected* answer. A reward model learns to
score the chosen one higher (Bradley-Terry, as in InstructGPT, Ouyang et al., 2022,
arXiv:2203.02155); DPO skips the reward model and pushes the policy's log-prob ratio against a
frozen reference directly (Rafailov et al., 2023, arXiv:2305.18290). IPO (Azar et al., 2023,
arXiv:2310.12036) replaces DPO's log-sigmoid with a squared loss that does not push the margin to
infinity.

Every function is pure (tensors in, tensors out). Shapes use B for the number of pairs and T for
answer tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from palaestra.config.choices import DPO_LOSS_TYPES

__all__ = ["DPO_LOSS_TYPES", "bradley_terry_loss", "dpo_loss", "sequence_logprob"]


def sequence_logprob(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Log-probability of whole answers: the sum of their token log-probs.

    Args:
        token_logps: [B, T] log-probs of the answer tokens.
        mask: [B, T] 1 for answer tokens, 0 for prompt and padding.

    Returns:
        [B] ``sum_t token_logps * mask``; differentiable.
    """
    # log pi(y | x) = sum_t log pi(y_t | x, y_<t)
    return (token_logps * mask.to(token_logps.dtype)).sum(dim=-1)


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Pairwise reward-model loss: the chosen answer should score higher than the rejected one.

    Args:
        chosen_rewards: [B] scalar rewards of the chosen answers.
        rejected_rewards: [B] scalar rewards of the rejected answers.
        margin: optional [B] how much higher the chosen answer must score (Llama 2's margin loss,
            Touvron et al., 2023); None means 0.

    Returns:
        (scalar loss, stats) where stats are python floats: ``accuracy`` (fraction of pairs with
        r_c > r_r) and ``margin_mean`` (mean of r_c - r_r).
    """
    # L = -mean log sigma(r_c - r_r - m)
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    # logsigmoid is stable for large |x|; log(sigmoid(x)) underflows to -inf for x << 0
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        stats = {
            "accuracy": (diff > 0).float().mean().item(),
            "margin_mean": diff.float().mean().item(),
        }
    return loss, stats


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[Tensor, dict[str, float]]:
    """Direct Preference Optimisation loss over sequence-level log-probs.

    Args:
        policy_chosen_logps: [B] log pi(y_c | x) under the policy being trained.
        policy_rejected_logps: [B] log pi(y_r | x) under the policy.
        ref_chosen_logps: [B] log pi_ref(y_c | x) under the frozen reference (detached here).
        ref_rejected_logps: [B] log pi_ref(y_r | x) under the reference (detached here).
        beta: strength of the implicit KL constraint; larger keeps closer to the reference.
        label_smoothing: epsilon, the assumed chance a preference label is flipped
            (conservative DPO); only for ``loss_type="sigmoid"``.
        loss_type: "sigmoid" (DPO) or "ipo".

    Returns:
        (scalar loss, stats) where stats are python floats: ``rewards/chosen`` and
        ``rewards/rejected`` (mean implicit rewards beta * (log pi - log pi_ref)),
        ``rewards/accuracy`` (fraction of pairs with chosen reward > rejected reward) and
        ``rewards/margin`` (mean chosen minus rejected reward).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to loss_type='sigmoid' only")

    chosen_ratio = policy_chosen_logps - ref_chosen_logps.detach()  # log pi/pi_ref on y_c
    rejected_ratio = policy_rejected_logps - ref_rejected_logps.detach()  # ... on y_r
    # h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        # L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    else:
        # L = (h - 1 / (2 beta))^2   -- regresses the margin to a finite target
        losses = (h - 1 / (2 * beta)) ** 2
    loss = losses.mean()

    with torch.no_grad():
        chosen_rewards = beta * chosen_ratio
        rejected_rewards = beta * rejected_ratio
        stats = {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean().item(),
        }
    return loss, stats
