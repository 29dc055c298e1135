"""The ``eval`` section: how a method evaluates on its held-out split, and the checkpoint ``palaestra eval``
evaluates."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from palaestra.config.errors import check

__all__ = ["CheckpointEval", "EvalConfig", "GenerationEval", "SampledEval", "validate_eval"]


@dataclass
class CheckpointEval:
    """``palaestra eval`` of a trained run."""

    checkpoint: Optional[str] = None
    """palaestra eval: a checkpoint (or run folder) whose trained weights to evaluate."""


@dataclass
class GenerationEval(CheckpointEval):
    """Greedy generations on the held-out split, in batches (ppo)."""

    max_new_tokens: Optional[int] = None
    """Completion budget; None uses algo.max_completion_length."""
    batch_size: int = 64
    """Sequences generated together."""
    max_examples: int = 0
    """Evaluate on the first N test examples (0: all)."""


@dataclass
class SampledEval(CheckpointEval):
    """Greedy or sampled plays of the held-out problems (at_grpo's team evaluation)."""

    num_samples: int = 1
    """Samples per question (n for pass@k); 1 with greedy is plain accuracy."""
    greedy: bool = True
    """Greedy decoding (num_samples must be 1) or sampling."""
    temperature: float = 0.7
    """Sampling temperature when greedy is false."""
    top_p: float = 0.95
    """Nucleus threshold when greedy is false."""
    top_k: int = 50
    """Top-k when greedy is false (0 disables)."""
    max_new_tokens: Optional[int] = None
    """Completion budget; None uses algo.max_completion_length."""


@dataclass
class EvalConfig(SampledEval):
    """Evaluation on the held-out split of a task (grpo): greedy accuracy, or pass@k of samples."""

    pass_k: list = field(default_factory=lambda: [1])
    """The k values of pass@k to report (each <= num_samples)."""
    batch_size: int = 64
    """Sequences generated together."""
    max_examples: int = 0
    """Evaluate on the first N test examples (0: all)."""


def validate_eval(ev: CheckpointEval) -> None:
    check(ev.checkpoint is None or os.path.exists(ev.checkpoint),
          f"eval.checkpoint={ev.checkpoint} does not exist; point it at a run folder or one of its checkpoints/step-* folders")
    if isinstance(ev, SampledEval):
        check(ev.num_samples >= 1, f"eval.num_samples={ev.num_samples} must be >= 1")
        check(not (ev.greedy and ev.num_samples > 1),
              f"eval.num_samples={ev.num_samples} needs eval.greedy=false (greedy samples are all the same)")
    if isinstance(ev, EvalConfig):
        for k in ev.pass_k:
            check(isinstance(k, int) and 1 <= k <= ev.num_samples,
                  f"eval.pass_k has k={k}; each k must be in [1, eval.num_samples={ev.num_samples}]")
    if isinstance(ev, (EvalConfig, GenerationEval)):
        check(ev.batch_size > 0, f"eval.batch_size={ev.batch_size} must be positive")
        check(ev.max_examples >= 0, f"eval.max_examples={ev.max_examples} must be >= 0")
