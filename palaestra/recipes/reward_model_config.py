"""The reward model's settings: the whole config of ``palaestra train algo=reward`` (the recipe:
:mod:`palaestra.recipes.reward_model`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from palaestra.config.data import PairData, validate_data
from palaestra.config.errors import check
from palaestra.config.model import ModelConfig, validate_model
from palaestra.config.run import PairTrain, validate_run
from palaestra.config.tracking import RegisteredTracking

__all__ = ["RewardModelAlgo", "RewardModelConfig", "validate_reward"]


@dataclass
class RewardModelAlgo:
    """A reward model: a sequence-classification head on the policy's architecture, trained on preference pairs."""

    name: str = "reward"
    """Algorithm name (recipe)."""
    epochs: int = 1
    """Passes over the training pairs."""
    max_steps: int = 0
    """Stop after this many optimizer updates (0: the epochs decide)."""
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
    """Every value reward reads (cheap: the data files are checked, not parsed)."""
    algo, train = config.algo, config.train
    validate_model(config.model)
    validate_data(config.data)
    validate_run(train)
    check(algo.epochs > 0, f"algo.epochs={algo.epochs} must be positive")
    check(algo.max_steps >= 0, f"algo.max_steps={algo.max_steps} must be >= 0")
