"""Data-parallel training on ``torch.distributed``: one process per device, launched by torchrun
or ``accelerate launch`` (gloo on CPU, NCCL on GPU).

Every rank draws the same step's items (prompts, sequences, pairs, texts) and keeps its own share;
rollouts, rewards and the forward/backward run locally; each rank scales its loss by its share of the
whole step's denominator (items or tokens, summed over the ranks), and the gradients are summed across
ranks before the optimizer step, so every rank applies the update one process would make on the whole
step and the models stay identical. Rank 0 logs and checkpoints.

    torchrun --nproc_per_node 2 -m palaestra.cli train algo=sft
    accelerate launch --multi_gpu --num_processes 8 -m palaestra.cli train model=hf model.path=...
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass
class Distributed:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Distributed":
        """Join the process group that torchrun / accelerate describe in the environment, if any."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def device(self, choice: str = "auto") -> str:
        """This process's device: its own GPU, unless ``choice`` (``train.device``) is cpu or there is none."""
        return f"cuda:{self.local_rank}" if choice != "cpu" and torch.cuda.is_available() else "cpu"

    def share(self, items: list) -> list:
        """This rank's contiguous share of a list whose length the world size divides."""
        if len(items) % self.world:
            raise ValueError(f"{len(items)} items cannot be split evenly over {self.world} processes")
        size = len(items) // self.world
        return items[self.rank * size : (self.rank + 1) * size]

    def split(self, items: Sequence) -> list:
        """This rank's contiguous block of ``items``, any length: the blocks differ by at most one item, in
        rank order (a rank gets none when there are fewer items than ranks)."""
        start, end = len(items) * self.rank // self.world, len(items) * (self.rank + 1) // self.world
        return list(items[start:end])

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its sum over the ranks (one flat all-reduce): the whole step's gradient when
        each rank scaled its loss by its share of the step's denominator. A rank without a gradient adds zeros."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for parameter, summed in zip(parameters, _unflatten_dense_tensors(flat, grads)):
            parameter.grad = summed

    def totals(self, *values: float) -> tuple[float, ...]:
        """Each of ``values`` summed over the ranks (one all-reduce, in float64): counts, loss sums."""
        if not self.enabled:
            return tuple(float(v) for v in values)
        summed = self.sum(torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device()))
        return tuple(float(v) for v in summed.tolist())

    def broadcast_parameters(self, parameters: list[torch.nn.Parameter]) -> None:
        """Rank 0's values of ``parameters`` on every rank (weights initialised at random start the same everywhere)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for parameter in parameters:
                dist.broadcast(parameter.data, src=0)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over the ranks."""
        if not self.enabled:
            return value
        total = value.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """The ranks' tensors concatenated in rank order (same shape on every rank)."""
        if not self.enabled:
            return value
        parts = [torch.empty_like(value) for _ in range(self.world)]
        dist.all_gather(parts, value.contiguous())
        return torch.cat(parts)

    def gather_rows(self, value: torch.Tensor) -> torch.Tensor:
        """The ranks' tensors concatenated in rank order along the first dimension, which may differ between
        ranks (the blocks of :meth:`split`); the other dimensions must agree."""
        if not self.enabled:
            return value
        sizes = self.gather(torch.tensor([value.shape[0]], device=value.device)).tolist()
        if max(sizes) == 0:
            return value
        padded = torch.zeros((max(sizes), *value.shape[1:]), dtype=value.dtype, device=value.device)
        padded[: value.shape[0]] = value
        parts = self.gather(padded).split(max(sizes))
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def gather_objects(self, items: list) -> list:
        """The ranks' lists (any picklable items: texts, records) concatenated in rank order."""
        if not self.enabled:
            return list(items)
        parts: list = [None] * self.world
        dist.all_gather_object(parts, list(items))
        return [item for part in parts for item in part]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank (stop signals, budgets)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()
