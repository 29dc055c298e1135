"""Configuration: the sections every method shares, as documented dataclasses, each beside its checks.

Each method's whole schema sits beside its recipe (``palaestra/recipes/<method>_config.py``) and is
made of these sections plus its own ``algo`` and ``train`` keys; :mod:`palaestra.recipes.methods` lists
them, and :mod:`palaestra.jobs` composes the command line into one of them. Every mistake is a
:class:`ConfigError` (:mod:`palaestra.config.errors`, which imports nothing of palaestra) whose
message is one line naming the key, the value and the fix.
"""

from palaestra.config.commands import (
    ExportConfig,
    ExportJob,
    PipelineConfig,
    PipelineData,
    PipelineJob,
    ServeConfig,
    ServeJob,
)
from palaestra.config.data import ChatData, DataSource, PairData, PromptData
from palaestra.config.env import EnvConfig, PolicyConfig
from palaestra.config.errors import ConfigError, check_writable
from palaestra.config.evaluation import CheckpointEval, EvalConfig, GenerationEval, SampledEval
from palaestra.config.model import EncoderConfig, LoraSettings, ModelChoice, ModelConfig, ServedModel
from palaestra.config.run import OptimizerSettings, RunSettings, StepLoopSettings
from palaestra.config.task import ExecutorConfig, MixtureComponent, TaskConfig, WorkflowConfig, reward_weights
from palaestra.config.tracking import (
    ContractTracking,
    PolicyTracking,
    RegisteredPolicyTracking,
    RegisteredTracking,
    TrackingConfig,
)

__all__ = [
    "ChatData", "CheckpointEval", "ConfigError", "ContractTracking", "DataSource", "EncoderConfig", "EnvConfig",
    "EvalConfig", "ExecutorConfig", "ExportConfig", "ExportJob", "GenerationEval", "LoraSettings", "MixtureComponent",
    "ModelChoice", "ModelConfig", "OptimizerSettings", "PairData", "PipelineConfig", "PipelineData", "PipelineJob",
    "PolicyConfig", "PolicyTracking", "PromptData", "RegisteredPolicyTracking", "RegisteredTracking", "RunSettings",
    "SampledEval", "ServeConfig", "ServeJob", "ServedModel", "StepLoopSettings", "TaskConfig", "TrackingConfig",
    "WorkflowConfig", "check_writable", "reward_weights",
]
