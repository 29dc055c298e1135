"""Evaluate a policy on a task's held-out split: accuracy, format accuracy, mean reward, pass@k.

With greedy decoding and one sample per question, accuracy is plain accuracy. With ``n`` sampled
completions per question, accuracy is the mean over all samples (pass@1) and pass@k uses the
unbiased estimator. Evaluation runs under a forked RNG with its own seed, so evaluating in the
middle of training never changes what training samples next (exact resume stays exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from palaestra.evaluation.metrics import mean_pass_at_k
from palaestra.rewards import combine_rewards, resolve_reward
from palaestra.rollout import SamplingParams


@dataclass
class EvalResult:
    """Aggregate figures of one evaluation, plus every sample for inspection."""

    accuracy: float
    format_accuracy: float
    mean_reward: float
    pass_at_k: dict[int, float]
    num_examples: int
    samples: list[dict] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        figures = {
            "accuracy": self.accuracy,
            "format_accuracy": self.format_accuracy,
            "mean_reward": self.mean_reward,
        }
        figures.update({f"pass@{k}": value for k, value in self.pass_at_k.items()})
        return figures


def evaluate(
    generator,
    task,
    examples,
    *,
    reward_weights: dict[str, float],
    format_reward: str,
    sampling: SamplingParams,
    num_samples: int = 1,
    pass_k: list[int] = (1,),
    batch_size: int = 64,
    seed: int = 1234,
    show_progress: bool = False,
) -> EvalResult:
    """Generate ``num_samples`` completions per example and score them with the task's verifier."""
    format_fn = resolve_reward(format_reward)
    examples_per_batch = max(1, batch_size // num_samples)
    correct_counts: list[int] = []
    formatted = rewards_total = 0.0
    samples: list[dict] = []
    batches = range(0, len(examples), examples_per_batch)
    with torch.random.fork_rng(devices=[]), generator.reusing_weights():
        torch.manual_seed(seed)
        for start in tqdm(batches, desc="eval", disable=not show_progress, leave=False):
            chunk = examples[start : start + examples_per_batch]
            rollout = generator.generate([task.prompt(e) for e in chunk], num_samples, sampling)
            repeated = [e for e in chunk for _ in range(num_samples)]
            columns = task.columns(repeated)
            rewards, _ = combine_rewards(rollout.texts, columns, reward_weights)
            format_ok = format_fn(rollout.texts, **columns)
            transcripts = generator.transcripts() if hasattr(generator, "transcripts") else None  # a tool agent's
            for index, example in enumerate(chunk):
                rows = range(index * num_samples, (index + 1) * num_samples)
                correct = [task.is_correct(rollout.texts[r], example) for r in rows]
                correct_counts.append(sum(correct))
                for r, ok in zip(rows, correct):
                    samples.append(
                        {"question": example.question, "answer": example.answer, "completion": rollout.texts[r],
                         "correct": bool(ok), "reward": float(rewards[r]),
                         **({"transcript": transcripts[r]} if transcripts else {})}
                    )
            formatted += sum(1.0 for value in format_ok if value > 0)
            rewards_total += float(sum(rewards))
    total = len(examples) * num_samples
    return EvalResult(
        accuracy=sum(correct_counts) / total,
        format_accuracy=formatted / total,
        mean_reward=rewards_total / total,
        pass_at_k={k: mean_pass_at_k(correct_counts, num_samples, k) for k in pass_k},
        num_examples=len(examples),
        samples=samples,
    )
