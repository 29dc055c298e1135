"""One GRPO optimizer update over micro-batches: the component GRPO and AT-GRPO both call.

The loop, top to bottom: zero the gradients; for every micro-batch, the policy's log-probs (with
the old policy's and the reference's, precomputed per micro-batch or computed by a callable), the
clipped loss of :func:`palaestra.algorithms.grpo.policy_loss`, scaled by
:func:`~palaestra.algorithms.grpo.accumulated_loss` so that the summed gradients are those of the
whole batch (every process's rows together), and its backward; then, with data parallelism, the
gradients summed over processes; then clipping, the optimizer step and the scheduler step. A process
may hold fewer rows than another, or none: the sum is still the whole batch's gradient.

What differs between the recipes stays with them: GRPO precomputes the old and reference
log-probs of every micro-batch before its ``num_iterations`` updates (lists), AT-GRPO computes the
reference per micro-batch with the policy's adapter switched off (a callable); GRPO always logs the
entropy (its log-prob callable returns it), AT-GRPO only when its entropy bonus is on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from palaestra.algorithms.grpo import accumulated_loss, distillation_advantages, entropy_bonus, policy_loss
from palaestra.algorithms.logprob_math import masked_mean
from palaestra.algorithms.rollout_correction import correction_weights
from palaestra.distributed import Distributed
from palaestra.models.logprobs import batch_logprobs
from palaestra.models.precision import autocast
from palaestra.optim import optimizer_step
from palaestra.runtime import timed

__all__ = ["micro_batch_logprobs", "policy_update"]

# log-probs [b, T] of a micro-batch's completions under the policy and their entropies [b, T] (or None)
LogprobsFn = Callable[[slice], tuple[Tensor, Tensor | None]]
# per-micro-batch log-probs [b, T] of another policy: one tensor per micro-batch, in the order of
# ``slices``, or a callable of the micro-batch's rows
PerMicroBatch = Sequence[Tensor] | Callable[[slice], Tensor] | None


def policy_update(
    optimizer: torch.optim.Optimizer,
    scheduler,
    parameters: list[torch.nn.Parameter],
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    slices: Sequence[slice],
    logprobs: LogprobsFn,
    old_logps: PerMicroBatch = None,
    ref_logps: PerMicroBatch = None,
    teacher_logps: PerMicroBatch = None,
    sampler_logps: PerMicroBatch = None,
    correction: str = "none",
    correction_cap: float = 2.0,
    teacher_coef: float = 1.0,
    reward_coef: float = 1.0,
    max_completion_length: int | None = None,
    max_grad_norm: float = 0.0,
    dist: Distributed | None = None,
    timings: dict[str, float] | None = None,
    **objective,
) -> tuple[dict[str, float], float]:
    """One optimizer update of ``parameters`` on this process's batch, accumulated over ``slices``.

    Args:
        optimizer, scheduler: stepped once, after the last micro-batch.
        parameters: the trainable parameters (gradients summed over processes, then clipped).
        advantages: [B] one per completion of this process's batch.
        loss_mask: [B, T] 1 on the completion tokens that count in the loss.
        slices: the micro-batches, as row slices of the batch (they may differ in size; none when this
            process holds no completions).
        logprobs: ``logprobs(rows) -> (logp [b, T], entropy [b, T] or None)`` under the policy
            being trained (with gradients; the entropy with its gradient too when ``entropy_coef`` > 0).
        old_logps: the sampling policy's log-probs per micro-batch; None: the policy itself,
            detached (one update per rollout batch: the ratio is 1).
        ref_logps: the reference's log-probs per micro-batch; needed when ``beta`` > 0.
            A callable is called before the policy's forward of the same micro-batch.
        teacher_logps: a teacher's log-probs per micro-batch (on-policy distillation); each token's advantage is
            then :func:`~palaestra.algorithms.grpo.distillation_advantages` of ``advantages`` and the
            teacher's and the sampling policy's log-probs, with ``reward_coef`` and ``teacher_coef``.
        sampler_logps: the log-probs the rollout engine reported for the sampled tokens, per micro-batch, when
            another engine sampled them (a server, vLLM); with ``correction`` (a mode of
            :data:`~palaestra.algorithms.rollout_correction.CORRECTION_MODES`) and ``correction_cap`` each
            token's policy-gradient term is weighted by the capped trainer / sampler ratio
            (:func:`~palaestra.algorithms.rollout_correction.correction_weights`); the gap is logged either way.
        max_completion_length, objective: the loss (:func:`~palaestra.algorithms.grpo.policy_loss`'s
            ``loss_type``, ``epsilon``, ``epsilon_high``, ``beta``, ``importance_sampling_level``, ...; its defaults
            where not given), and ``entropy_coef``: the weight of the entropy bonus
            (:func:`~palaestra.algorithms.grpo.entropy_bonus`; the entropies then come with their gradient).
        max_grad_norm: clip the gradients' norm to this; 0: no clipping (the norm is still measured).
        dist: data parallelism; the rows and the dapo denominator count every process's and the
            gradients are summed over them. None: one process.
        timings: when given, the wall time of ``policy_forward_backward`` and ``optimizer`` is added.

    Returns:
        (stats, grad_norm): stats are ``loss``, ``kl``, ``clip_ratio/low``, ``clip_ratio/high``,
        ``clip_ratio/region``, when ``logprobs`` gives entropies ``entropy``, and with a teacher
        ``distill/reverse_kl`` (the mean over tokens of the sampled-token estimate), with ``sampler_logps``
        the ``rollout/...`` mismatch figures: of the whole batch (every process's), each micro-batch weighing
        its share of the rows (the ``/max`` figures: the largest); grad_norm is the norm before clipping.
    """
    dist = dist or Distributed()
    batch = loss_mask.shape[0]
    sizes = [len(range(*rows.indices(batch))) for rows in slices]
    total_rows = int(dist.totals(sum(sizes))[0])  # every process's rows
    if total_rows == 0:
        raise ValueError("policy_update needs at least one completion (on some process)")
    num_items = dist.sum(loss_mask.sum()).clamp(min=1)  # dapo's denominator: every process's tokens
    entropy_coef = objective.pop("entropy_coef", 0.0)
    clock = (lambda name: timed(timings, name)) if timings is not None else (lambda name: nullcontext())
    optimizer.zero_grad(set_to_none=True)
    totals = {"loss": 0.0, "kl": 0.0, "clip_ratio/low": 0.0, "clip_ratio/high": 0.0, "clip_ratio/region": 0.0}
    maxima: dict[str, float] = {}
    for index, (rows, size) in enumerate(zip(slices, sizes)):
        with clock("policy_forward_backward"):
            old = _micro_batch(old_logps, index, rows)
            ref = _micro_batch(ref_logps, index, rows)
            teacher = _micro_batch(teacher_logps, index, rows)
            sampled = _micro_batch(sampler_logps, index, rows)
            logp, entropy = logprobs(rows)
            mask = loss_mask[rows]
            old_policy = old if old is not None else logp.detach()
            micro_advantages = advantages[rows].to(logp.device)
            if teacher is not None:
                micro_advantages = distillation_advantages(micro_advantages, old_policy, teacher, reward_coef=reward_coef,
                                                           teacher_coef=teacher_coef)
            weights = None
            if sampled is not None:  # another engine sampled: its mismatch measured, and corrected when asked
                weights, mismatch = correction_weights(old_policy, sampled.to(logp.device), mask,
                                                       mode=correction if correction != "none" else "token_truncate",
                                                       cap=correction_cap)
                weights = weights if correction != "none" else None
            loss, loss_stats = policy_loss(
                logp, old_policy, micro_advantages, mask, ref_logp=ref, max_completion_length=max_completion_length,
                num_items_in_batch=num_items, token_weights=weights, **objective,
            )
            scaled = accumulated_loss(loss, loss_type=objective.get("loss_type", "grpo"), rows=size, total_rows=total_rows)
            if entropy_coef > 0:  # L -= c * (the whole batch's mean token entropy), this micro-batch's share of it
                if entropy is None:
                    raise ValueError("entropy_coef > 0 needs the policy's entropies: a logprobs callable that returns them")
                scaled = scaled - entropy_coef * entropy_bonus(entropy, mask, num_items)
            scaled.backward()
        share = size / total_rows  # the stats weigh each micro-batch's share of the rows
        totals["loss"] += float(scaled.detach())
        if entropy is not None:
            totals["entropy"] = totals.get("entropy", 0.0) + float(masked_mean(entropy.detach(), mask)) * share
        if teacher is not None:
            reverse_kl = float(masked_mean(old_policy - teacher, mask))
            totals["distill/reverse_kl"] = totals.get("distill/reverse_kl", 0.0) + reverse_kl * share
        if sampled is not None:
            for key, value in mismatch.items():
                if key.endswith("/max"):
                    maxima[key] = max(maxima.get(key, 0.0), value)
                else:
                    totals[key] = totals.get(key, 0.0) + value * share
        for key, value in loss_stats.items():
            totals[key] += value * share
    if dist.enabled:  # the whole batch's figures: every process's shares added up
        for key in ("entropy", "distill/reverse_kl", "rollout/logprob_gap/mean", "rollout/is_ratio/mean",
                    "rollout/is_capped_share"):  # a process with no rows still sends its zero share
            if dist.any(key in totals):
                totals.setdefault(key, 0.0)
        totals = dict(zip(totals, dist.totals(*totals.values())))
        if dist.any(bool(maxima)):
            every = dist.gather_objects([maxima])
            maxima = {key: max(m.get(key, 0.0) for m in every) for key in set().union(*every)}
    totals.update(maxima)
    with clock("optimizer"):
        grad_norm = optimizer_step(parameters, optimizer, scheduler, max_grad_norm, dist)
    return totals, grad_norm


def micro_batch_logprobs(model, batch, rows: slice, temperature: float, shared_rows: int, precision: str,
                         with_entropy: bool = False, chunk_tokens: int = 0,
                         entropy_gradient: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs [b, T] (and entropies, or None) of the completions of ``batch`` (a
    :class:`~palaestra.rollout.hf.Rollout`) in ``rows``, at the training ``precision``: packed, each
    run of ``shared_rows`` rows sharing one prompt computed once, or ``shared_rows`` 0: the plain
    padded batch (:func:`~palaestra.models.logprobs.batch_logprobs`); ``chunk_tokens`` > 0: the LM head in
    chunks of that many tokens (``train.logprob_chunk_tokens``); ``entropy_gradient``: the entropies keep
    their gradient (``algo.entropy_coef`` > 0)."""
    tensors = (batch.prompt_ids[rows], batch.prompt_mask[rows], batch.completion_ids[rows], batch.completion_mask[rows])
    with autocast(precision, next(model.parameters()).device.type):
        return batch_logprobs(model, *tensors, shared_rows, temperature=temperature, with_entropy=with_entropy,
                              chunk_tokens=chunk_tokens, entropy_gradient=entropy_gradient)


def _micro_batch(source: PerMicroBatch, index: int, rows: slice) -> Tensor | None:
    if source is None:
        return None
    return source(rows) if callable(source) else source[index]
