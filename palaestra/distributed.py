"""Data-parallel training on ``torch.distributed``: one process per device, launched by torchrun
or ``accelerate launch`` (gloo on CPU, NCCL on GPU).

Every rank draws the same step's prompts and keeps its own share; rollouts, rewards and the
forward/backward run locally; gradients are averaged across ranks before the optimizer step, so
every rank applies the same update and the models stay identical. Rank 0 logs and checkpoints.

    torchrun --nproc_per_node 2 -m palaestra.cli train train.batch_size=64
    accelerate launch --num_processes 8 -m palaestra.cli train model=hf model.path=...
"""

from __future__ import annotations

import os
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

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks (one flat all-reduce)."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        for parameter, averaged in zip(parameters, _unflatten_dense_tensors(flat, grads)):
            parameter.grad = averaged

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
