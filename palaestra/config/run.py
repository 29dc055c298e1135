"""The ``train`` section's building blocks: the run settings every method shares, the optimizer's and the
step loop's. Each method's own ``train`` section (beside its recipe) is made of these plus its batch keys,
named in its own terms (completions, answers, sequences, pairs, texts)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from palaestra.config.errors import ConfigError, check, check_writable, one_of

__all__ = ["ChunkedLogprobs", "EpochBudget", "OptimizerSettings", "PairTrain", "RunSettings", "ShardingSettings", "StepLoopSettings",
           "check_shardable", "validate_chunked_logprobs", "validate_epochs", "validate_run", "validate_sharding"]

DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class RunSettings:
    """The run around the loop: seed, device, run folder, resume, checkpoints and budgets (every method)."""

    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    threads: int = 0
    """CPU threads for torch (0 leaves torch's default)."""
    device: str = "auto"
    """Where to train: auto (a CUDA GPU when torch sees one, else the CPU), cpu or cuda."""
    output_dir: Optional[str] = None
    """Run folder (checkpoints, train.log); default runs/<subject>-<method>/<timestamp>."""
    resume: Optional[str] = None
    """auto (latest checkpoint of the run folder, if any) or a checkpoint / run folder path."""
    save_interval: int = 20
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_last_n: int = 3
    """Keep this many step checkpoints (0 keeps all)."""
    save_best: bool = True
    """Keep a copy of the checkpoint with the best eval metric under checkpoints/best."""
    best_metric: Optional[str] = None
    """Eval figure for save_best and early stopping; None: the method's own (accuracy for grpo, success_rate
    for at_grpo, val_loss for sft and mamba, pairwise_accuracy for reward, preference_accuracy for dpo, reward
    for ppo, macro_f1 for classifier, ndcg@10 for rag). Lower is better for a loss (named loss or ending in
    _loss), higher for the rest."""
    stop_after_steps: int = 0
    """Stop (saving a checkpoint) after this many steps of this invocation; 0 runs to the end."""
    max_seconds: float = 0.0
    """Wall-clock budget of this invocation's training loop: stop (saving a checkpoint) once spent; 0: none."""


@dataclass
class OptimizerSettings(RunSettings):
    """AdamW and its learning-rate schedule (every method that trains weights)."""

    learning_rate: float = 1e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.99
    """AdamW beta2."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer updates spent in linear warmup."""
    lr_schedule: str = "cosine"
    """After warmup: cosine (to 0) or constant."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations during the backward pass instead of keeping them from the forward:
    less memory for a longer step."""


@dataclass
class StepLoopSettings(OptimizerSettings):
    """A loop of rollout-and-update steps (grpo, at_grpo, ppo): its length, evaluations and sample tables."""

    steps: int = 50
    """Number of rollout-and-update steps."""
    time_budget_s: float = 0.0
    """Fit the run to this many seconds of training (steps and their evaluations): after 3 steps, and after every
    step from then on, the run's step count becomes the steps that fit at the measured time per step (at most
    train.steps; logged as budget/planned_steps) and the learning-rate schedule is fitted to it, so a slower machine
    trains fewer steps on a complete schedule; 0: train.steps, however long they take. Unlike train.max_seconds
    (which stops the run where it is), the run ends as planned."""
    eval_interval: int = 0
    """Evaluate on the held-out split every N steps (0: never during training)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement (0 disables)."""
    log_samples_interval: int = 10
    """Log a table of sample completions every N steps (0 disables)."""


@dataclass
class PairTrain(OptimizerSettings):
    """Updates on preference pairs (the reward model, dpo)."""

    pairs_per_step: int = 32
    """Preference pairs per optimizer update."""
    pairs_per_forward: int = 8
    """Preference pairs per forward/backward; pairs_per_step / pairs_per_forward is the gradient accumulation."""


@dataclass
class EpochBudget:
    """How long a method that makes passes over its data trains (the algo keys of sft, reward, dpo, mamba)."""

    epochs: int = 1
    """Passes over the training data."""
    max_steps: int = 0
    """Stop after this many optimizer updates (0: the epochs decide)."""


@dataclass
class ChunkedLogprobs:
    """How the training forward computes a policy's log-probs (the train keys of the GRPO family)."""

    logprob_chunk_tokens: int = 0
    """Run the LM head and the log-softmax over chunks of this many completion tokens, each recomputed in the
    backward pass, so the [tokens, vocabulary] logits never exist at once (less memory for long completions,
    the same numbers); 0: all at once."""


@dataclass
class ShardingSettings:
    """How several processes hold the model (the train keys of the methods FSDP shards: sft, dpo and grpo)."""

    strategy: str = "ddp"
    """ddp: every process holds the whole model and its optimizer state, and the gradients are summed; fsdp: each
    holds 1/N of the parameters, gradients and optimizer state (FSDP2), gathering a layer's weights only while it
    runs, and checkpoints are saved sharded. One process trains the whole model either way."""
    fsdp_cpu_offload: bool = False
    """With train.strategy=fsdp on GPUs: keep the parameter shards, their gradients and the optimizer state in CPU
    memory between uses (slower steps, for a model whose shards do not fit the GPUs)."""


STRATEGIES = ("ddp", "fsdp")


def validate_sharding(sharding: ShardingSettings) -> None:
    one_of("train.strategy", sharding.strategy, STRATEGIES)
    if sharding.fsdp_cpu_offload:
        check(sharding.strategy == "fsdp", "train.fsdp_cpu_offload offloads FSDP shards; it needs train.strategy=fsdp")
        import torch

        check(getattr(sharding, "device", "auto") != "cpu" and torch.cuda.is_available(),
              "train.fsdp_cpu_offload moves GPU shards to the CPU between uses; a CPU run keeps them there already, "
              "so drop it")


def check_shardable(model, sharding: ShardingSettings) -> None:
    """train.strategy=fsdp needs a causal LM with decoder layers: a local model folder's config.json says so
    before the model loads (the embedded and tiny models have them)."""
    if sharding.strategy != "fsdp" or not getattr(model, "path", None):
        return
    import json
    from pathlib import Path

    config_file = Path(model.path) / "config.json"
    if not config_file.is_file():
        return  # a GGUF file or a hub id: the run checks the loaded model
    try:
        settings = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return  # the model loader says what is wrong with it
    architectures = settings.get("architectures") or []
    check("num_hidden_layers" in settings and any(a.endswith("ForCausalLM") for a in architectures),
          f"train.strategy=fsdp shards a causal LM layer by layer, and {model.path} is a "
          f"{', '.join(architectures) or settings.get('model_type', 'model')} without decoder layers to shard; "
          "use train.strategy=ddp")


def validate_chunked_logprobs(chunks: ChunkedLogprobs) -> None:
    check(chunks.logprob_chunk_tokens >= 0, f"train.logprob_chunk_tokens={chunks.logprob_chunk_tokens} must be >= 0")


def validate_epochs(budget: EpochBudget) -> None:
    check(budget.epochs > 0, f"algo.epochs={budget.epochs} must be positive")
    check(budget.max_steps >= 0, f"algo.max_steps={budget.max_steps} must be >= 0")


def validate_run(train: RunSettings) -> None:
    """Every method's run settings (and, where the section has them, the optimizer's and the loop's)."""
    one_of("train.device", train.device, DEVICES)
    if train.device == "cuda":
        import torch

        check(torch.cuda.is_available(), "train.device=cuda but torch sees no CUDA GPU; use train.device=cpu (or auto), "
              "or install a CUDA build of torch")
    check(train.max_seconds >= 0, f"train.max_seconds={train.max_seconds} must be >= 0")
    for key in ("save_interval", "keep_last_n", "threads", "stop_after_steps"):
        check(getattr(train, key) >= 0, f"train.{key}={getattr(train, key)} must be >= 0")
    if isinstance(train, OptimizerSettings):
        check(train.learning_rate >= 0, f"train.learning_rate={train.learning_rate} must be >= 0")
        check(train.weight_decay >= 0, f"train.weight_decay={train.weight_decay} must be >= 0")
        check(0 <= train.warmup_ratio < 1, f"train.warmup_ratio={train.warmup_ratio} must be in [0, 1)")
        one_of("train.lr_schedule", train.lr_schedule, LR_SCHEDULES)
        check(train.max_grad_norm >= 0, f"train.max_grad_norm={train.max_grad_norm} must be >= 0")
    if isinstance(train, StepLoopSettings):
        check(train.steps > 0, f"train.steps={train.steps} must be positive")
        check(train.time_budget_s >= 0, f"train.time_budget_s={train.time_budget_s} must be >= 0 (0: no budget)")
        for key in ("eval_interval", "early_stopping_patience", "log_samples_interval"):
            check(getattr(train, key) >= 0, f"train.{key}={getattr(train, key)} must be >= 0")
        check(train.early_stopping_patience == 0 or train.eval_interval > 0,
              "train.early_stopping_patience needs train.eval_interval > 0 (it counts evaluations)")
    if isinstance(train, PairTrain):
        check_batch("train.pairs_per_step", train.pairs_per_step, "train.pairs_per_forward", train.pairs_per_forward)
    if train.output_dir:
        check_writable("train.output_dir", train.output_dir)
    _validate_resume(train)


def check_batch(step_key: str, step_size: int, forward_key: str, forward_size: int) -> None:
    """A step of ``step_size`` items taken in forwards of ``forward_size``: both positive, the second dividing the first."""
    check(step_size > 0, f"{step_key}={step_size} must be positive")
    check(forward_size > 0 and step_size % forward_size == 0, f"{forward_key}={forward_size} must divide {step_key}={step_size}")


def _validate_resume(train: RunSettings) -> None:
    """train.resume names a checkpoint that exists, and a resumed step loop has steps left to train (a checkpoint
    past train.steps would make the run a silent no-op). Reads folders and JSON only: no torch."""
    from pathlib import Path

    from palaestra import checkpoint as ckpt

    if train.resume == "auto":
        checkpoint = ckpt.latest_checkpoint(Path(train.output_dir)) if train.output_dir else None
    elif train.resume:
        try:
            checkpoint = ckpt.resolve_resume(train.resume, Path(train.resume))
        except FileNotFoundError:
            problem = "holds no complete checkpoint" if os.path.exists(train.resume) else "does not exist"
            raise ConfigError(f"train.resume={train.resume} {problem}; point it at a run folder or one of its "
                              "checkpoints/step-* folders, or use train.resume=auto") from None
    else:
        return
    if checkpoint is None:
        return
    sharded_world = int(os.environ.get("WORLD_SIZE", "1")) > 1 and getattr(train, "strategy", "ddp") == "fsdp"
    check(not sharded_world or ckpt.is_sharded_checkpoint(checkpoint),
          f"train.resume: {checkpoint} was saved by an unsharded run, which train.strategy=fsdp cannot load into its "
          "shards; resume it with train.strategy=ddp (a sharded checkpoint resumes under either strategy)")
    if not isinstance(train, StepLoopSettings):  # epochs decide the others' length
        return
    try:
        step = ckpt.read_trainer_state(checkpoint).get("step")
    except ckpt.CorruptCheckpoint:
        return  # the run says so (or, with resume=auto, falls back to the checkpoint before it)
    check(not isinstance(step, int) or step <= train.steps,
          f"train.steps={train.steps} is below the checkpoint's step: {checkpoint} is at step {step}; raise "
          f"train.steps above {step} to train on from it, or start a new run (another train.output_dir, no train.resume)")
