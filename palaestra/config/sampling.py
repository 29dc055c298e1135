"""The ``algo`` keys the policy-gradient methods share: how the policy samples in training (grpo, at_grpo,
ppo) and the clipped group-relative objective (grpo, at_grpo). Each method's ``algo`` section is made of
these plus its own keys, with its own defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from palaestra.config.choices import ADVANTAGE_ESTIMATORS, IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, SCALE_REWARDS
from palaestra.config.errors import check, one_of

__all__ = ["ClippedObjective", "SamplingSettings", "objective_settings", "validate_objective", "validate_sampling"]


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
    """Upper clipping range (DAPO clip-higher, arXiv:2503.14476); None uses epsilon. With loss_type=cispo: the cap
    on the importance weight itself (the CISPO paper uses 5; None then means 1 + epsilon)."""
    loss_type: str = "grpo"
    """The objective and its normalisation: grpo (clipped surrogate, mean per sequence), bnpo (per token of the
    batch), dr_grpo (over completions x max_completion_length, arXiv:2503.20783), dapo (over the step's tokens,
    arXiv:2503.14476), cispo (REINFORCE with a clipped stop-gradient importance weight, normalised as dapo,
    MiniMax-M1 arXiv:2506.13585) or sapo (a sigmoid gate in place of the clip, mean per sequence,
    arXiv:2511.20347)."""
    importance_sampling_level: str = "token"
    """token: one importance ratio per token; sequence: one per completion, the geometric mean of its tokens'
    ratios (GSPO, arXiv:2507.18071; pair it with a narrow range such as epsilon=3e-4, epsilon_high=4e-4)."""
    sapo_temperature_pos: float = 1.0
    """SAPO's gate temperature for completions with a positive advantage (higher: a sharper gate)."""
    sapo_temperature_neg: float = 1.05
    """SAPO's gate temperature for completions with a negative advantage."""
    advantage: str = "grpo"
    """Advantage estimator: grpo (each reward less its group's mean, then algo.scale_rewards), rloo (less the
    mean of the group's other answers, arXiv:2402.14740, then algo.scale_rewards) or reinforce_pp (less the
    group's mean, then normalised over the whole batch, REINFORCE++ arXiv:2501.03262; algo.scale_rewards
    unused)."""
    scale_rewards: str = "group"
    """Advantage scaling: group (std per group), batch (std of the batch) or none."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus (Williams & Peng 1991): the loss less entropy_coef x the step's mean per-token
    policy entropy, whatever the loss type (TRL's entropy_coef); 0: off. The logged ``entropy`` is that mean."""


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
    one_of("algo.importance_sampling_level", objective.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    one_of("algo.advantage", objective.advantage, ADVANTAGE_ESTIMATORS)
    one_of("algo.scale_rewards", objective.scale_rewards, SCALE_REWARDS)
    check(objective.entropy_coef >= 0, f"algo.entropy_coef={objective.entropy_coef} must be >= 0")
    for key in ("sapo_temperature_pos", "sapo_temperature_neg"):
        check(getattr(objective, key) > 0, f"algo.{key}={getattr(objective, key)} must be > 0")


def objective_settings(objective: ClippedObjective) -> dict:
    """The loss's keyword arguments (:func:`palaestra.algorithms.grpo.policy_loss`) from the ``algo`` section."""
    epsilon_high = objective.epsilon_high
    if objective.loss_type == "cispo" and epsilon_high is None:
        epsilon_high = 1 + objective.epsilon  # CISPO caps the weight itself: the surrogate's upper clip
    return {"loss_type": objective.loss_type, "epsilon": objective.epsilon, "epsilon_high": epsilon_high,
            "beta": objective.beta, "importance_sampling_level": objective.importance_sampling_level,
            "sapo_temperature_pos": objective.sapo_temperature_pos, "sapo_temperature_neg": objective.sapo_temperature_neg,
            "entropy_coef": objective.entropy_coef}
