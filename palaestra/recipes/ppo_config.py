"""PPO's settings: the whole config of ``palaestra train algo=ppo`` (the recipe: :mod:`palaestra.recipes.ppo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from palaestra.config.data import PromptData
from palaestra.config.errors import check
from palaestra.config.evaluation import GenerationEval
from palaestra.config.model import ModelConfig
from palaestra.config.run import ChunkedLogprobs, StepLoopSettings
from palaestra.config.sampling import SamplingSettings
from palaestra.config.tracking import PolicyTracking

__all__ = ["PPOAlgo", "PPOConfig", "PPOTrain", "validate_ppo"]


@dataclass
class PPOAlgo(SamplingSettings):
    """PPO with a value head, GAE and a KL penalty to the reference (the model with its adapter off)."""

    max_prompt_length: int = 384
    """Prompts longer than this many tokens are truncated from the left."""
    name: str = "ppo"
    """Algorithm name (recipe)."""
    reward_model: Optional[str] = None
    """Folder of a trained reward model (palaestra train algo=reward); None scores with data.rewards instead."""
    prompts_per_step: int = 8
    """Prompts sampled per step (one completion each)."""
    ppo_epochs: int = 2
    """Optimisation passes over each rollout batch."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.05
    """Per-token KL penalty to the reference, folded into the rewards."""
    cliprange: float = 0.2
    """Clipping range of the policy ratio."""
    cliprange_value: float = 0.2
    """Clipping range of the value update."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    whiten_advantages: bool = True
    """Normalise advantages over the batch."""


@dataclass
class PPOTrain(StepLoopSettings, ChunkedLogprobs):
    """PPO's loop: each step samples algo.prompts_per_step completions, then algo.ppo_epochs passes of minibatches."""

    minibatch_size: int = 8
    """Completions per minibatch: one AdamW update each (a pass over a step's completions is
    ceil(algo.prompts_per_step / minibatch_size) updates)."""


@dataclass
class PPOConfig:
    """``palaestra train algo=ppo``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PromptData = field(default_factory=PromptData)
    algo: PPOAlgo = field(default_factory=lambda: PPOAlgo())
    train: PPOTrain = field(default_factory=PPOTrain)
    eval: GenerationEval = field(default_factory=GenerationEval)
    tracking: PolicyTracking = field(default_factory=PolicyTracking)


def validate_ppo(config: PPOConfig) -> None:
    """PPO's own keys (its shared sections are checked first; cheap: the data files are checked, not parsed)."""
    algo, data, train = config.algo, config.data, config.train
    check(train.minibatch_size > 0, f"train.minibatch_size={train.minibatch_size} must be positive")
    check(algo.prompts_per_step > 0, f"algo.prompts_per_step={algo.prompts_per_step} must be positive")
    check(algo.ppo_epochs > 0, f"algo.ppo_epochs={algo.ppo_epochs} must be positive")
    check(0 <= algo.gamma <= 1 and 0 <= algo.lam <= 1, f"algo.gamma={algo.gamma} and algo.lam={algo.lam} must be in [0, 1]")
    check(algo.kl_coef >= 0, f"algo.kl_coef={algo.kl_coef} must be >= 0")
    check(algo.reward_model is None or Path(algo.reward_model).is_dir(),
          f"algo.reward_model={algo.reward_model} is not a folder; train one with palaestra train algo=reward")
    if algo.reward_model is None:
        check(bool(data.rewards), "data.rewards is empty and algo.reward_model is not set; PPO needs one of them")
