"""The ``task`` section (grpo): examples from a generator or a file, the rewards that score completions,
task mixtures and workflow writing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from palaestra.config.errors import ConfigError, check, not_a_file, one_of

__all__ = ["ExecutorConfig", "MixtureComponent", "TaskConfig", "WorkflowConfig", "reward_weights", "validate_task"]

TASK_SOURCES = ("reasoning_gym", "gsm8k", "code", "qa", "mixture")


def reward_weights(task: "TaskConfig") -> dict[str, float]:
    """Reward name -> weight, from the task's two parallel lists."""
    weights = task.reward_weights or [1.0] * len(task.rewards)
    return {name: float(weight) for name, weight in zip(task.rewards, weights)}


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
    cost_per_million_tokens: float = 0.0
    """The executor's price per million tokens: a workflow's usage summary (AFlow's
    self.llm.get_usage_summary()["total_cost"]) is its real executor tokens at this price; 0 for a local model."""
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
    isolation: str = "process"
    """process: each workflow runs in a process of its own, killed at timeout_s and limited to memory_mb more
    address space (a workflow that hogs either fails alone, its executor calls still batched with the others'); none:
    in the trainer's process (faster to start; a huge C-level operation there stalls the step)."""
    memory_mb: int = 1024
    """With isolation=process: the address space (virtual memory, RLIMIT_AS) one workflow's process may take beyond
    what it starts with."""
    sandbox_seconds: float = 5.0
    """Limit of each sandboxed program (Programmer, Test, the code reward's tests)."""
    experience_size: int = 8
    """Workflows with reward >= 0.7 kept per domain (saved in checkpoints); 0 disables the buffer."""
    experience_shots: int = 1
    """Buffer entries shown as examples in each prompt."""


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
    show_passage: bool = True
    """source=qa: put the passage in the question; false asks the question alone (answer it by searching,
    agent.tools=[search])."""
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


def validate_task(task: TaskConfig) -> None:
    one_of("task.source", task.source, TASK_SOURCES)
    check(task.show_passage or task.source == "qa",
          f"task.show_passage=false applies to task.source=qa only, not {task.source}; remove it")
    if task.source == "reasoning_gym":
        from reasoning_gym.factory import DATASETS

        check(
            task.dataset in DATASETS,
            f"task.dataset={task.dataset!r} is not a reasoning-gym dataset; e.g. chain_sum, basic_arithmetic, countdown, gsm_symbolic",
        )
    elif task.source in ("code", "qa", "mixture"):
        _validate_mixture_and_workflow(task)
    else:
        check(bool(task.path), "task.source=gsm8k needs task.path=<GSM8K-format JSONL file>")
        for key in ("path", "test_path"):
            value = getattr(task, key)
            check(
                value is None or os.path.isfile(value),
                f"task.{key}={value} {not_a_file(value)}; point it at a GSM8K-format JSONL file",
            )
    _validate_workflow(task)
    try:
        task.template.format(question="", instruction="")
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"task.template={task.template!r} is not valid: use only {{question}} and {{instruction}} ({error})") from None
    check(task.train_size > 0, f"task.train_size={task.train_size} must be positive")
    check(task.test_size > 0, f"task.test_size={task.test_size} must be positive")
    check(bool(task.rewards), "task.rewards is empty; give at least one reward, e.g. task.rewards=[correctness]")
    check(
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
    check(bool(parts), "task.source=mixture needs task.components, e.g. task=mixture (math 0.4, qa 0.3, code 0.3)")
    for name, part in parts.items():
        key = "task" if name == "task" else f"task.components.{name}"
        if name != "task":
            one_of(f"{key}.source", part.source, ("reasoning_gym", "gsm8k", "code", "qa"))
            check(part.ratio > 0, f"{key}.ratio={part.ratio} must be > 0")
            check(part.domain in (None, "math", "qa", "code"), f"{key}.domain={part.domain!r} is unknown; use math, qa or code")
        if part.source == "reasoning_gym":
            check(part.path is None, f"{key}.path is set but {key}.source=reasoning_gym generates its problems; "
                   f"set {key}.source=gsm8k, code or qa to read the file")
            check(part.dataset in DATASETS, f"{key}.dataset={part.dataset!r} is not a reasoning-gym dataset; e.g. gsm_symbolic")
        check(part.source != "gsm8k" or bool(part.path), f"{key}.source=gsm8k needs {key}.path=<GSM8K-format JSONL file>")
        for field_name in ("path", "test_path"):
            value = getattr(part, field_name)
            check(value is None or os.path.isfile(value),
                   f"{key}.{field_name}={value} {not_a_file(value)}; point it at a JSONL file")


def _validate_workflow(task: TaskConfig) -> None:
    """task.workflow (when enabled): the executor backend and the per-workflow limits."""
    flow = task.workflow
    if flow.enabled:
        executor = flow.executor
        one_of("task.workflow.executor.backend", executor.backend, ("embedded", "policy", "url", "scripted"))
        check(executor.backend != "url" or bool(executor.url),
               "task.workflow.executor.backend=url needs task.workflow.executor.url=<http://host:port/v1>")
        from palaestra.models.loading import EMBEDDED_MODELS

        check(executor.backend != "embedded" or executor.model in (*EMBEDDED_MODELS, "tiny"),
               f"task.workflow.executor.model={executor.model!r} is not an embedded model; use one of "
               f"{', '.join(EMBEDDED_MODELS)} (or tiny), or backend=url")
        check(executor.api_key_env is None or bool(os.environ.get(executor.api_key_env)),
               f"task.workflow.executor.api_key_env={executor.api_key_env} is not set in the environment")
        check(executor.max_tokens > 0, f"task.workflow.executor.max_tokens={executor.max_tokens} must be positive")
        check(executor.temperature >= 0, f"task.workflow.executor.temperature={executor.temperature} must be >= 0")
        check(executor.cost_per_million_tokens >= 0,
              f"task.workflow.executor.cost_per_million_tokens={executor.cost_per_million_tokens} must be >= 0")
        for key in ("max_calls", "max_tokens", "timeout_s", "sandbox_seconds", "memory_mb"):
            check(getattr(flow, key) > 0, f"task.workflow.{key}={getattr(flow, key)} must be positive")
        one_of("task.workflow.isolation", flow.isolation, ("process", "none"))
        for key in ("experience_size", "experience_shots"):
            check(getattr(flow, key) >= 0, f"task.workflow.{key}={getattr(flow, key)} must be >= 0")
