"""The model registry (MLflow's own), the offline replay gate and policy versions.

``register_model`` turns a training run's ``model`` artifact into ``models:/NAME/VERSION``;
``replay`` gates a version on a dated dataset against a baseline and tags it; policy versions pair
a model version with generation defaults and a candidate / active / retired status.
"""

from palaestra.registry.models import (
    ModelVersionInfo,
    download_model,
    list_models,
    open_client,
    register_model,
    resolve_version,
)
from palaestra.registry.policies import (
    PolicyVersion,
    active_policy,
    create_policy_version,
    get_policy_version,
    list_policy_versions,
    promote,
    retire,
)
from palaestra.registry.replay import ReplayResult, load_replay_dataset, replay, replay_gate

__all__ = [
    "ModelVersionInfo",
    "PolicyVersion",
    "ReplayResult",
    "active_policy",
    "create_policy_version",
    "download_model",
    "get_policy_version",
    "list_models",
    "list_policy_versions",
    "load_replay_dataset",
    "open_client",
    "promote",
    "register_model",
    "replay",
    "replay_gate",
    "resolve_version",
    "retire",
]
