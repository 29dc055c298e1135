"""Where and how a run computes: its device, its seeds and CPU threads, and a timer for the per-step breakdown."""

from __future__ import annotations

import random
import time
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["seed_everything", "timed", "training_device"]


def training_device(choice: str = "auto", dist=None) -> str:
    """``train.device`` as a torch device: auto is a CUDA GPU when torch sees one, else the CPU; with several
    processes (``dist``), this process's own GPU."""
    if dist is not None and dist.enabled:
        return dist.device(choice)
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def seed_everything(seed: int, threads: int = 0) -> None:
    """Seed python, numpy and torch; ``threads`` > 0 also sets torch's CPU threads."""
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def timed(timings: dict[str, float], name: str):
    """Add the wall time of the block to ``timings[name]`` (the per-step breakdown)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
