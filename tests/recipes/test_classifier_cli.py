"""palaestra train --target=classifier: the real CLI fine-tunes, tracks, exports and resumes a text classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

TEXTS = {
    "hardware": ["the printer is jammed", "my screen stays black", "the keyboard does not type", "laptop fan is loud",
                 "mouse stopped working", "the monitor flickers", "battery will not charge", "usb port is broken"],
    "billing": ["I was charged twice", "refund my last payment", "my card was declined", "the invoice is wrong",
                "cancel my subscription", "why is my bill so high", "update my payment method", "I need a receipt"],
    "account": ["reset my password", "I cannot log in", "change my email address", "delete my account",
                "my username is taken", "enable two factor login", "unlock my account", "recover my profile"],
}


def _data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(text, label) for label, texts in TEXTS.items() for text in texts]
    splits = {"train": [r for i, r in enumerate(rows) if i % 4 < 2], "val": [r for i, r in enumerate(rows) if i % 4 == 2],
              "test": [r for i, r in enumerate(rows) if i % 4 == 3]}
    for split, chosen in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in chosen))
    return folder


def _args(tmp_path: Path) -> list[str]:
    return ["train", "--target=classifier", "model.name=tiny", f"algo.data={_data(tmp_path / 'tickets')}", "algo.epochs=3",
            "train.texts_per_step=4", "train.learning_rate=1e-3"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_classifier_trains_tracks_and_exports_a_folder_a_pipeline_loads(tmp_path):
    result = run_cli([*_args(tmp_path), "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    steps = [m for m in _metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 10))  # 12 training texts in batches of 4, 3 epochs
    assert all(m["tokens_per_second"] > 0 for m in steps)
    assert "accuracy" in result.stdout and "before" in result.stdout  # the before/after table on the test split

    # the exported folder is a plain transformers classifier that answers with the label names, as the run did
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(run_dir / "model"), device="cpu")
    predictions = [json.loads(line) for line in (run_dir / "test_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6
    assert [p["label"] for p in classify([p["text"] for p in predictions])] == [p["predicted"] for p in predictions]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    state = json.loads((run_dir / "checkpoints" / "step-000009" / "trainer_state.json").read_text())
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert {"eval/accuracy", "eval/macro_f1", "test/accuracy", "test/macro_f1", "loss"} <= set(run.data.metrics)
    assert run.data.params["train.texts_per_step"] == "4" and "model.lora.r" not in run.data.params  # only what it reads
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/confusion_matrix.png" in artifacts


@pytest.mark.slow
def test_an_interrupted_classifier_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    args = [*_args(tmp_path), "tracking.enabled=false"]
    assert run_cli([*args, "train.output_dir=straight"], tmp_path).returncode == 0
    stopped = run_cli([*args, "train.output_dir=stopped", "train.stop_after_steps=4"], tmp_path)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = run_cli([*args, "train.output_dir=stopped", "--resume"], tmp_path)  # MARK's flag: train.resume=auto
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = [[m["loss"] for m in _metrics(tmp_path / name) if "loss" in m] for name in ("straight", "stopped")]
    assert losses[0] == losses[1]
    first, second = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("straight", "stopped"))
    assert all((first[key] == second[key]).all() for key in first)


@pytest.mark.parametrize("extra, message", [
    (["algo.num_labels=2"], "the training split has 3 labels (account, billing, hardware) but algo.num_labels=2"),
    (["algo.data=missing/"], "algo.data=missing/ does not exist"),
    (["algo.labels=[a,b]"], "algo.labels has 2 names but algo.num_labels=3"),
    (["model.lora.r=4"], "algo=classifier does not read model.lora.r"),
    (["--device=tpu"], "train.device='tpu' is unknown"),
])
def test_classifier_mistakes_are_one_line_before_the_encoder_loads(tmp_path, extra, message):
    result = run_cli([*_args(tmp_path), *extra, "tracking.enabled=false"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and message in result.stderr
    assert "LOAD REPORT" not in result.stderr and not (tmp_path / "runs").exists()  # nothing loaded, nothing written


def test_mark_target_names_and_a_user_yaml(tmp_path):
    (tmp_path / "mine.yaml").write_text("algo: transformer\nalgo_extra: 1\n")
    result = run_cli(["train", "--config", "mine.yaml", "--cfg", "job"], tmp_path)
    assert result.returncode == 2 and "--config mine.yaml: unknown section 'algo_extra'" in result.stderr
    (tmp_path / "mine.yaml").write_text("algo: transformer\n")  # MARK's name in the file too
    assert "name: classifier" in run_cli(["train", "--config", "mine.yaml", "--cfg", "job"], tmp_path).stdout
    shown = run_cli(["train", "--target", "transformer", "--config", "settings.yaml", "--cfg", "job"], tmp_path)
    assert shown.returncode == 2 and "--config settings.yaml does not exist" in shown.stderr
    (tmp_path / "settings.yaml").write_text("train:\n  seed: 7\nalgo:\n  epochs: 2\n")
    shown = run_cli(["train", "--target", "transformer", "--config", "settings.yaml", "algo.epochs=4", "--cfg", "job"], tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "name: classifier" in shown.stdout and "seed: 7" in shown.stdout
    assert "epochs: 4" in shown.stdout  # the command line wins over the file
    assert "texts_per_step: 16" in shown.stdout and "learning_rate: 5.0e-05" in shown.stdout  # MARK's defaults
