"""DPO's settings: the whole config of ``palaestra train algo=dpo`` (the recipe: :mod:`palaestra.recipes.dpo`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from palaestra.config.choices import DPO_LOSS_TYPES
from palaestra.config.data import PairData
from palaestra.config.errors import check, one_of
from palaestra.config.model import ModelConfig
from palaestra.config.run import ChunkedLogprobs, EpochBudget, PairTrain, ShardingSettings, check_shardable
from palaestra.config.tracking import RegisteredPolicyTracking

__all__ = ["DPOAlgo", "DPOConfig", "DPOTrain", "validate_dpo"]


@dataclass
class DPOAlgo(EpochBudget):
    """Direct Preference Optimization on preference pairs; the reference is the model with its adapter off."""

    name: str = "dpo"
    """Algorithm name (recipe)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint (DPO temperature)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) or ipo."""
    label_smoothing: float = 0.0
    """Conservative DPO: assumed probability that a pair's label is flipped (sigmoid only)."""


@dataclass
class DPOTrain(PairTrain, ChunkedLogprobs, ShardingSettings):
    """DPO's updates: preference pairs, the answers' log-probs under the policy and the reference."""


@dataclass
class DPOConfig:
    """``palaestra train algo=dpo``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PairData = field(default_factory=PairData)
    algo: DPOAlgo = field(default_factory=lambda: DPOAlgo())
    train: DPOTrain = field(default_factory=DPOTrain)
    tracking: RegisteredPolicyTracking = field(default_factory=RegisteredPolicyTracking)


def validate_dpo(config: DPOConfig) -> None:
    """dpo's own keys (its shared sections are checked first; cheap: the data files are checked, not parsed)."""
    algo = config.algo
    check(algo.beta > 0, f"algo.beta={algo.beta} must be > 0")
    one_of("algo.loss_type", algo.loss_type, DPO_LOSS_TYPES)
    check(0 <= algo.label_smoothing < 0.5, f"algo.label_smoothing={algo.label_smoothing} must be in [0, 0.5)")
    check_shardable(config.model, config.train)
