"""DPO's settings: the whole config of ``palaestra train algo=dpo`` (the recipe: :mod:`palaestra.recipes.dpo`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from palaestra.config.choices import DPO_LOSS_TYPES
from palaestra.config.data import PairData, validate_data
from palaestra.config.errors import check, one_of
from palaestra.config.model import ModelConfig, validate_model
from palaestra.config.run import PairTrain, validate_run
from palaestra.config.tracking import RegisteredPolicyTracking

__all__ = ["DPOAlgo", "DPOConfig", "validate_dpo"]


@dataclass
class DPOAlgo:
    """Direct Preference Optimization on preference pairs; the reference is the model with its adapter off."""

    name: str = "dpo"
    """Algorithm name (recipe)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint (DPO temperature)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) or ipo."""
    label_smoothing: float = 0.0
    """Conservative DPO: assumed probability that a pair's label is flipped (sigmoid only)."""
    epochs: int = 1
    """Passes over the training pairs."""
    max_steps: int = 0
    """Stop after this many optimizer updates (0: the epochs decide)."""


@dataclass
class DPOConfig:
    """``palaestra train algo=dpo``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PairData = field(default_factory=PairData)
    algo: DPOAlgo = field(default_factory=lambda: DPOAlgo())
    train: PairTrain = field(default_factory=PairTrain)
    tracking: RegisteredPolicyTracking = field(default_factory=RegisteredPolicyTracking)


def validate_dpo(config: DPOConfig) -> None:
    """Every value dpo reads (cheap: the data files are checked, not parsed)."""
    algo, train = config.algo, config.train
    validate_model(config.model)
    validate_data(config.data)
    validate_run(train)
    check(algo.epochs > 0, f"algo.epochs={algo.epochs} must be positive")
    check(algo.max_steps >= 0, f"algo.max_steps={algo.max_steps} must be >= 0")
    check(algo.beta > 0, f"algo.beta={algo.beta} must be > 0")
    one_of("algo.loss_type", algo.loss_type, DPO_LOSS_TYPES)
    check(0 <= algo.label_smoothing < 0.5, f"algo.label_smoothing={algo.label_smoothing} must be in [0, 0.5)")
