"""The checks of the shared sections, run on every composed config (a method's or a command's) before the
checks of its own keys: no schema can forget one of its sections."""

from __future__ import annotations

from dataclasses import fields

from palaestra.config.agent import ToolSettings, validate_agent
from palaestra.config.commands import ServeConfig, validate_serve
from palaestra.config.data import DataSource, validate_data
from palaestra.config.env import EnvConfig, validate_env
from palaestra.config.evaluation import CheckpointEval, validate_eval
from palaestra.config.model import EncoderConfig, ModelChoice, validate_model
from palaestra.config.rollout import RolloutSettings, validate_rollout
from palaestra.config.run import (
    ChunkedLogprobs,
    EpochBudget,
    RunSettings,
    ShardingSettings,
    validate_chunked_logprobs,
    validate_epochs,
    validate_run,
    validate_sharding,
)
from palaestra.config.sampling import ClippedObjective, SamplingSettings, validate_objective, validate_sampling
from palaestra.config.task import TaskConfig, validate_task
from palaestra.config.tracking import TrackingConfig, validate_tracking

__all__ = ["validate_sections"]

SECTION_CHECKS = (
    ((ModelChoice, EncoderConfig), validate_model),
    (TaskConfig, validate_task),
    (EnvConfig, validate_env),
    (DataSource, validate_data),
    (EpochBudget, validate_epochs),
    (SamplingSettings, validate_sampling),
    (ClippedObjective, validate_objective),
    (RolloutSettings, validate_rollout),
    (ToolSettings, validate_agent),
    (RunSettings, validate_run),
    (ChunkedLogprobs, validate_chunked_logprobs),
    (ShardingSettings, validate_sharding),
    (CheckpointEval, validate_eval),
    (TrackingConfig, validate_tracking),
    (ServeConfig, validate_serve),
)


def validate_sections(config) -> None:
    """Check each section of ``config`` (a schema dataclass) that is made of shared parts, in the schema's
    order (an ``algo`` section may be made of several: sampling and objective)."""
    for section in fields(config):
        value = getattr(config, section.name)
        for kind, check_part in SECTION_CHECKS:
            if isinstance(value, kind):
                check_part(value)
