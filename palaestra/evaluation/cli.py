"""``palaestra eval``: evaluate the configured model, or a trained checkpoint, on the test split."""

from __future__ import annotations

from pathlib import Path

import torch

from palaestra import checkpoint as ckpt
from palaestra.config import ConfigError, PalaestraConfig, reward_weights
from palaestra.evaluation.evaluate import evaluate
from palaestra.models import load_model_and_tokenizer, model_id
from palaestra.models.precision import resolve_precision
from palaestra.rollout import HFGenerator, SamplingParams
from palaestra.tasks.build import build_task


def load_trained_weights(model, checkpoint: Path):
    """Put a checkpoint's trained weights on ``model``: its LoRA adapter, or its full weights."""
    adapter = checkpoint / "adapter"
    if adapter.is_dir():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter))
    for parameter in model.parameters():  # full fine-tuning: every weight was trainable
        parameter.requires_grad_(True)
    ckpt.load_checkpoint(checkpoint, model=model, restore_rng=False)
    return model


def evaluate_command(config: PalaestraConfig) -> str:
    """Run the evaluation, log it to MLflow, and return a printable summary."""
    checkpoint = None
    if config.eval.checkpoint:
        checkpoint = ckpt.resolve_resume(config.eval.checkpoint, Path(config.eval.checkpoint))
        if checkpoint is None:
            raise ConfigError(f"eval.checkpoint={config.eval.checkpoint} holds no checkpoint; point it at a run folder or step-* folder")
    task = build_task(config.task)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_and_tokenizer(config.model.name, path=config.model.path, dtype=config.model.dtype, device=device)
    if checkpoint is not None:
        model = load_trained_weights(model, checkpoint)
    model.eval()
    ev = config.eval
    precision = resolve_precision(config.model.precision, device)
    generator = HFGenerator(model, tokenizer, max_prompt_length=config.algo.max_prompt_length, precision=precision)
    sampling = SamplingParams(ev.max_new_tokens or config.algo.max_completion_length, ev.temperature, ev.top_p, ev.top_k, greedy=ev.greedy)
    examples = task.test[: ev.max_examples or None]
    result = evaluate(
        generator, task, examples, reward_weights=reward_weights(config.task), format_reward=config.task.format_reward,
        sampling=sampling, num_samples=ev.num_samples, pass_k=list(ev.pass_k), batch_size=ev.batch_size,
        seed=config.train.seed, show_progress=True,
    )
    figures = result.metrics()
    where = ""
    if config.tracking.enabled:
        from palaestra.tracking import MlflowTracker, flatten_config
        from omegaconf import OmegaConf

        tracker = MlflowTracker(config.tracking.experiment, run_name=config.tracking.run_name or f"eval-{config.task.name}",
                                tracking_uri=config.tracking.tracking_uri)
        tracker.log_params(flatten_config(OmegaConf.to_container(OmegaConf.structured(config), resolve=True)))
        tracker.set_tags({"task": config.task.name, "algo": "eval", "model": model_id(config.model.name, config.model.path),
                          "dataset_version": task.dataset_version, "checkpoint": str(checkpoint or "")})
        tracker.log_metrics({f"eval/{k}": v for k, v in figures.items()}, step=0)
        tracker.log_table(result.samples, "eval/samples.json")
        tracker.end()
        where = f"\nMLflow run {tracker.run_id}: {tracker.run_url_hint()}"
    decoding = "greedy" if ev.greedy else f"sampled x{ev.num_samples} (T={ev.temperature})"
    lines = [f"{config.task.name} test split, {result.num_examples} questions, {decoding}"]
    lines += [f"  {key:<16}{value:.3f}" for key, value in figures.items()]
    return "\n".join(lines) + where
