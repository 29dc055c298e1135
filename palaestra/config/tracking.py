"""The ``tracking`` section: MLflow, and the registry and contract keys of the methods that use them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from palaestra.config.errors import one_of

__all__ = ["ContractTracking", "PolicyTracking", "RegisteredPolicyTracking", "RegisteredTracking", "TrackingConfig"]

TRACKING_PARAMS = ("config", "contract")


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = True
    """Log to MLflow."""
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
    if isinstance(tracking, ContractTracking):
        one_of("tracking.params", tracking.params, TRACKING_PARAMS)
