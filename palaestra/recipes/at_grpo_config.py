"""AT-GRPO's settings: the whole config of ``palaestra train algo=at_grpo`` (the recipe: :mod:`palaestra.recipes.at_grpo`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from palaestra.config.choices import GROUP_FILTERS
from palaestra.config.env import EnvConfig, PolicyConfig, validate_policy
from palaestra.config.errors import check, one_of
from palaestra.config.evaluation import SampledEval
from palaestra.config.model import ModelConfig
from palaestra.config.agent import ToolSettings
from palaestra.config.rollout import RolloutSettings
from palaestra.config.run import ChunkedLogprobs, StepLoopSettings
from palaestra.config.sampling import ClippedObjective, SamplingSettings
from palaestra.config.tracking import TrackingConfig

__all__ = ["ATGRPOAlgo", "ATGRPOConfig", "ATGRPOTrain", "validate_at_grpo"]

ROLLOUTS = ("tree", "no_tree")


@dataclass
class ATGRPOAlgo(ClippedObjective, SamplingSettings):
    """AT-GRPO: agent- and turn-wise grouped GRPO for teams of agents in multi-turn environments."""

    max_prompt_length: int = 768
    """Observations longer than this many tokens are truncated from the left."""
    temperature: float = 1.0
    """Training sampling temperature (the reference uses 1.5 with larger models)."""
    loss_type: str = "bnpo"
    """Loss normalisation (bnpo: token mean over the batch, as in the reference)."""
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


@dataclass
class ATGRPOTrain(StepLoopSettings, ChunkedLogprobs):
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
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    agent: ToolSettings = field(default_factory=ToolSettings)
    train: ATGRPOTrain = field(default_factory=ATGRPOTrain)
    eval: SampledEval = field(default_factory=SampledEval)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def validate_at_grpo(config: ATGRPOConfig) -> None:
    """AT-GRPO's own keys (its shared sections are checked first; cheap: the environment class is looked up,
    no model loads)."""
    algo = config.algo
    validate_policy(config.policy, config.model.lora.enabled)
    check(config.train.answers_per_forward > 0, f"train.answers_per_forward={config.train.answers_per_forward} must be positive")
    check(algo.samples_per_state >= 2, f"algo.samples_per_state={algo.samples_per_state} must be >= 2 (GRPO compares answers within a group)")
    one_of("algo.rollout", algo.rollout, ROLLOUTS)
    one_of("algo.group_filter", algo.group_filter, GROUP_FILTERS)
    check(0 <= algo.filter_ratio < 1, f"algo.filter_ratio={algo.filter_ratio} must be in [0, 1)")
    engine = config.rollout.engine
    check(engine != "vllm", "rollout.engine=vllm is GRPO's; a team samples with rollout.engine=hf or server")
    if engine == "server":
        check(config.model.lora.enabled, "rollout.engine=server serves the trained LoRA adapters; set model.lora.enabled=true "
                                         "or use rollout.engine=hf")
        check(config.policy.mode != "separate", "rollout.engine=server serves one base model per worker; policy=separate "
                                                "has one per role: use policy=shared or per_role, or rollout.engine=hf")
        check(not config.agent.tools, "agent.tools runs its episodes on rollout.engine=hf; use rollout.engine=hf with it")
