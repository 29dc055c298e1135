"""Log-prob math shared by every method: chosen-token log-probs, entropies, masked means.

Pure functions (tensors in, tensors out) used by the policy forwards (:mod:`palaestra.models.logprobs`,
:mod:`palaestra.models.value_head`) and the losses (GRPO, PPO). Shapes use B for rows, T for tokens
and V for the vocabulary size.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["entropy_from_logits", "masked_mean", "selective_log_softmax"]


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1.

    Args:
        values: any shape, e.g. [B, T].
        mask: same shape, 0/1 float or bool.
        dim: dimension to reduce; None reduces everything to a scalar.

    Returns:
        ``values`` reduced over ``dim``. An all-zero mask gives 0, not NaN.
    """
    # mean = sum(values * mask) / max(sum(mask), 1)
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """Log-probability of the chosen tokens, without a full [B, T, V] log-softmax.

    Args:
        logits: [B, T, V].
        index: [B, T] token ids.

    Returns:
        [B, T] with ``log_softmax(logits, -1)[b, t, index[b, t]]``; differentiable.
    """
    # log p(x) = z_x - logsumexp(z)
    if logits.dtype in (torch.float32, torch.float64):
        chosen = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        # One sequence at a time, so the temporaries of logsumexp are [T, V], never [B, T, V].
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return chosen - lse
    # float16 / bfloat16: z_x - logsumexp(z) loses precision; per-row log_softmax is more accurate.
    return torch.stack(
        [
            row.log_softmax(dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
            for row, idx in zip(logits, index)
        ]
    )


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Entropy of each next-token distribution, ``chunk_size`` rows of [V] at a time.

    Args:
        logits: [B, T, V].
        chunk_size: rows (B * T positions) processed together; bounds the peak memory.

    Returns:
        [B, T] entropies in nats.
    """
    # H = -sum_v p_v log p_v
    flat = logits.reshape(-1, logits.shape[-1])  # [B * T, V]
    entropies = []
    for chunk in flat.split(chunk_size):
        logp = chunk.float().log_softmax(dim=-1)
        entropies.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.cat(entropies).view(logits.shape[:-1]).to(logits.dtype)
