"""palaestra train --target=rag: the real CLI builds, saves, tracks, resumes and evaluates an index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

DOCUMENTS = [
    ("power", "Check that the computer is plugged in, then hold the power button for ten seconds."),
    ("sound", "Turn up the volume and make sure the right speakers are selected as the output device."),
    ("galaxy", "The Andromeda Galaxy is the nearest large spiral galaxy to the Milky Way."),
    ("python", "Python is a programming language that lets you work quickly and integrate systems."),
    ("password", "Use the password reset link on the sign-in page, or ask your administrator."),
]
QUERIES = [
    ("q1", "my computer will not turn on", ["power"]),
    ("q2", "which galaxy is closest to ours", ["galaxy"]),
    ("q3", "I forgot my password", ["password"]),
]


def _files(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in DOCUMENTS))
    (folder / "judged.jsonl").write_text("".join(json.dumps({"id": i, "text": t, "relevant": r}) + "\n" for i, t, r in QUERIES))
    return ["--target=rag", f"algo.documents={folder / 'docs.jsonl'}", f"algo.queries={folder / 'judged.jsonl'}",
            "algo.documents_per_step=2"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_rag_builds_saves_tracks_and_evaluates_an_index(tmp_path):
    args = _files(tmp_path / "data")
    result = run_cli(["train", *args, "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert [m["step"] for m in _metrics(run_dir)] == [1, 2, 3]  # 5 documents in batches of 2
    assert _metrics(run_dir)[-1]["documents"] == 5
    index = run_dir / "index"
    assert {p.name for p in index.iterdir()} == {"index.faiss", "documents.jsonl", "index.json"}
    assert json.loads((index / "index.json").read_text())["dimensions"] == 384
    # every query's answer is the obvious document: perfect figures, printed as a grid
    assert "ndcg" in result.stdout and "1.000" in result.stdout
    state = json.loads((run_dir / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["best_metric"] == 1.0 and (run_dir / "checkpoints" / "best").is_dir()
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # MLflow names cannot hold "@": ndcg@10 is logged as ndcg_10
    assert run.data.metrics["eval/ndcg_10"] == 1.0 and run.data.metrics["eval/recall_1"] == 1.0
    assert "model.name" not in run.data.params and run.data.params["algo.mode"] == "dense"  # only what rag reads
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"index", "plots", "train.log", "config.yaml"} <= artifacts

    evaluated = run_cli(["eval", "algo=rag", *args[1:3], "eval.checkpoint=run", "tracking.enabled=false"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "ndcg@10         1.000" in evaluated.stdout


@pytest.mark.slow
def test_an_interrupted_build_resumes_to_the_same_index(tmp_path):
    import faiss

    args = [*_files(tmp_path / "data"), "tracking.enabled=false"]
    assert run_cli(["train", *args, "train.output_dir=straight"], tmp_path).returncode == 0
    stopped = run_cli(["train", *args, "train.output_dir=stopped", "train.stop_after_steps=1"], tmp_path)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not (tmp_path / "stopped" / "index").exists() and [m["step"] for m in _metrics(tmp_path / "stopped")] == [1]
    resumed = run_cli(["train", *args, "train.output_dir=stopped", "train.resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in _metrics(tmp_path / "stopped")] == [1, 2, 3]

    def vectors(run: str) -> np.ndarray:
        index = faiss.read_index(str(tmp_path / run / "index" / "index.faiss"))
        return index.reconstruct_n(0, index.ntotal)

    assert np.array_equal(vectors("straight"), vectors("stopped"))


@pytest.mark.slow
def test_hybrid_and_bm25_modes(tmp_path):
    args = [*_files(tmp_path / "data"), "tracking.enabled=false"]
    for mode in ("hybrid", "bm25"):
        result = run_cli(["train", *args, f"algo.mode={mode}", f"train.output_dir={mode}"], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((tmp_path / mode / "index" / "index.json").read_text())["mode"] == mode
    assert [m["step"] for m in _metrics(tmp_path / "bm25")] == [1]  # BM25 indexes the collection in one step


@pytest.mark.parametrize(("extra", "message"), [
    (["algo.documents=nowhere.jsonl"], "algo.documents=nowhere.jsonl does not exist"),
    (["algo.ks=[0,5]"], "algo.ks=[0, 5] must be positive whole numbers"),
    (["algo.mode=sparse"], "algo.mode"),
    (["model.lora.r=8"], "algo=rag does not read model.lora.r"),
    (["task=countdown"], "algo=rag does not read task"),
    (["train.best_metric=accuracy"], "train.best_metric=accuracy is not a figure rag reports"),
    (["empty"], "is empty"),
    (["unjudged"], "judged document 'nope' is not in the documents file"),
])
def test_bad_input_is_one_line_before_the_embedder_loads(tmp_path, extra, message):
    args = _files(tmp_path / "data")
    if extra == ["empty"]:
        (tmp_path / "data" / "docs.jsonl").write_text("")
        extra = []
    elif extra == ["unjudged"]:
        (tmp_path / "data" / "judged.jsonl").write_text(json.dumps({"id": "q", "text": "t", "relevant": ["nope"]}) + "\n")
        extra = []
    result = run_cli(["train", *args, *extra, "tracking.enabled=false"], tmp_path)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Loading weights" not in result.stderr
