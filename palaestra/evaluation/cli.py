"""``palaestra eval``: evaluate the configured model, or a trained checkpoint, on the test split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from palaestra import checkpoint as ckpt
from palaestra.checkpoint import checkpoint_path, load_trained_weights
from palaestra.config import reward_weights
from palaestra.config.errors import ConfigError
from palaestra.evaluation.evaluate import evaluate
from palaestra.models import load_model_and_tokenizer, model_id
from palaestra.models.precision import resolve_precision, weights_dtype
from palaestra.runtime import training_device
from palaestra.rollout import HFGenerator, SamplingParams
from palaestra.tasks.build import build_task

log = logging.getLogger("palaestra")


def evaluate_command(config) -> str:
    """Run the evaluation, log it to MLflow, and return a printable summary."""
    checkpoint = checkpoint_path(config.eval.checkpoint)
    task = build_task(config.task)
    device = training_device(config.train.device)
    precision = resolve_precision(config.model.precision, device)
    dtype = weights_dtype(config.model.dtype, precision, lora=checkpoint is not None and (checkpoint / "adapter").is_dir())
    model, tokenizer = load_model_and_tokenizer(config.model.name, path=config.model.path, dtype=dtype, device=device)
    if checkpoint is not None:
        model = load_trained_weights(model, checkpoint)
    model.eval()
    ev = config.eval
    generator = HFGenerator(model, tokenizer, max_prompt_length=config.algo.max_prompt_length, precision=precision)
    task.bind(generator)  # a workflow task's executor may be the evaluated model with its adapter off
    sampling = SamplingParams(ev.max_new_tokens or config.algo.max_completion_length, ev.temperature, ev.top_p, ev.top_k, greedy=ev.greedy)
    examples = task.test[: ev.max_examples or None]
    result = evaluate(
        generator, task, examples, reward_weights=reward_weights(config.task), format_reward=config.task.format_reward,
        sampling=sampling, num_samples=ev.num_samples, pass_k=list(ev.pass_k), batch_size=ev.batch_size,
        seed=config.train.seed, show_progress=True,
    )
    figures = result.metrics()
    figures.update(task.evaluation_figures(result.samples))  # a workflow task: validity, outcome shares, ... per domain
    from omegaconf import OmegaConf

    from palaestra.tracking import flatten_config

    _, where = track_evaluation(
        config.tracking, f"eval-{config.task.name}", figures,
        tags={"task": config.task.name, "algo": "eval", "model": model_id(config.model.name, config.model.path),
              "dataset_version": task.dataset_version, "checkpoint": str(checkpoint or "")},
        params=flatten_config(OmegaConf.to_container(OmegaConf.structured(config), resolve=True)),
        artifacts=lambda tracker: tracker.log_table(result.samples, "eval/samples.json"),
    )
    decoding = "greedy" if ev.greedy else f"sampled x{ev.num_samples} (T={ev.temperature})"
    lines = [f"{config.task.name} test split, {result.num_examples} questions, {decoding}"]
    width = max(16, *(len(key) + 1 for key in figures))  # the workflow task's figure names are long
    lines += [f"  {key:<{width}}{value:.3f}" for key, value in figures.items()]
    return "\n".join(lines) + where


def track_evaluation(tracking, run_name: str, figures: dict, *, tags: dict, params: dict | None = None,
                     artifacts: Callable | None = None) -> tuple[str | None, str]:
    """Log an evaluation as its own MLflow run (``eval/<figure>`` at step 0, ``artifacts(tracker)`` for
    its files); returns (its run id, the line that says where it is). A store that cannot be reached costs
    a warning, not the figures (an error with ``tracking.required``)."""
    from palaestra.tracking import MlflowTracker, TrackingError
    from palaestra.tracking.buffered import fail_fast

    if not tracking.enabled:
        return None, ""
    fail_fast()  # one attempt per write, not minutes of retries
    try:
        tracker = MlflowTracker(tracking.experiment, run_name=tracking.run_name or run_name, tracking_uri=tracking.tracking_uri)
        if params:
            tracker.log_params(params)
        tracker.set_tags(tags)
        tracker.log_metrics({f"eval/{k}": v for k, v in figures.items()}, step=0)
        if artifacts:
            artifacts(tracker)
        tracker.end()
    except TrackingError as error:
        if tracking.required:
            raise
        log.warning("the evaluation was not tracked: %s", error)
        return None, ""
    return tracker.run_id, f"\nMLflow run {tracker.run_id}: {tracker.run_url_hint()}"


def evaluate_team_command(config) -> str:
    """``palaestra eval algo=at_grpo env=...``: play the test problems with the (trained) team."""
    from palaestra.envs import resolve_env
    from palaestra.models.policies import build_policies, reusing_weights
    from palaestra.evaluation.team import evaluate_team, team_sampling

    checkpoint = checkpoint_path(config.eval.checkpoint)
    env_class = resolve_env(config.env.name)
    make_env = lambda: env_class(**dict(config.env.params))  # noqa: E731
    roles = tuple(make_env().turn_order)
    device = training_device(config.train.device)
    lora = config.model.lora
    lora_args = dict(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules) if lora.enabled else None
    precision = resolve_precision(config.model.precision, device)
    policies, role_policy = build_policies(
        config.policy.mode, roles, model_name=config.model.name, model_path=config.model.path,
        dtype=weights_dtype(config.model.dtype, precision, lora.enabled),
        device=device, lora=lora_args, role_models=dict(config.policy.role_models),
        max_prompt_length=config.algo.max_prompt_length, precision=precision,
    )
    if checkpoint is not None:
        parts = {name: ckpt.CheckpointPart(policy.parameters()) for name, policy in policies.items()}
        ckpt.load_checkpoint(checkpoint, parts=parts, restore_rng=False)

    def generate(agent, prompts, samples, sampling):
        policy = policies[role_policy[agent]]
        policy.activate()
        return policy.generator.generate(prompts, samples, sampling)

    sampling, plays = team_sampling(config.eval, config.algo.max_completion_length)
    with reusing_weights(policies):
        figures, episodes = evaluate_team(make_env, generate, config.env.test_envs, sampling=sampling, plays=plays,
                                          alpha=config.algo.alpha, seed=config.train.seed, base_seed=config.env.seed)
    _, where = track_evaluation(
        config.tracking, f"eval-{config.env.name}", figures,
        tags={"env": config.env.name, "algo": "eval", "policy": config.policy.mode,
              "model": model_id(config.model.name, config.model.path), "checkpoint": str(checkpoint or "")},
        artifacts=lambda tracker: tracker.log_dict({"episodes": [vars(e) for e in episodes[:8]]}, "transcripts/eval.json"),
    )
    decoding = "greedy" if config.eval.greedy else f"sampled x{config.eval.num_samples} (T={config.eval.temperature})"
    lines = [f"{config.env.name} test problems: {config.env.test_envs}, policy {config.policy.mode}, {decoding}"]
    lines += [f"  {key:<22}{value:.3f}" for key, value in figures.items()]
    return "\n".join(lines) + where


def evaluate_index_command(config) -> str:
    """``palaestra eval algo=rag eval.checkpoint=RUN``: search a built index with the judged queries."""
    from palaestra.recipes.rag import sources
    from palaestra.retrieval.data import read_queries
    from palaestra.retrieval.index import IndexError_, RetrievalIndex, evaluate_index

    if not config.eval.checkpoint:
        raise ConfigError("palaestra eval algo=rag needs eval.checkpoint=<a rag run folder or its index folder>")
    given = Path(config.eval.checkpoint)
    folder = given if (given / "index.json").is_file() else given / "index"
    name, _, queries_path = sources(config.algo)
    if queries_path is None:
        raise ConfigError("algo.queries is empty: give a judged queries JSONL file to evaluate the index with")
    try:
        index = RetrievalIndex.load(folder)
    except IndexError_ as error:
        raise ConfigError(str(error)) from None
    queries = read_queries(queries_path, {d.id for d in index.documents})
    figures = evaluate_index(index, queries, list(config.algo.ks))
    _, where = track_evaluation(config.tracking, f"eval-{name}-rag", figures,
                             tags={"algo": "eval", "index": str(folder.resolve()), "queries": str(queries_path), "mode": index.mode})
    lines = [f"{index.mode} index of {len(index.documents)} documents, {len(queries)} judged queries ({queries_path})"]
    lines += [f"  {key:<16}{value:.3f}" for key, value in figures.items()]
    return "\n".join(lines) + where


def evaluate_language_model_command(config) -> str:
    """``palaestra eval algo=mamba eval.checkpoint=RUN``: the held-out perplexity of a trained language model.

    The held-out documents are the training run's when ``algo.corpus``, ``algo.val_fraction`` and
    ``train.seed`` are the same; ``eval.checkpoint`` is a finished mamba run folder or its ``model/``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palaestra.language_model import chunk, held_out_figures, read_corpus, split_documents, token_stream

    if not config.eval.checkpoint:
        raise ConfigError("palaestra eval algo=mamba needs eval.checkpoint=<a finished mamba run folder or its model folder>")
    given = Path(config.eval.checkpoint)
    folder = given if (given / "config.json").is_file() else given / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"eval.checkpoint={given} holds no exported model (model/config.json); point it at a finished "
                          "mamba run folder (palaestra train --target=mamba) or its model folder")
    algo = config.algo
    corpus = read_corpus(algo.corpus)
    _, held_out = split_documents(corpus.documents, algo.val_fraction, config.train.seed)
    device = training_device(config.train.device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).to(device)
    chunks = chunk(token_stream(tokenizer, [d.text for d in held_out]), algo.max_length)
    figures = held_out_figures(model, chunks, batch_size=config.train.sequences_per_forward, pad_id=tokenizer.pad_token_id,
                               device=device)
    _, where = track_evaluation(config.tracking, f"eval-{corpus.name}-mamba", figures,
                             tags={"algo": "eval", "model": str(folder.resolve()), "corpus": corpus.name})
    tokens = sum(len(c) - 1 for c in chunks)
    lines = [f"{folder}: {corpus.name} held-out split, {len(held_out)} documents, {tokens} predicted tokens"]
    lines += [f"  {key:<16}{value:.4f}" for key, value in figures.items()]
    return "\n".join(lines) + where
