"""The offline replay gate: replay a dated dataset through a registered version, compare, tag.

    palaestra replay --model planner_model --version 2 --dataset datasets/planner/2026-11-22 --baseline 1

``replay`` loads ``models:/NAME/VERSION``, answers the test split of the dated folder greedily,
computes the task metrics, does the same for the baseline version, and applies the planner
template's pass rule (``palaestra.planner.metrics.passes_gate``): hard constraints fully respected,
soft quality metrics within 95% of the baseline's. Without a baseline only the hard rule applies.

What it records, all in MLflow:

- a run in experiment ``<task>_replay`` (``planner_replay``): params model, version, baseline,
  dataset_version; metrics ``candidate/*`` and ``baseline/*``; the per-example ``predictions.json``
  table and ``gate.json``; tag ``gate=pass|fail``;
- on the candidate model version: ``gate``, ``status`` (``candidate`` on pass, ``rejected`` on
  fail), ``replay_run_id``, ``replay_dataset_version``, ``replay_baseline``;
- on every version it scored, a ``replay_metrics.<dataset_version>`` tag with its metrics and the
  settings they were computed under (test-file hash, example count, token budget). A later replay
  that uses that version as its baseline with the same settings reads the tag instead of
  generating again: model versions are immutable, and greedy decoding is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from palaestra.config.errors import ConfigError
from palaestra.planner.metrics import SOFT_METRICS, passes_gate
from palaestra.registry.models import download_model, open_client, resolve_version
from palaestra.tracking import MlflowTracker, default_tracking_uri

__all__ = ["ReplayResult", "gate_rule", "load_replay_dataset", "replay", "replay_gate"]

log = logging.getLogger(__name__)

TEST_FILE = "test.jsonl"


@dataclass
class ReplayResult:
    """What one replay found; ``passed`` is the gate's verdict."""

    name: str
    """Registered model name."""
    version: str
    """Candidate model version."""
    baseline: str | None
    """Baseline model version, or None (hard constraints only)."""
    dataset_version: str
    """Name of the dated dataset folder."""
    data_name: str
    """Task of the dataset (``planner``: the planner metrics; otherwise exact match)."""
    num_examples: int
    """Test rows replayed."""
    candidate: dict[str, float]
    """The candidate's metrics."""
    baseline_metrics: dict[str, float] | None
    """The baseline's metrics, or None."""
    passed: bool
    """The gate's verdict."""
    reasons: list[str] = field(default_factory=list)
    """Why the gate failed (empty on pass)."""
    run_id: str = ""
    """The MLflow run of this replay."""
    baseline_cached: bool = False
    """True if the baseline's metrics came from its ``replay_metrics`` tag rather than a new generation."""


def gate_rule(data_name: str) -> dict:
    """``passes_gate`` keyword arguments for a task: which metrics are hard and which are soft.

    >>> gate_rule("planner")["hard"], gate_rule("qa")
    (('constraint_respect',), {'hard': (), 'soft': ('exact_match',)})
    """
    if data_name == "planner":  # the planner template's rule
        return {"hard": ("constraint_respect",), "soft": SOFT_METRICS}
    return {"hard": (), "soft": ("exact_match",)}


def replay_gate(
    candidate: dict[str, float], baseline: dict[str, float] | None, data_name: str = "planner"
) -> tuple[bool, list[str]]:
    """The gate's verdict and its reasons for a task's metrics (see ``gate_rule``)."""
    return passes_gate(candidate, baseline, **gate_rule(data_name))


def load_replay_dataset(folder: str | Path, max_examples: int = 0) -> tuple[list[dict], str, str]:
    """The test rows of a dated folder, its task name and its version (the folder's name).

    The task is the ``task`` of the folder's ``manifest.json``, else the parent folder's name
    (``datasets/planner/2026-11-22`` -> ``planner``). ``max_examples`` > 0 keeps the first ones.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {folder}")
    path = folder / TEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; replay reads the test split of a dated dataset folder")
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{path} line {number} is not JSON: {error.msg}") from None
    if not rows:
        raise ConfigError(f"{path} has no examples")
    data_name = folder.resolve().parent.name
    try:
        data_name = json.loads((folder / "manifest.json").read_text()).get("task", data_name)
    except (OSError, ValueError):
        pass
    return (rows[:max_examples] if max_examples > 0 else rows), data_name, folder.resolve().name


def _cache_key(dataset_version: str) -> str:
    return "replay_metrics." + re.sub(r"[^\w.\- ]", "_", dataset_version)


def _cached_metrics(version_tags: dict, key: str, settings: dict) -> dict[str, float] | None:
    try:
        record = json.loads(version_tags[key])
    except (KeyError, ValueError):
        return None
    if record.get("settings") != settings:
        return None
    return {k: float(v) for k, v in record["metrics"].items()}


def _score_version(name: str, version: str, rows: list[dict], data_name: str, *, uri: str, device: str,
                   max_new_tokens: int, batch_size: int) -> tuple[dict[str, float], list[str]]:
    """Download, load and replay one model version; its metrics and its answers."""
    from palaestra.evaluation.chat_eval import chat_metrics, generate_answers
    from palaestra.models import load_model_and_tokenizer

    folder = download_model(name, version, uri)
    model, tokenizer = load_model_and_tokenizer("hf", path=str(folder), device=device)
    log.info("replaying %s v%s on %d examples (%s)", name, version, len(rows), device)
    answers = generate_answers(model, tokenizer, rows, max_new_tokens, batch_size, show_progress=True)
    del model
    return chat_metrics(answers, rows, data_name), answers


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def replay(
    name: str,
    version: str | int,
    dataset_folder: str | Path,
    baseline: str | int | None = None,
    tracking_uri: str | None = None,
    max_examples: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    device: str = "auto",
) -> ReplayResult:
    """Replay ``dataset_folder``'s test split through ``models:/name/version``, gate it and tag it.

    ``version`` and ``baseline`` are version numbers or aliases (``active``). Unknown models or
    versions and missing datasets raise one-line errors before any model loads.
    """
    from palaestra.evaluation.chat_eval import prediction_rows

    if max_new_tokens <= 0 or batch_size <= 0 or max_examples < 0:
        raise ConfigError("max_new_tokens and batch_size must be positive, max_examples >= 0")
    # 1. check everything the user named: store, model, versions, dataset
    uri = tracking_uri or default_tracking_uri()
    client = open_client(uri)
    candidate_mv = resolve_version(client, name, version)
    baseline_mv = resolve_version(client, name, baseline) if baseline is not None else None
    rows, data_name, dataset_version = load_replay_dataset(dataset_folder, max_examples)
    test_hash = hashlib.sha256((Path(dataset_folder) / TEST_FILE).read_bytes()).hexdigest()[:16]
    settings = {"test_sha256": test_hash, "examples": len(rows), "max_new_tokens": max_new_tokens}
    key = _cache_key(dataset_version)
    device = _device(device)
    version, baseline = str(candidate_mv.version), (str(baseline_mv.version) if baseline_mv else None)

    tracker = MlflowTracker(f"{data_name}_replay", run_name=f"{name}-v{version}-{dataset_version}", tracking_uri=uri)
    with tracker:
        tracker.log_params({"model": name, "version": version, "baseline": baseline or "none",
                            "dataset_version": dataset_version, "dataset": str(dataset_folder), "task": data_name,
                            "num_examples": len(rows), "max_new_tokens": max_new_tokens, "device": device})
        # 2. the candidate: always replayed (that is what was asked for)
        candidate, answers = _score_version(name, version, rows, data_name, uri=uri, device=device,
                                            max_new_tokens=max_new_tokens, batch_size=batch_size)
        table = prediction_rows(answers, rows, data_name)
        _store_metrics(client, name, version, key, candidate, settings, tracker.run_id)
        # 3. the baseline: its cached metrics for these settings, else replayed and cached
        baseline_metrics, cached = None, False
        if baseline == version:
            baseline_metrics = candidate
        elif baseline is not None:
            baseline_metrics = _cached_metrics(baseline_mv.tags or {}, key, settings)
            cached = baseline_metrics is not None
            if cached:
                log.info("baseline v%s: metrics cached on the model version (tag %s)", baseline, key)
            else:
                baseline_metrics, baseline_answers = _score_version(
                    name, baseline, rows, data_name, uri=uri, device=device, max_new_tokens=max_new_tokens,
                    batch_size=batch_size)
                _store_metrics(client, name, baseline, key, baseline_metrics, settings, tracker.run_id)
                for row, answer in zip(table, baseline_answers):
                    row["baseline_prediction"] = answer
        # 4. the gate
        passed, reasons = replay_gate(candidate, baseline_metrics, data_name)
        # 5. record: the replay run, then the verdict on the candidate version
        tracker.log_metrics({f"candidate/{k}": v for k, v in candidate.items()}, step=0)
        if baseline_metrics is not None:
            tracker.log_metrics({f"baseline/{k}": v for k, v in baseline_metrics.items()}, step=0)
        tracker.log_table(table, "predictions.json")
        tracker.log_dict({"passed": passed, "reasons": reasons, "rule": {k: list(v) for k, v in gate_rule(data_name).items()},
                          "baseline_cached": cached}, "gate.json")
        verdict = "pass" if passed else "fail"
        tracker.set_tags({"gate": verdict, "model": name, "version": version, "baseline": baseline or "none",
                          "dataset_version": dataset_version, "task": data_name})
        version_tags = {"gate": verdict, "status": "candidate" if passed else "rejected",
                        "replay_run_id": tracker.run_id, "replay_dataset_version": dataset_version,
                        "replay_baseline": baseline or "none"}
        for tag, value in version_tags.items():
            client.set_model_version_tag(name, version, tag, value)
    return ReplayResult(name, version, baseline, dataset_version, data_name, len(rows), candidate, baseline_metrics,
                        passed, reasons, tracker.run_id, cached)


def _store_metrics(client, name: str, version: str, key: str, metrics: dict[str, float], settings: dict,
                   run_id: str) -> None:
    record = {"metrics": metrics, "settings": settings, "run_id": run_id}
    client.set_model_version_tag(name, version, key, json.dumps(record, sort_keys=True))
