"""The reward model's settings: the whole config of ``palaestra train algo=reward`` (the recipe:
:mod:`palaestra.recipes.reward_model`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from palaestra.config.data import PairData
from palaestra.config.errors import check
from palaestra.config.model import ModelConfig
from palaestra.config.run import EpochBudget, PairTrain
from palaestra.config.tracking import RegisteredTracking

__all__ = ["RewardModelAlgo", "RewardModelConfig", "validate_reward"]


@dataclass
class RewardModelAlgo(EpochBudget):
    """A reward model: a sequence-classification head on the policy's architecture, trained on preference pairs."""

    name: str = "reward"
    """Algorithm name (recipe)."""
    margin: float = 0.0
    """Bradley-Terry margin: the chosen reward must beat the rejected one by this much."""
    center_rewards_coefficient: float = 0.0
    """Weight of a penalty on (r_chosen + r_rejected)^2 that keeps rewards centred on 0."""


@dataclass
class RewardModelConfig:
    """``palaestra train algo=reward``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PairData = field(default_factory=PairData)
    algo: RewardModelAlgo = field(default_factory=lambda: RewardModelAlgo())
    train: PairTrain = field(default_factory=PairTrain)
    tracking: RegisteredTracking = field(default_factory=RegisteredTracking)


def validate_reward(config: RewardModelConfig) -> None:
    """reward's own keys (its shared sections are checked first; cheap: the data files are checked, not parsed)."""
    algo = config.algo
    check(algo.margin >= 0, f"algo.margin={algo.margin} must be >= 0")
    check(algo.center_rewards_coefficient >= 0,
          f"algo.center_rewards_coefficient={algo.center_rewards_coefficient} must be >= 0")
