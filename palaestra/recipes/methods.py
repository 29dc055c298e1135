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
    ClassifierConfig,
    DPOConfig,
    MambaConfig,
    PalaestraConfig,
    PPOConfig,
    RagConfig,
    RewardModelConfig,
    SFTConfig,
)

__all__ = ["METHODS", "Method", "best_metric", "check_read", "method_of"]


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
    """Which of the sections task, env, policy and data it reads (the subject it trains on first)."""
    ignores: tuple[str, ...] = ()
    """Keys (or sections) of the shared sections that it does not read: given on the command line, an error."""
    evaluate_before_after: bool = False
    """``palaestra train`` evaluates before and after training (``palaestra run`` always does)."""

    @property
    def main(self) -> Callable:
        return importlib.import_module(self.recipe).main


_UNREGISTERED = ("tracking.registered_model", "tracking.policy_id", "tracking.params")
_PAIRS_ONLY = ("data.preference_train_file", "data.preference_val_file")
_CHATS_ONLY = ("data.train_file", "data.val_file", "data.test_file", "data.metrics")
_BY_EPOCHS = ("train.steps", "train.share_prompt_forward", "train.log_samples_interval", "eval")
_GREEDY_EVAL = ("eval.num_samples", "eval.greedy", "eval.temperature", "eval.top_p", "eval.top_k", "eval.pass_k")

_BUILDS_AN_INDEX = ("model", "eval", "tracking.registered_model", "tracking.policy_id", *(
    f"train.{key}" for key in ("steps", "batch_size", "micro_batch_size", "learning_rate", "weight_decay", "adam_beta1",
                               "adam_beta2", "warmup_ratio", "lr_schedule", "max_grad_norm", "share_prompt_forward",
                               "eval_interval", "early_stopping_patience", "log_samples_interval")))

_FINE_TUNES_AN_ENCODER = ("model.dtype", "model.lora", "eval", *_UNREGISTERED, *(
    f"train.{key}" for key in ("steps", "micro_batch_size", "share_prompt_forward", "eval_interval",
                               "early_stopping_patience", "log_samples_interval")))

_TRAINS_FROM_SCRATCH = ("model", "eval", *_UNREGISTERED, *(
    f"train.{key}" for key in ("steps", "share_prompt_forward", "eval_interval", "early_stopping_patience",
                               "log_samples_interval")))

METHODS: dict[str, Method] = {
    "sft": Method(SFTConfig, "palaestra.recipes.sft", "val_loss", ("data",),
                  ignores=(*_BY_EPOCHS, "train.eval_interval", "train.early_stopping_patience", *_PAIRS_ONLY, "data.rewards",
                           "data.metrics", "data.generator")),
    "reward": Method(RewardModelConfig, "palaestra.recipes.reward_model", "pairwise_accuracy", ("data",),
                     ignores=(*_BY_EPOCHS, *_CHATS_ONLY, "data.rewards", "data.generator", "tracking.policy_id",
                              "tracking.params")),
    "dpo": Method(DPOConfig, "palaestra.recipes.dpo", "preference_accuracy", ("data",),
                  ignores=(*_BY_EPOCHS, *_CHATS_ONLY, "data.rewards", "data.generator", "tracking.params")),
    "ppo": Method(PPOConfig, "palaestra.recipes.ppo", "reward", ("data",),
                  ignores=("train.batch_size", "train.share_prompt_forward", *_GREEDY_EVAL, *_PAIRS_ONLY,
                           "data.generator", "tracking.registered_model", "tracking.params")),
    "grpo": Method(AlgoConfig, "palaestra.recipes.grpo", "accuracy", ("task",), ignores=_UNREGISTERED),
    "at_grpo": Method(ATGRPOConfig, "palaestra.recipes.at_grpo", "success_rate", ("env", "policy"),
                      ignores=("train.batch_size", "eval.batch_size", "eval.max_examples", "eval.pass_k", *_UNREGISTERED),
                      evaluate_before_after=True),
    "classifier": Method(ClassifierConfig, "palaestra.recipes.classifier", "macro_f1", (), ignores=_FINE_TUNES_AN_ENCODER,
                         evaluate_before_after=True),
    "rag": Method(RagConfig, "palaestra.recipes.rag", "ndcg@10", (), ignores=_BUILDS_AN_INDEX),
    "mamba": Method(MambaConfig, "palaestra.recipes.mamba", "val_loss", (), ignores=_TRAINS_FROM_SCRATCH,
                    evaluate_before_after=True),
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


OPTIONAL_SECTIONS = ("task", "env", "policy", "data")
"""Sections only some methods read (``Method.reads``)."""


def check_read(algo_name: str, overrides: list[str]) -> None:
    """A key given on the command line (``key=value``, or a group choice ``task=countdown``) that the
    method does not read is a mistake: raise a one-line ConfigError naming it."""
    from palaestra.config import ConfigError

    method = METHODS[algo_name]
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        section = key.split(".", 1)[0]
        if section in OPTIONAL_SECTIONS and section not in method.reads:
            reads = ", ".join(method.reads) or f"none of {', '.join(OPTIONAL_SECTIONS)}"
            raise ConfigError(f"algo={algo_name} does not read {key} (it reads {reads}); remove it")
        if any(key == ignored or key.startswith(ignored + ".") for ignored in method.ignores):
            raise ConfigError(f"algo={algo_name} does not read {key}; remove it")

