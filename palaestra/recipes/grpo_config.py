"""GRPO's settings: the whole config of ``palaestra train algo=grpo`` (the recipe: :mod:`palaestra.recipes.grpo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from palaestra.config.agent import AgentSettings
from palaestra.config.errors import check
from palaestra.config.evaluation import EvalConfig
from palaestra.config.model import ModelConfig
from palaestra.config.rollout import RolloutSettings
from palaestra.config.run import ChunkedLogprobs, ShardingSettings, StepLoopSettings, check_batch, check_shardable
from palaestra.config.sampling import ClippedObjective, SamplingSettings
from palaestra.config.task import TaskConfig
from palaestra.config.tracking import TrackingConfig

__all__ = ["GRPOAlgo", "GRPOConfig", "GRPOTrain", "validate_grpo"]

@dataclass
class GRPOAlgo(ClippedObjective, SamplingSettings):
    """GRPO: the clipped objective on advantages relative to a group of completions per prompt."""

    max_completion_length: int = 24
    """Maximum new tokens per completion."""
    temperature: float = 0.8
    """Sampling temperature (initial value when a schedule is set)."""
    name: str = "grpo"
    """Algorithm name (recipe)."""
    num_generations: int = 8
    """Completions per prompt (the group size G); at least 2."""
    num_iterations: int = 1
    """Optimizer updates per rollout batch (mu); >1 stores the old log-probs."""
    mask_truncated_completions: bool = False
    """Exclude completions that hit max_completion_length without an end token from the loss."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment (arXiv:2503.14476): over the last this many tokens of
    max_completion_length a reward term falls linearly from 0 to -overlong_penalty (logged as reward/overlong);
    0 turns it off."""
    overlong_penalty: float = 1.0
    """The weight of that term: a completion that uses the whole budget loses this much reward."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (arXiv:2503.14476): drop the groups whose rewards are all equal (no advantage, no
    gradient) and draw fresh prompts until the step has its prompts_per_step groups (logged: sampling/rounds,
    sampling/dropped_share); a step that finds none makes no update."""
    max_sampling_rounds: int = 3
    """With dynamic_sampling: the most rounds of prompts_per_step prompts one step draws."""
    teacher: Optional[str] = None
    """On-policy distillation (Agarwal et al. arXiv:2306.13649; Thinking Machines 2025): a teacher scores the
    student's sampled tokens and each token's advantage becomes reward_coef x the task's advantage less
    teacher_coef x its reverse-KL estimate, log pi_student - log pi_teacher (logged: distill/reverse_kl). A palaestra
    run folder (or its checkpoints/step-* folder) trained on this model's base, or a local model folder with
    the same tokenizer; None: off."""
    teacher_coef: float = 1.0
    """With a teacher: the weight of its per-token term."""
    reward_coef: float = 1.0
    """With a teacher: the weight of the task's group advantage (0: pure distillation, rewards only logged)."""
    temperature_final: Optional[float] = None
    """Final temperature of a linear schedule; None keeps the temperature constant."""
    temperature_schedule_steps: int = 0
    """Steps over which the temperature moves linearly from temperature to temperature_final."""


@dataclass
class GRPOTrain(StepLoopSettings, ChunkedLogprobs, ShardingSettings):
    """GRPO's loop: steps of one rollout batch each, and how that batch is cut for the forward/backward."""

    steps: int = 120
    """Rollout-and-update steps (120: the main job, palaestra run, moves held-out chain_sum accuracy by about
    +33 points on 2 CPU cores with native bf16: bench/RESULTS.md)."""
    time_budget_s: float = 540.0
    """Fit the run to this many seconds of training (steps and their evaluations): after 3 steps, and after every
    step from then on, the run's step count becomes the steps that fit at the measured time per step (at most
    train.steps; logged as budget/planned_steps) and the learning-rate schedule is fitted to it. 540: the main job
    trains for 9 minutes at most, on a CPU with native bf16 or without (bench/RESULTS.md); 0: train.steps, however
    long they take."""
    completions_per_step: int = 32
    """Completions sampled per step (prompts per step = completions_per_step / algo.num_generations)."""
    completions_per_forward: int = 8
    """Completions per forward/backward; completions_per_step / completions_per_forward is the gradient accumulation."""
    share_prompt_forward: bool = True
    """Pack the training forward: each group's shared prompt once, completions without padding (same numbers,
    less work); false runs the plain padded batch."""


@dataclass
class GRPOConfig:
    """``palaestra train algo=grpo``: a causal LM trained with GRPO on a task with verifiable rewards."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algo: GRPOAlgo = field(default_factory=lambda: GRPOAlgo())
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    train: GRPOTrain = field(default_factory=GRPOTrain)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def validate_grpo(config: GRPOConfig) -> None:
    """GRPO's own keys (its shared sections are checked first; cheap: no model, no dataset load)."""
    algo, train = config.algo, config.train
    check(algo.num_generations >= 2, f"algo.num_generations={algo.num_generations} must be >= 2 (GRPO compares completions within a group)")
    check(algo.num_iterations >= 1, f"algo.num_iterations={algo.num_iterations} must be >= 1")
    check(algo.temperature_final is None or algo.temperature_final > 0, f"algo.temperature_final={algo.temperature_final} must be > 0")
    check(0 <= algo.overlong_buffer <= algo.max_completion_length,
          f"algo.overlong_buffer={algo.overlong_buffer} must be in [0, algo.max_completion_length={algo.max_completion_length}]")
    check(algo.overlong_penalty >= 0, f"algo.overlong_penalty={algo.overlong_penalty} must be >= 0")
    check(algo.max_sampling_rounds >= 1, f"algo.max_sampling_rounds={algo.max_sampling_rounds} must be >= 1")
    if algo.teacher is not None:
        from palaestra.checkpoint import trained_model_source
        from palaestra.config.model import model_id

        trained_model_source(algo.teacher, "algo.teacher", model_id(config.model.name, config.model.path))
        check(algo.teacher_coef >= 0 and algo.reward_coef >= 0 and algo.teacher_coef + algo.reward_coef > 0,
              f"algo.teacher_coef={algo.teacher_coef} and algo.reward_coef={algo.reward_coef} must be >= 0, "
              "not both 0")
    check(config.rollout.quantize == "none" or train.strategy != "fsdp",
          "rollout.quantize=int8 quantizes whole weights, which train.strategy=fsdp shards; use train.strategy=ddp with it")
    check(not (algo.dynamic_sampling and train.strategy == "fsdp"),
          "algo.dynamic_sampling leaves processes with different numbers of groups, which train.strategy=fsdp cannot "
          "step in lockstep; use train.strategy=ddp with it")
    engine = config.rollout.engine
    if engine == "vllm":
        _check_vllm(config)
    if engine != "hf":
        check(config.model.lora.enabled, f"rollout.engine={engine} serves the trained LoRA adapter; set "
                                         "model.lora.enabled=true or use rollout.engine=hf")
        check(train.strategy == "ddp", f"rollout.engine={engine} syncs the adapter from whole weights; use "
                                       "train.strategy=ddp with it")
    check_shardable(config.model, train)
    agent = "agent.tools" if config.agent.tools else "agent.program" if config.agent.program else None
    if agent:
        check(engine == "hf", f"{agent} runs its episodes on rollout.engine=hf (rollout.engine={engine} samples one "
                              "turn per completion); use rollout.engine=hf")
        check(config.rollout.quantize == "none", f"{agent} samples its turns at full precision (its trajectories carry "
                                                 "no sampler log-probs to correct); use rollout.quantize=none with it")
        check(not config.task.workflow.enabled, f"{agent} and task.workflow.enabled both shape the completions; "
                                                "use one of them")
    if config.agent.program:
        check(not algo.dynamic_sampling, "algo.dynamic_sampling keeps groups of completions, and a program episode is "
                                         "several calls; turn it off with agent.program")
        check(algo.overlong_buffer == 0, "algo.overlong_buffer scores a completion's length, and a program episode is "
                                         "several calls; set algo.overlong_buffer=0 with agent.program")

    check(train.completions_per_step % algo.num_generations == 0,
          f"train.completions_per_step={train.completions_per_step} is not divisible by algo.num_generations="
          f"{algo.num_generations}; use a multiple of the group size")
    check_batch("train.completions_per_step", train.completions_per_step, "train.completions_per_forward",
                train.completions_per_forward)


def _check_vllm(config: GRPOConfig) -> None:
    """vLLM rollouts serve the trained LoRA adapter over a base model folder, on a CUDA GPU."""
    import importlib.util

    check(importlib.util.find_spec("vllm") is not None,
          "rollout.engine=vllm needs the vllm package: pip install -e '.[gpu]' (or use rollout.engine=hf)")
    check(config.model.name != "tiny", "rollout.engine=vllm needs a model folder; model=tiny exists only in memory")
    import torch

    check(torch.cuda.is_available(), "rollout.engine=vllm needs a CUDA GPU; use rollout.engine=hf on this machine")
