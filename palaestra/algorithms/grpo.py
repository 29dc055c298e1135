"""The math of GRPO: group-relative advantages, the clipped policy loss and its helpers.

Every function here is pure (tensors in, tensors out) so the recipes can show their loop in plain
view and the tests can check each equation with numbers worked by hand. Shapes use B for the number
of completions, T for completion tokens and V for the vocabulary size.

The loss follows GRPO (Shao et al., 2024, arXiv:2402.03300) with the reductions of its
successors: ``bnpo``, Dr. GRPO (Liu et al., 2025, arXiv:2503.20783) and DAPO (Yu et al., 2025,
arXiv:2503.14476), whose asymmetric ``epsilon_high`` ("clip-higher") is also supported; and the
objectives that replace the clipped surrogate: CISPO (MiniMax-M1, 2025, arXiv:2506.13585: a clipped,
stop-gradient importance weight on a REINFORCE term) and SAPO (Gao et al., 2025, arXiv:2511.20347: a
sigmoid gate in place of the hard clip). GSPO (Zheng et al., 2025, arXiv:2507.18071) takes the
importance ratio per sequence, the geometric mean of its tokens' ratios (``importance_sampling_level``).
The advantages are GRPO's group-relative ones, RLOO's leave-one-out baseline (Ahmadian et al., 2024,
arXiv:2402.14740) or REINFORCE++'s group baseline normalised over the batch (Hu et al., 2025,
arXiv:2501.03262).
"""

from __future__ import annotations

import torch
from torch import Tensor

from palaestra.algorithms.logprob_math import entropy_from_logits, masked_mean, selective_log_softmax  # noqa: F401 - re-exported
from palaestra.config.choices import ADVANTAGE_ESTIMATORS, IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, SCALE_REWARDS

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "IMPORTANCE_SAMPLING_LEVELS",
    "LOSS_TYPES",
    "SCALE_REWARDS",
    "accumulated_loss",
    "distillation_advantages",
    "entropy_bonus",
    "entropy_from_logits",
    "group_advantages",
    "informative_groups",
    "k3_kl",
    "keep_first",
    "masked_mean",
    "overlong_penalty",
    "policy_loss",
    "selective_log_softmax",
]


def _std(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased std (as TRL uses), but 0 rather than NaN when there is a single sample."""
    count = x.numel() if dim is None else x.shape[dim]
    if count < 2:
        return torch.zeros_like(x.sum() if dim is None else x.sum(dim))
    return x.std() if dim is None else x.std(dim=dim)


def group_advantages(
    rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, estimator: str = "grpo"
) -> Tensor:
    """Advantages of completions sampled in groups (each group the answers to one prompt).

    Args:
        rewards: [B], laid out as consecutive groups of ``group_size`` (B % group_size == 0).
        group_size: answers per prompt (G).
        scale: "group" divides by the group's std, "batch" by the whole batch's std,
            "none" does not divide (Dr. GRPO: std scaling biases towards easy/hard prompts).
            REINFORCE++ normalises over the batch itself and reads no ``scale``.
        eps: added to the std so zero-variance groups give 0, not NaN.
        estimator: "grpo": each reward less its group's mean; "rloo": less the mean of the *other* answers
            in its group, ``G / (G - 1)`` times GRPO's; "reinforce_pp": less its group's mean, then the
            batch's mean taken off and divided by the batch's std.

    Returns:
        [B] advantages.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {SCALE_REWARDS}, got {scale!r}")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) must be a multiple of group_size ({group_size})"
        )
    rewards = rewards.float() if not rewards.is_floating_point() else rewards
    grouped = rewards.reshape(-1, group_size)  # [B / G, G]
    # A_i = r_i - mean(r_group)                            (grpo, reinforce_pp)
    # A_i = r_i - mean(r_j, j != i) = G / (G - 1) * (r_i - mean(r_group))   (rloo; 0 for a group of one)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if estimator == "rloo":
        advantages = advantages * (group_size / (group_size - 1) if group_size > 1 else 0.0)
    if estimator == "reinforce_pp":
        # A = (A - mean(A_batch)) / (std(A_batch) + eps)
        flat = advantages.reshape(-1)
        return (flat - flat.mean()) / (_std(flat) + eps)
    # A_i = A_i / (std(r_group) + eps)      ("group")
    # A_i = A_i / (std(r_batch) + eps)      ("batch")
    if scale == "group":
        advantages = advantages / (_std(grouped, dim=1).unsqueeze(1) + eps)
    elif scale == "batch":
        advantages = advantages / (_std(rewards) + eps)
    return advantages.reshape(-1)


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[B / G] True for each group whose rewards are not all equal: the groups with an advantage to learn from
    (DAPO's dynamic sampling drops the others).

    >>> informative_groups(torch.tensor([1., 1., 0., 1., 0., 0.]), 2).tolist()
    [False, True, False]
    """
    grouped = rewards.reshape(-1, group_size)
    return grouped.max(dim=1).values > grouped.min(dim=1).values


def keep_first(flags: Tensor, count: int) -> Tensor:
    """``flags`` with only its first ``count`` true entries kept (a batch topped up to ``count`` in draw order).

    >>> keep_first(torch.tensor([True, False, True, True]), 2).tolist()
    [True, False, True, False]
    """
    return flags & (torch.cumsum(flags.long(), dim=0) <= count)


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al., 2025, arXiv:2503.14476, eq. 13): a reward term that falls
    linearly from 0 to -1 over the last ``buffer`` tokens of the ``max_length`` budget.

    Args:
        lengths: [B] completion lengths in tokens.
        max_length: the generation budget, L_max.
        buffer: the soft band, L_cache (0: no band, only a completion past the budget is punished).

    Returns:
        [B] penalties: 0 up to L_max - L_cache, (L_max - L_cache - L) / L_cache inside the band, -1 past L_max.

    >>> overlong_penalty(torch.tensor([70, 80, 90, 100, 101]), max_length=100, buffer=20).tolist()
    [0.0, 0.0, -0.5, -1.0, -1.0]
    """
    lengths = lengths.float()
    start = max_length - buffer
    inside = (start - lengths) / buffer if buffer else torch.zeros_like(lengths)
    return torch.where(lengths <= start, torch.zeros_like(lengths), torch.where(lengths <= max_length, inside, -torch.ones_like(lengths)))


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || reference) (Schulman, "Approximating KL divergence").

    Args:
        logp: [B, T] policy log-probs of the sampled tokens.
        ref_logp: [B, T] reference-model log-probs of the same tokens.

    Returns:
        [B, T], non-negative, 0 where the two agree.
    """
    # k3 = exp(ref - logp) - (ref - logp) - 1   (unbiased, and >= 0 since e^x >= 1 + x)
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def distillation_advantages(advantages: Tensor, student_logp: Tensor, teacher_logp: Tensor, *, reward_coef: float = 1.0,
                            teacher_coef: float = 1.0) -> Tensor:
    """Per-token advantages [B, T] of on-policy distillation: the student samples, a teacher scores the sampled
    tokens, and each token's advantage is the negative of its per-token reverse-KL estimate, optionally mixed
    with the task's group advantage (Agarwal et al. arXiv:2306.13649; Thinking Machines, "On-Policy
    Distillation", 2025).

    Args:
        advantages: [B] the task's advantage of each completion (:func:`group_advantages`).
        student_logp: [B, T] the sampling policy's log-probs of its tokens.
        teacher_logp: [B, T] the teacher's log-probs of the same tokens.
        reward_coef: weight of the task's advantage (0: pure distillation).
        teacher_coef: weight of the teacher's term.

    Returns:
        [B, T] ``reward_coef * A_b + teacher_coef * (teacher_logp - student_logp)``, detached: the sampled-token
        estimate of -KL(student || teacher) at each token, so that the policy gradient lowers the reverse KL.

    >>> distillation_advantages(torch.tensor([1.0, -1.0]), torch.tensor([[-1.0, -2.0], [-0.5, -0.5]]),
    ...                         torch.tensor([[-0.5, -3.0], [-0.5, -1.5]]), reward_coef=0.5, teacher_coef=2.0)
    tensor([[ 1.5000, -1.5000],
            [-0.5000, -2.5000]])
    """
    # A_bt = c_r * A_b - c_t * (log pi_student - log pi_teacher)
    reverse_kl = student_logp.detach() - teacher_logp.detach()
    return reward_coef * advantages.detach().unsqueeze(1) - teacher_coef * reverse_kl


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "grpo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: int | Tensor | None = None,
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The policy-gradient loss of a batch of completions, with an optional k3 KL penalty.

    Args:
        logp: [B, T] log-probs of the completion tokens under the policy being trained.
        old_logp: [B, T] the same under the policy that sampled them (detached here).
        advantages: [B], one per completion, broadcast to its tokens, or [B, T], one per token (on-policy
            distillation: :func:`distillation_advantages`); detached here.
        mask: [B, T] 1 for real completion tokens, 0 for padding.
        loss_type: the objective and how token losses are reduced; one of ``LOSS_TYPES``: the clipped
            surrogate reduced per sequence (grpo), per batch token (bnpo), over B * max_completion_length
            (dr_grpo) or over the generation batch's tokens (dapo); cispo (reduced as dapo) or sapo
            (reduced as grpo).
        epsilon: lower clip range, ratio >= 1 - epsilon.
        epsilon_high: upper clip range, ratio <= 1 + epsilon_high; defaults to ``epsilon``. CISPO's cap on
            its importance weight (the weight itself, not 1 + it).
        beta: KL coefficient; needs ``ref_logp`` when > 0.
        ref_logp: [B, T] reference-model log-probs (detached here).
        max_completion_length: the generation limit; the ``dr_grpo`` denominator is B * this.
        num_items_in_batch: completion tokens in the whole generation batch (all gradient
            accumulation micro-batches); the ``dapo`` and ``cispo`` denominator. Defaults to this batch's count.
        importance_sampling_level: "token": one ratio per token; "sequence" (GSPO): one per completion,
            exp of the mean of its tokens' log-ratios, shared by its tokens.
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures for positive and negative
            advantages.
        token_weights: [B, T] weights of each token's policy-gradient term (not of the KL penalty): the
            mismatch correction of completions sampled by another engine
            (:func:`palaestra.algorithms.rollout_correction.correction_weights`, TRL's placement); None: 1.

    Returns:
        (scalar loss, stats) where stats are python floats: ``kl``, ``clip_ratio/low``,
        ``clip_ratio/high`` and ``clip_ratio/region`` (fractions of mask tokens; for CISPO the share whose
        weight the cap cut, as ``clip_ratio/high``; SAPO clips nothing).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (reference-model log-probs)")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    adv = advantages.detach()
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv  # [B, 1] broadcast over tokens, or [B, T]

    # log ratio = logp - old_logp                           (token: [B, T])
    # log ratio = sum_t (logp - old_logp) m / sum_t m       (sequence, GSPO: [B, 1])
    log_ratio = logp - old_logp.detach()
    if importance_sampling_level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, dim=1).unsqueeze(1)
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        # L_tok = -sg(min(ratio, eps_high)) * A * logp      (REINFORCE with a capped importance weight)
        per_token = -torch.clamp(ratio, max=epsilon_high).detach() * adv * logp
    elif loss_type == "sapo":
        # L_tok = -sigmoid(tau * (ratio - 1)) * 4 / tau * A,  tau = tau_pos if A > 0 else tau_neg
        # (a soft gate: its gradient is ratio's times 1 at ratio = 1, fading smoothly away from it)
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    else:
        # L_tok = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
        per_token = -torch.min(ratio * adv, clipped * adv)
    per_token = per_token.expand_as(logp)  # a sequence-level term is its tokens' each
    if token_weights is not None:  # L_tok *= w_t (the sampler's mismatch corrected; detached)
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    kl = None
    if beta > 0:
        kl = k3_kl(logp, ref_logp.detach())
        per_token = per_token + beta * kl

    # grpo, sapo:    mean_b( sum_t L * m / sum_t m )         (each sequence weighs the same)
    # bnpo:          sum_bt L * m / sum_bt m                 (each token in this batch weighs the same)
    # dr_grpo:       sum_bt L * m / (B * max_completion_length)
    # dapo, cispo:   sum_bt L * m / tokens in the whole generation batch
    if loss_type in ("grpo", "sapo"):
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif loss_type == "bnpo":
        loss = masked_mean(per_token, mask)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (logp.shape[0] * max_completion_length)
    else:
        total = mask.sum() if num_items_in_batch is None else num_items_in_batch
        total = torch.as_tensor(total, dtype=logp.dtype, device=logp.device)
        loss = (per_token * mask).sum() / total.clamp(min=1)

    with torch.no_grad():
        if loss_type == "cispo":
            low, high = torch.zeros_like(ratio, dtype=torch.bool), (ratio > epsilon_high) & (adv > 0)
        elif loss_type == "sapo":
            low = high = torch.zeros_like(ratio, dtype=torch.bool)
        else:
            low = (ratio < 1 - epsilon) & (adv < 0)
            high = (ratio > 1 + epsilon_high) & (adv > 0)
        low, high = low.expand_as(logp), high.expand_as(logp)
        stats = {
            "kl": masked_mean(kl, mask).item() if kl is not None else 0.0,
            "clip_ratio/low": masked_mean(low.to(mask.dtype), mask).item(),
            "clip_ratio/high": masked_mean(high.to(mask.dtype), mask).item(),
            "clip_ratio/region": masked_mean((low | high).to(mask.dtype), mask).item(),
        }
    return loss, stats


def entropy_bonus(entropy: Tensor, mask: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """A micro-batch's share of the entropy bonus: its tokens' entropies summed over the whole batch's tokens.

    The bonus is the mean per-token entropy of the whole batch (every micro-batch of every process), whatever the
    loss type, so ``entropy_coef`` means the same for every objective (TRL's ``entropy_coef``); the recipes take
    ``entropy_coef`` x this from each micro-batch's accumulated loss, so the summed gradients are those of the
    whole batch's mean.

    Args:
        entropy: [B, T] the policy's per-token entropy, with its gradient.
        mask: [B, T] 1 on the tokens that count.
        num_items_in_batch: the whole batch's counted tokens; None: this micro-batch's.

    Returns:
        Scalar ``sum_bt H m / num_items_in_batch``.

    >>> float(entropy_bonus(torch.tensor([[1.0, 3.0], [2.0, 9.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]), 6))
    1.0
    """
    mask = mask.to(entropy.dtype)
    total = mask.sum() if num_items_in_batch is None else num_items_in_batch
    total = torch.as_tensor(total, dtype=entropy.dtype, device=entropy.device)
    return (entropy * mask).sum() / total.clamp(min=1)


def accumulated_loss(loss: Tensor, *, loss_type: str, rows: int, total_rows: int) -> Tensor:
    """A micro-batch's :func:`policy_loss` scaled for gradient accumulation.

    Summing the gradients of every micro-batch's scaled loss (over the micro-batches of every
    data-parallel process) gives the gradient of the whole batch's loss in one process.

    Args:
        loss: the micro-batch's scalar loss.
        loss_type: the loss's reduction; one of ``LOSS_TYPES``.
        rows: completions in this micro-batch.
        total_rows: completions in the whole batch (every micro-batch of every process).

    Returns:
        The scaled scalar loss, for ``backward``.

    ``grpo`` and ``dr_grpo`` are means over rows, so each micro-batch weighs its share of the rows,
    ``rows / total_rows`` (1 / micro-batches when they are equal); ``bnpo`` weighs the same, and
    since its mean runs over the micro-batch's tokens it equals the whole batch's bnpo exactly when
    every micro-batch has the same tokens per row. ``dapo`` and ``cispo`` already divide by the whole
    batch's tokens (``num_items_in_batch``, every process's), so they are summed as they are; ``sapo`` is a
    mean over rows as ``grpo`` is.

    >>> float(accumulated_loss(torch.tensor(0.6), loss_type="grpo", rows=2, total_rows=8))
    0.15000000596046448
    >>> float(accumulated_loss(torch.tensor(0.6), loss_type="dapo", rows=2, total_rows=8))
    0.6000000238418579
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0 < rows <= total_rows:
        raise ValueError(f"a micro-batch of {rows} rows out of {total_rows}")
    if loss_type in ("dapo", "cispo"):
        return loss
    # loss * rows / total_rows, written as a division by the number of micro-batches of this size
    # in the batch: with equal micro-batches that is exactly loss / micro_batches
    return loss / (total_rows / rows)
