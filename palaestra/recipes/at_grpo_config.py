"""AT-GRPO's settings: the whole config of ``palaestra train algo=at_grpo`` (the recipe: :mod:`palaestra.recipes.at_grpo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from palaestra.config.choices import GROUP_FILTERS, LOSS_TYPES, SCALE_REWARDS
from palaestra.config.env import EnvConfig, PolicyConfig, validate_env, validate_policy
from palaestra.config.errors import check, one_of
from palaestra.config.evaluation import SampledEval, validate_eval
from palaestra.config.model import ModelConfig, validate_model
from palaestra.config.run import StepLoopSettings, validate_run
from palaestra.config.tracking import TrackingConfig

__all__ = ["ATGRPOAlgo", "ATGRPOConfig", "ATGRPOTrain", "validate_at_grpo"]

ROLLOUTS = ("tree", "no_tree")


@dataclass
class ATGRPOAlgo:
    """AT-GRPO: agent- and turn-wise grouped GRPO for teams of agents in multi-turn environments."""

    name: str = "at_grpo"
    """Algorithm name (recipe)."""
    samples_per_state: int = 4
    """K: answers per (turn, agent) of each environment (the group size); at least 2."""
    alpha: float = 1.0
    """Agent reward = alpha * team reward + the agent's own (local) reward."""
    rollout: str = "tree"
    """tree (K branches per state, the best carried forward) or no_tree (K independent episodes)."""
    group_filter: str = "none"
    """Which groups to train on: none, mean, std, dapo (drop zero-variance groups) or uid."""
    filter_ratio: float = 0.0
    """Fraction dropped by the mean, std and uid filters."""
    beta: float = 0.0
    """k3 KL penalty to the reference (the base with adapters off); off by default, as in the reference."""
    epsilon: float = 0.2
    """Lower clipping range of the importance ratio."""
    epsilon_high: Optional[float] = None
    """Upper clipping range; None uses epsilon."""
    loss_type: str = "bnpo"
    """Loss normalisation (bnpo: token mean over the batch, as in the reference)."""
    scale_rewards: str = "group"
    """Advantage scaling: group, batch or none."""
    max_prompt_length: int = 768
    """Observations longer than this many tokens are truncated from the left."""
    max_completion_length: int = 96
    """Maximum new tokens per answer."""
    temperature: float = 1.0
    """Training sampling temperature (the reference uses 1.5 with larger models)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k sampling (0 disables)."""


@dataclass
class ATGRPOTrain(StepLoopSettings):
    """AT-GRPO's loop: each step plays env.train_envs problems, then every policy takes one update on its answers."""

    answers_per_forward: int = 8
    """Answers per forward/backward when a policy updates on its roles' answers (all of a step's answers make one update)."""
    share_prompt_forward: bool = True
    """Pack the training forward: the K answers to one state share their prompt once (same numbers, less work)."""


@dataclass
class ATGRPOConfig:
    """``palaestra train algo=at_grpo``: a team of LLM agents trained in a multi-turn environment."""

    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    algo: ATGRPOAlgo = field(default_factory=lambda: ATGRPOAlgo())
    train: ATGRPOTrain = field(default_factory=ATGRPOTrain)
    eval: SampledEval = field(default_factory=SampledEval)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def validate_at_grpo(config: ATGRPOConfig) -> None:
    """Every value AT-GRPO reads (cheap: the environment class is looked up, no model loads)."""
    algo = config.algo
    validate_model(config.model)
    validate_env(config.env)
    validate_policy(config.policy, config.model.lora.enabled)
    validate_run(config.train)
    validate_eval(config.eval)
    check(config.train.answers_per_forward > 0, f"train.answers_per_forward={config.train.answers_per_forward} must be positive")
    check(algo.samples_per_state >= 2, f"algo.samples_per_state={algo.samples_per_state} must be >= 2 (GRPO compares answers within a group)")
    one_of("algo.rollout", algo.rollout, ROLLOUTS)
    one_of("algo.group_filter", algo.group_filter, GROUP_FILTERS)
    check(0 <= algo.filter_ratio < 1, f"algo.filter_ratio={algo.filter_ratio} must be in [0, 1)")
    check(algo.beta >= 0, f"algo.beta={algo.beta} must be >= 0")
    check(algo.epsilon > 0, f"algo.epsilon={algo.epsilon} must be > 0")
    one_of("algo.loss_type", algo.loss_type, LOSS_TYPES)
    one_of("algo.scale_rewards", algo.scale_rewards, SCALE_REWARDS)
    check(algo.max_completion_length > 0, f"algo.max_completion_length={algo.max_completion_length} must be positive")
    check(algo.temperature > 0, f"algo.temperature={algo.temperature} must be > 0")
