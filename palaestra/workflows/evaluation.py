"""Per-domain figures of written workflows, and the before/after plot of how their runs ended.

For each domain (and ``all``), under ``workflow/<domain>/``:

- ``accuracy``: executed accuracy, the share of workflows whose own (credited) answer earned >= 0.7;
- ``mean_reward``: the mean 5-tier reward after penalties; ``mean_answer_tier`` before penalties;
- ``validity_rate``: the share whose code passed the static checks as written;
- ``share/<outcome>`` for parse_failure, validation_failure, repaired, runtime_error and clean (one
  outcome per workflow, they sum to 1) and ``share/fallback`` (parse or validation failure);
- ``operator_match_rate``: among workflows that ran the policy's code, the share that used no operator
  mismatched to the domain (absent when none ran);
- ``executor_calls``: mean executor calls per workflow (cache hits included).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["OUTCOMES", "evaluate_workflows", "plot_outcome_shares", "workflow_figures"]

OUTCOMES = ("parse_failure", "validation_failure", "repaired", "runtime_error", "clean")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def workflow_figures(scores: list, domains: list[str]) -> dict[str, float]:
    """The figures above from :class:`~palaestra.workflows.task.WorkflowScore` s and their examples' domains."""
    figures: dict[str, float] = {}
    groups = {"all": list(scores)}
    for score, domain in zip(scores, domains, strict=True):
        groups.setdefault(domain, []).append(score)
    for name, rows in groups.items():
        if not rows:
            continue
        prefix = f"workflow/{name}/"
        figures[prefix + "accuracy"] = _mean(s.correct for s in rows)
        figures[prefix + "mean_reward"] = _mean(s.reward for s in rows)
        figures[prefix + "mean_answer_tier"] = _mean(s.tier for s in rows)
        figures[prefix + "validity_rate"] = _mean(s.outcome.validation.valid for s in rows)
        for outcome in OUTCOMES:
            figures[prefix + f"share/{outcome}"] = _mean(s.outcome.kind == outcome for s in rows)
        figures[prefix + "share/fallback"] = _mean(s.outcome.validation.fallback for s in rows)
        ran = [s for s in rows if not s.outcome.validation.fallback]
        if ran:
            figures[prefix + "operator_match_rate"] = _mean(not s.operator_mismatch for s in ran)
        figures[prefix + "executor_calls"] = _mean(s.outcome.calls for s in rows)
    return figures


def evaluate_workflows(generator, task, examples, sampling, *, batch_size: int = 16) -> tuple[dict[str, float], list[dict]]:
    """Have the policy write one workflow per example, run them all, and return (figures, sample rows).

    ``task`` is a :class:`~palaestra.workflows.task.WorkflowTask`; each row holds the problem, the workflow as
    written, the code that ran, how it ended, its answer and reward (the sample workflows to keep as artifacts).
    """
    scores, rows = [], []
    with generator.reusing_weights():  # the policy does not change during an evaluation
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            completions = generator.generate([task.prompt(e) for e in chunk], 1, sampling).texts
            chunk_scores = task.score(completions, chunk)
            scores += chunk_scores
            for example, completion, score in zip(chunk, completions, chunk_scores):
                rows.append({"domain": task.domain(example), "question": example.question, "gold": example.answer,
                             "workflow": completion, "ran": score.outcome.validation.code, "outcome": score.outcome.kind,
                             "repairs": score.outcome.validation.repairs, "errors": score.outcome.validation.errors,
                             "runtime_error": score.outcome.runtime_error, "answer": score.outcome.answer,
                             "reward": score.reward, "executor_calls": score.outcome.calls})
    return workflow_figures(scores, [task.domain(e) for e in examples]), rows


def plot_outcome_shares(before: dict[str, float], after: dict[str, float], path: str | Path) -> Path:
    """Stacked bars of the outcome shares per domain, before and after training; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({key.split("/")[1] for key in {**before, **after} if key.startswith("workflow/")})
    fig, ax = plt.subplots(figsize=(1.6 * max(2, 2 * len(domains)), 4))
    columns = [(domain, label, figures) for domain in domains for label, figures in (("before", before), ("after", after))]
    bottoms = [0.0] * len(columns)
    for outcome in OUTCOMES:
        heights = [figures.get(f"workflow/{domain}/share/{outcome}", 0.0) for domain, _, figures in columns]
        ax.bar(range(len(columns)), heights, bottom=bottoms, label=outcome.replace("_", " "))
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(range(len(columns)), [f"{domain}\n{label}" for domain, label, _ in columns])
    ax.set_ylabel("share of workflows")
    ax.set_ylim(0, 1)
    ax.set_title("How the written workflows ended, before and after training")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
