"""The ``env`` and ``policy`` sections (at_grpo): the multi-agent environment and how its agents map to
trainable policies."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from palaestra.config.choices import POLICY_MODES
from palaestra.config.errors import check, one_of

__all__ = ["EnvConfig", "PolicyConfig", "validate_env", "validate_policy"]



@dataclass
class EnvConfig:
    """A multi-agent environment."""

    name: str = "plan_path"
    """plan_path, sokoban, sudoku, math or code (or "package.module:Class")."""
    params: dict = field(default_factory=dict)
    """Constructor arguments (size, max_turns, turn_order, ...)."""
    train_envs: int = 4
    """Environments (problems) per training step."""
    test_envs: int = 16
    """Test episodes for evaluation (seeds offset by 100000 from training seeds)."""
    seed: int = 0
    """First training seed."""
    workers: int = 0
    """Worker processes that step the environments, a turn's answers side by side (0: one after the other in the
    trainer's process). In workers, an environment that crashes, raises or takes longer than step_timeout_s costs
    its episode, never the run (logged: lost_steps)."""
    step_timeout_s: float = 60.0
    """With workers: the longest one environment step may take before its worker is killed and the episode lost."""
    backend: str = "processes"
    """With workers: processes (this machine's, a pool) or ray (Ray tasks on the cluster RAY_ADDRESS names, else a
    local Ray; pip install -e ".[ray]"), at most workers steps at once."""


@dataclass
class PolicyConfig:
    """How agents map to trainable policies."""

    mode: str = "shared"
    """shared (one model, roles by prompt), per_role (one base, one LoRA adapter per role) or separate (one model per role)."""
    role_models: dict = field(default_factory=dict)
    """separate: role -> model path (a local HF folder); roles not listed use the model section."""


def validate_env(env: EnvConfig) -> None:
    from palaestra.envs import resolve_env
    from palaestra.config.errors import ConfigError

    try:
        resolve_env(env.name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check(env.train_envs > 0, f"env.train_envs={env.train_envs} must be positive")
    check(env.test_envs > 0, f"env.test_envs={env.test_envs} must be positive")
    check(env.workers >= 0, f"env.workers={env.workers} must be >= 0 (0: the trainer's process)")
    check(env.step_timeout_s > 0, f"env.step_timeout_s={env.step_timeout_s} must be > 0")
    one_of("env.backend", env.backend, ("processes", "ray"))
    if env.backend == "ray" and env.workers:
        import importlib.util

        check(importlib.util.find_spec("ray") is not None,
              "env.backend=ray needs the ray package: pip install -e '.[ray]' (or use env.backend=processes)")


def validate_policy(policy: PolicyConfig, lora_enabled: bool) -> None:
    one_of("policy.mode", policy.mode, POLICY_MODES)
    check(policy.mode != "per_role" or lora_enabled, "policy.mode=per_role needs model.lora.enabled=true (one adapter per role)")
    for role, path in policy.role_models.items():
        check(policy.mode == "separate", f"policy.role_models is set for {role!r} but policy.mode={policy.mode}; use policy=separate")
        check(not path or os.path.isdir(path), f"policy.role_models.{role}={path} is not a folder; point it at a Hugging Face model folder")
