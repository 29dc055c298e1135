"""The table of training methods: name -> config schema, recipe, the figure it keeps the best by.

The one place that lists the methods: the CLI (``palaestra train algo=<name>``), the pipelines
(a training stage is a method) and config validation read it. Adding a method is one recipe file
(``recipes/<name>.py`` with ``main(config, *, evaluate_before_after) -> results``), one config
schema (in :mod:`palaestra.config`), one YAML (``conf/algo/<name>.yaml``) and one row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from palaestra.config import (
    AlgoConfig,
    ATGRPOConfig,
    DPOConfig,
    PalaestraConfig,
    PPOConfig,
    RewardModelConfig,
    SFTConfig,
)

__all__ = ["METHODS", "Method", "best_metric", "method_of"]


@dataclass(frozen=True)
class Method:
    """One training method."""

    schema: type
    """The dataclass of its ``algo`` section."""
    recipe: str
    """The module of its recipe; ``main(config, *, evaluate_before_after) -> results`` runs it."""
    best_metric: str
    """The evaluation figure keep-best and early stopping follow unless ``train.best_metric`` says."""
    reads: tuple[str, ...]
    """The config sections besides model/algo/train/eval/tracking/export that it reads (the subject first)."""
    evaluate_before_after: bool = False
    """``palaestra train`` evaluates before and after training (``palaestra run`` always does)."""

    @property
    def main(self) -> Callable:
        return importlib.import_module(self.recipe).main


METHODS: dict[str, Method] = {
    "sft": Method(SFTConfig, "palaestra.recipes.sft", "val_loss", ("data",)),
    "reward": Method(RewardModelConfig, "palaestra.recipes.reward_model", "pairwise_accuracy", ("data",)),
    "dpo": Method(DPOConfig, "palaestra.recipes.dpo", "preference_accuracy", ("data",)),
    "ppo": Method(PPOConfig, "palaestra.recipes.ppo", "reward", ("data",)),
    "grpo": Method(AlgoConfig, "palaestra.recipes.grpo", "accuracy", ("task",)),
    "at_grpo": Method(ATGRPOConfig, "palaestra.recipes.at_grpo", "success_rate", ("env", "policy"), evaluate_before_after=True),
}
"""algo.name -> the method, in the order a pipeline runs them."""


def method_of(config: PalaestraConfig) -> Method:
    return METHODS[config.algo.name]


def best_metric(config: PalaestraConfig) -> tuple[str, str]:
    """(the figure to keep the best by, ``max`` or ``min``): ``train.best_metric``, else the method's own.

    Lower is better for a loss (a figure named ``loss`` or ending in ``_loss``), higher for the rest.
    """
    name = config.train.best_metric or method_of(config).best_metric
    return name, "min" if name == "loss" or name.endswith("_loss") else "max"
