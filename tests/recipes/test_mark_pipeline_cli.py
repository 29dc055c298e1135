"""``palaestra pipeline mark`` (MARK's full pipeline) end to end on tiny settings: data preparation ->
mamba -> classifier -> rag -> grpo -> export, one MLflow parent run; a failed stage stops it and the
same command resumes there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from palaestra.pipeline import plan_stages
from tests.conftest import run_cli

TINY = [
    "model=tiny", "train.threads=1", "pipeline.output_dir=pipe", "export.output_dir=bundle",
    "mamba.algo.vocab_size=300", "mamba.algo.d_model=32", "mamba.algo.n_layers=2", "mamba.algo.max_length=64",
    "mamba.algo.max_steps=2", "mamba.algo.sample_tokens=4", "mamba.algo.val_fraction=0.02",
    "classifier.algo.epochs=1", "classifier.train.texts_per_step=64",
    "rag.algo.documents_per_step=400",
    "grpo.train.steps=2", "grpo.train.completions_per_step=4", "grpo.train.completions_per_forward=4", "grpo.algo.num_generations=2",
    "grpo.algo.max_completion_length=8", "grpo.task.train_size=8", "grpo.task.test_size=4",
]


def test_mark_runs_its_stages_in_marks_order():
    assert plan_stages("mark", None, []) == ["data", "mamba", "classifier", "rag", "grpo", "export"]
    assert plan_stages("mark", ["grpo", "classifier"], []) == ["classifier", "grpo"]
    assert plan_stages("mark", None, ["mamba", "rag"]) == ["data", "classifier", "grpo", "export"]


@pytest.mark.slow
def test_mark_pipeline_trains_every_target_and_exports_them_together(tmp_path):
    failing = run_cli(["pipeline", "mark", *TINY, "classifier.algo.num_labels=4"], tmp_path)  # the data has 3 labels
    assert failing.returncode == 1, failing.stderr[-3000:]
    history = json.loads((tmp_path / "pipe" / "history.json").read_text())
    status = {s["stage"]: s["status"] for s in history["stages"]}
    assert status == {"data": "succeeded", "mamba": "succeeded", "classifier": "failed", "rag": "pending",
                      "grpo": "pending", "export": "pending"}
    assert "algo.num_labels=4" in next(s for s in history["stages"] if s["stage"] == "classifier")["error"]

    resumed = run_cli(["pipeline", "mark", *TINY], tmp_path)  # the same command, mended: resumes at the classifier
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.loads((tmp_path / "pipe" / "history.json").read_text())
    assert f"MLflow parent run {history['parent_run_id']}: view the run: mlflow ui" in resumed.stdout
    stages = {s["stage"]: s for s in history["stages"]}
    assert all(s["status"] == "succeeded" for s in stages.values()) and stages["mamba"]["attempts"] == 1
    data = Path(stages["data"]["outputs"]["mark_data"])
    assert {p.name for p in data.iterdir()} == {"classification", "corpus", "retrieval"}
    assert {"accuracy", "macro_f1"} <= set(stages["classifier"]["metrics"]) and "ndcg@10" in stages["rag"]["metrics"]

    # the export gathers every product; each loads with plain transformers (the index is palaestra's own)
    bundle = tmp_path / "bundle"
    assert {p.name for p in bundle.iterdir()} == {"policy", "classifier", "language_model", "index"}
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    language_model = AutoModelForCausalLM.from_pretrained(bundle / "language_model")
    assert AutoTokenizer.from_pretrained(bundle / "language_model").vocab_size <= 300
    assert language_model.config.model_type == "mamba"
    assert AutoModelForSequenceClassification.from_pretrained(bundle / "classifier").config.num_labels == 3
    assert (bundle / "index" / "index.faiss").is_file() and (bundle / "policy" / "config.json").is_file()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(history["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = sorted(run.data.tags["mlflow.runName"] for run in children)
    assert names == ["mark/classifier", "mark/grpo", "mark/mamba", "mark/rag"]  # the failed attempt stopped before tracking
