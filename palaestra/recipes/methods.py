"""The table of training methods: name -> the schema of its whole config, its checks, its recipe.

The one place that lists the methods: the CLI (``palaestra train algo=<name>``), the pipelines (a
training stage is a method) and config composition (:mod:`palaestra.jobs`) read it. Adding a method is
one recipe file (``recipes/<name>.py`` with ``main(config, *, evaluate_before_after) -> results``), its
schema beside it (``recipes/<name>_config.py``: a dataclass of the sections it reads, and a function that
checks their values), one YAML (``conf/algo/<name>.yaml``) and one row here.

Importing this module imports the schemas only (no torch): a recipe is imported when it runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Callable

from palaestra.recipes.at_grpo_config import ATGRPOConfig, validate_at_grpo
from palaestra.recipes.classifier_config import ClassifierConfig, validate_classifier
from palaestra.recipes.dpo_config import DPOConfig, validate_dpo
from palaestra.recipes.grpo_config import GRPOConfig, validate_grpo
from palaestra.recipes.mamba_config import MambaConfig, validate_mamba
from palaestra.recipes.ppo_config import PPOConfig, validate_ppo
from palaestra.recipes.rag_config import RagConfig, validate_rag
from palaestra.recipes.reward_model_config import RewardModelConfig, validate_reward
from palaestra.recipes.sft_config import SFTConfig, validate_sft

__all__ = ["METHODS", "Method", "best_metric", "method_of"]


@dataclass(frozen=True)
class Method:
    """One training method."""

    schema: type
    """The dataclass of its whole config: exactly the sections and keys it reads."""
    validate: Callable
    """Checks the values of a config of ``schema`` (cheap: no model, no dataset load); raises ConfigError."""
    recipe: str
    """The module of its recipe; ``main(config, *, evaluate_before_after) -> results`` runs it."""
    best_metric: str
    """The evaluation figure keep-best and early stopping follow unless ``train.best_metric`` says."""
    subject: str | None = None
    """The section whose ``name`` says what it trains on (task, env or data), for run names and tables."""
    evaluate_before_after: bool = False
    """``palaestra train`` evaluates before and after training (``palaestra run`` always does)."""

    @property
    def main(self) -> Callable:
        return importlib.import_module(self.recipe).main

    @property
    def sections(self) -> tuple[str, ...]:
        """The top-level sections of its config."""
        return tuple(f.name for f in fields(self.schema))


METHODS: dict[str, Method] = {
    "sft": Method(SFTConfig, validate_sft, "palaestra.recipes.sft", "val_loss", "data"),
    "reward": Method(RewardModelConfig, validate_reward, "palaestra.recipes.reward_model", "pairwise_accuracy", "data"),
    "dpo": Method(DPOConfig, validate_dpo, "palaestra.recipes.dpo", "preference_accuracy", "data"),
    "ppo": Method(PPOConfig, validate_ppo, "palaestra.recipes.ppo", "reward", "data"),
    "grpo": Method(GRPOConfig, validate_grpo, "palaestra.recipes.grpo", "accuracy", "task"),
    "at_grpo": Method(ATGRPOConfig, validate_at_grpo, "palaestra.recipes.at_grpo", "success_rate", "env",
                      evaluate_before_after=True),
    "classifier": Method(ClassifierConfig, validate_classifier, "palaestra.recipes.classifier", "macro_f1",
                         evaluate_before_after=True),
    "rag": Method(RagConfig, validate_rag, "palaestra.recipes.rag", "ndcg@10"),
    "mamba": Method(MambaConfig, validate_mamba, "palaestra.recipes.mamba", "val_loss", evaluate_before_after=True),
}
"""algo.name -> the method, in the order a pipeline runs them."""


def method_of(config) -> Method:
    return METHODS[config.algo.name]


def best_metric(config) -> tuple[str, str]:
    """(the figure to keep the best by, ``max`` or ``min``): ``train.best_metric``, else the method's own.

    Lower is better for a loss (a figure named ``loss`` or ending in ``_loss``), higher for the rest.
    """
    name = config.train.best_metric or method_of(config).best_metric
    return name, "min" if name == "loss" or name.endswith("_loss") else "max"
