"""SFT's settings: the whole config of ``palaestra train algo=sft`` (the recipe: :mod:`palaestra.recipes.sft`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from palaestra.config.data import ChatData
from palaestra.config.model import ModelConfig
from palaestra.config.run import ChunkedLogprobs, EpochBudget, OptimizerSettings, ShardingSettings, check_batch, check_shardable
from palaestra.config.tracking import ContractTracking

__all__ = ["SFTAlgo", "SFTConfig", "SFTTrain", "validate_sft"]


@dataclass
class SFTAlgo(EpochBudget):
    """Supervised fine-tuning on chat data: loss on the assistant's tokens only."""

    name: str = "sft"
    """Algorithm name (recipe)."""
    epochs: int = 3
    """Passes over the training split."""
    packing: bool = True
    """Pack several short examples into one sequence of up to data.max_length tokens (no cross-attention between them)."""
    assistant_only_loss: bool = True
    """Score only the assistant's tokens (False: every token of the conversation)."""
    early_stopping_patience: int = 3
    """Stop after this many epochs without a lower validation loss (0 disables)."""


@dataclass
class SFTTrain(OptimizerSettings, ChunkedLogprobs, ShardingSettings):
    """SFT's updates: token sequences (packed examples, or one example each with algo.packing=false)."""

    sequences_per_step: int = 32
    """Sequences per optimizer update."""
    sequences_per_forward: int = 8
    """Sequences per forward/backward; sequences_per_step / sequences_per_forward is the gradient accumulation."""


@dataclass
class SFTConfig:
    """``palaestra train algo=sft``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: ChatData = field(default_factory=ChatData)
    algo: SFTAlgo = field(default_factory=lambda: SFTAlgo())
    train: SFTTrain = field(default_factory=SFTTrain)
    tracking: ContractTracking = field(default_factory=ContractTracking)


def validate_sft(config: SFTConfig) -> None:
    """sft's own keys (its shared sections are checked first; cheap: the data files are checked, not parsed)."""
    train = config.train
    check_batch("train.sequences_per_step", train.sequences_per_step, "train.sequences_per_forward", train.sequences_per_forward)
    check_shardable(config.model, train)
