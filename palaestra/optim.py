"""The optimizer every method uses: AdamW with linear warmup then cosine (or constant), and gradient clipping."""

from __future__ import annotations

import math

import torch

__all__ = ["LRSchedule", "adamw", "clip_gradients", "fit_schedule", "lr_lambda", "optimizer_step"]


class LRSchedule:
    """The learning-rate factor of optimizer update ``update``: linear warmup over ``warmup_ratio`` of the
    ``total`` updates, then cosine to 0 (or constant).

    A callable object rather than a closure: its ``total`` may change during the run (a time budget fitting
    the step count to the machine, :class:`palaestra.recipes.run.Run`), and ``LambdaLR`` saves and restores an
    object's attributes with its state, so a resumed run continues the same schedule.

    >>> schedule = LRSchedule(total=4, warmup_ratio=0.0, schedule="cosine")
    >>> [round(schedule(u), 3) for u in range(5)]
    [1.0, 0.854, 0.5, 0.146, 0.0]
    >>> schedule.total = 2  # fitted to fewer updates: the same curve, compressed
    >>> [round(schedule(u), 3) for u in range(3)]
    [1.0, 0.5, 0.0]
    """

    def __init__(self, total: int, warmup_ratio: float, schedule: str):
        self.total, self.warmup_ratio, self.schedule = total, warmup_ratio, schedule

    def __call__(self, update: int) -> float:
        warmup = int(self.total * self.warmup_ratio)
        if update < warmup:
            return (update + 1) / (warmup + 1)
        if self.schedule == "constant":
            return 1.0
        progress = (update - warmup) / max(1, self.total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_lambda(total: int, warmup_ratio: float, schedule: str) -> LRSchedule:
    """Linear warmup over warmup_ratio of the updates, then cosine to 0 (or constant)."""
    return LRSchedule(total, warmup_ratio, schedule)


def fit_schedule(scheduler, steps_before: int, steps_after: int) -> None:
    """Stretch or compress ``scheduler``'s :class:`LRSchedule` from ``steps_before`` to ``steps_after`` steps of
    the run (the updates per step stay as they were); the next update's learning rate follows at once."""
    factors = getattr(scheduler, "lr_lambdas", ())
    if steps_before <= 0 or not any(isinstance(factor, LRSchedule) for factor in factors):
        return
    for factor in factors:
        if isinstance(factor, LRSchedule):
            factor.total = round(factor.total * steps_after / steps_before)
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, factors):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def clip_gradients(parameters: list, max_norm: float) -> float:
    """Clip the gradients of ``parameters`` to a global norm of ``max_norm`` (0: leave them) and return their norm
    before clipping (of the whole parameters when they are sharded)."""
    if _sharded(parameters):  # the norm of DTensor gradients is a DTensor to gather; inf leaves them as they are
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    norms = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def adamw(params, train, total_updates: int):
    """(AdamW over ``params`` (tensors or param groups) with the ``train`` section's settings, its
    schedule: linear warmup then cosine or constant over ``total_updates`` optimizer updates)."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    # the fused kernel (one pass over all parameters) steps a 22M-parameter encoder in a fifth of the time
    # of the per-tensor loop on a CPU; it needs floating-point parameters on a CPU or a GPU
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                                  weight_decay=train.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_updates, train.warmup_ratio, train.lr_schedule))
    return optimizer, scheduler


def optimizer_step(parameters: list, optimizer, scheduler, max_grad_norm: float, dist=None) -> float:
    """One update from the accumulated gradients: with several processes (``dist``, a
    :class:`palaestra.distributed.Distributed`), their sum over the ranks (sharded parameters' gradients are
    summed by their backward already); then clipped by global norm (0: no clipping), the optimizer and its
    schedule stepped. Returns the gradient norm before clipping."""
    if dist is not None and not _sharded(parameters):
        dist.sum_gradients(parameters)
    grad_norm = clip_gradients(parameters, max_grad_norm)
    optimizer.step()
    scheduler.step()
    return grad_norm


def _sharded(parameters: list) -> bool:
    """True when the parameters are FSDP shards (DTensors)."""
    return any(hasattr(p, "full_tensor") for p in parameters)
