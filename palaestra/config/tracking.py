"""The ``tracking`` section: MLflow, and the registry and contract keys of the methods that use them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from palaestra.config.errors import check, one_of

__all__ = ["ContractTracking", "PolicyTracking", "RegisteredPolicyTracking", "RegisteredTracking", "TrackingConfig"]

TRACKING_PARAMS = ("config", "contract")
LOGGERS = ("mlflow", "tensorboard", "wandb")
"""What tracking.loggers may name (palaestra.tracking.mirrors builds the ones beside MLflow)."""


@dataclass
class TrackingConfig:
    """Experiment tracking: MLflow, and TensorBoard and Weights & Biases beside it."""

    enabled: bool = True
    """Track the run (every logger of tracking.loggers)."""
    loggers: list = field(default_factory=lambda: ["mlflow"])
    """Where the run's figures, tables, plots and config go: any of mlflow (the registry's store), tensorboard
    (event files in <run folder>/tensorboard: tensorboard --logdir runs) and wandb (Weights & Biases; it reads
    WANDB_MODE, WANDB_API_KEY, WANDB_PROJECT). Each is fed from the run folder's tracking journal: one that is
    away costs nothing, and a resumed run sends what it had not taken."""
    wandb_project: Optional[str] = None
    """W&B project (the seeds' wandb.project); None: WANDB_PROJECT, else tracking.experiment."""
    wandb_run_name: Optional[str] = None
    """W&B run name (the seeds' wandb.run_name); None: the MLflow run's name."""
    experiment: str = "palaestra"
    """MLflow experiment name."""
    tracking_uri: Optional[str] = None
    """MLflow URI; default MLFLOW_TRACKING_URI or a local SQLite store (mlflow.db) in the working directory."""
    required: bool = False
    """Refuse to train when the store cannot be reached at the start (default: warn once and train; a training
    run's writes wait in <run folder>/tracking/ and are sent when the store is back, or at the next resume)."""
    run_name: Optional[str] = None
    """MLflow run name; default <subject>-<method>-<model>."""
    parent_run_id: Optional[str] = None
    """Nest the run under this MLflow run (set by palaestra pipeline for its stages)."""


@dataclass
class RegisteredTracking(TrackingConfig):
    """Tracking of a method whose product can be registered (the reward model)."""

    registered_model: Optional[str] = None
    """Register the trained model under this name in MLflow's model registry (None: do not register)."""


@dataclass
class PolicyTracking(TrackingConfig):
    """Tracking of a policy trained on the ``data`` section (ppo): the planner contract's policy_id tag."""

    policy_id: Optional[str] = None
    """policy_id tag of the run (planner contract); None uses <data.name>-<method>."""


@dataclass
class RegisteredPolicyTracking(RegisteredTracking):
    """Tracking of a registered policy trained on the ``data`` section (dpo)."""

    policy_id: Optional[str] = None
    """policy_id tag of the run (planner contract); None uses <data.name>-<method>."""


@dataclass
class ContractTracking(RegisteredPolicyTracking):
    """Tracking of SFT, which can log the planner template's contract params."""

    params: str = "config"
    """The run's MLflow params: config (every key of the resolved config, flattened) or contract (the planner
    template's eight: learning_rate, batch_size, epochs, dataset_version, model_base, fine_tuning_method,
    lora_r, lora_alpha; experiment=planner sets it)."""


def validate_tracking(tracking: TrackingConfig) -> None:
    for logger in tracking.loggers:
        one_of("tracking.loggers", logger, LOGGERS)
    check(len(set(tracking.loggers)) == len(tracking.loggers), f"tracking.loggers={list(tracking.loggers)} names a logger twice")
    if "wandb" in tracking.loggers and tracking.enabled:
        import importlib.util

        check(importlib.util.find_spec("wandb") is not None,
              "tracking.loggers names wandb, which is not installed: pip install -e '.[wandb]' (or leave it out)")
    if getattr(tracking, "registered_model", None):
        check("mlflow" in tracking.loggers, f"tracking.registered_model={tracking.registered_model} registers in "
              "MLflow's model registry; add mlflow to tracking.loggers")
    if isinstance(tracking, ContractTracking):
        one_of("tracking.params", tracking.params, TRACKING_PARAMS)
