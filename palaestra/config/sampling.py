"""The ``algo`` keys the policy-gradient methods share: how the policy samples in training (grpo, at_grpo,
ppo) and the clipped group-relative objective (grpo, at_grpo). Each method's ``algo`` section is made of
these plus its own keys, with its own defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from palaestra.config.choices import LOSS_TYPES, SCALE_REWARDS
from palaestra.config.errors import check, one_of

__all__ = ["ClippedObjective", "SamplingSettings", "validate_objective", "validate_sampling"]


@dataclass
class SamplingSettings:
    """How the policy samples its completions in training."""

    max_prompt_length: int = 256
    """Prompts longer than this many tokens are truncated from the left."""
    max_completion_length: int = 96
    """Maximum new tokens per completion."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k sampling (0 disables)."""


@dataclass
class ClippedObjective:
    """The clipped importance-ratio objective on group-relative advantages, with an optional KL penalty."""

    beta: float = 0.0
    """Weight of the k3 KL penalty to the reference model (the base with the adapter off); 0 skips the
    reference pass entirely."""
    epsilon: float = 0.2
    """Lower clipping range of the importance ratio."""
    epsilon_high: Optional[float] = None
    """Upper clipping range (DAPO clip-higher); None uses epsilon."""
    loss_type: str = "grpo"
    """Loss normalisation: grpo, dr_grpo, dapo or bnpo."""
    scale_rewards: str = "group"
    """Advantage scaling: group (std per group), batch (std of the batch) or none."""


def validate_sampling(sampling: SamplingSettings) -> None:
    check(sampling.max_prompt_length > 0, f"algo.max_prompt_length={sampling.max_prompt_length} must be positive")
    check(sampling.max_completion_length > 0,
          f"algo.max_completion_length={sampling.max_completion_length} must be positive")
    check(sampling.temperature > 0, f"algo.temperature={sampling.temperature} must be > 0")
    check(0 < sampling.top_p <= 1, f"algo.top_p={sampling.top_p} must be in (0, 1]")
    check(sampling.top_k >= 0, f"algo.top_k={sampling.top_k} must be >= 0")


def validate_objective(objective: ClippedObjective) -> None:
    check(objective.beta >= 0, f"algo.beta={objective.beta} must be >= 0")
    check(objective.epsilon > 0, f"algo.epsilon={objective.epsilon} must be > 0")
    check(objective.epsilon_high is None or objective.epsilon_high > 0,
          f"algo.epsilon_high={objective.epsilon_high} must be > 0")
    one_of("algo.loss_type", objective.loss_type, LOSS_TYPES)
    one_of("algo.scale_rewards", objective.scale_rewards, SCALE_REWARDS)
