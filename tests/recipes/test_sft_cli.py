"""The real ``palaestra train`` CLI running SFT on the tiny model: the planner MLflow contract and
model registry, exact resume mid-epoch, and one-line errors for bad data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from palaestra.planner.data import make_planner_dataset
from tests.conftest import run_cli

SMALL = ["model=tiny", "data.max_length=128", "train.learning_rate=1e-3", "algo.epochs=2", "train.threads=1"]  # 1 thread: fast on a busy machine


def _records(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(update step -> its record, epoch -> its train_loss/val_loss record) from metrics.jsonl."""
    steps, epochs = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "epoch" in record and "val_loss" in record:
            epochs[record["epoch"]] = record
        else:
            steps[record["step"]] = record
    return steps, epochs


def _trainable(checkpoint: Path) -> dict:
    return load_file(checkpoint / "trainable.safetensors")


@pytest.mark.slow
def test_planner_experiment_logs_the_contract_and_registers_the_model(tmp_path):
    data = make_planner_dataset(tmp_path, date="2026-05-04", n_train=16, n_val=4, n_test=4)
    result = run_cli(["train", "experiment=planner", *SMALL, f"data.path={data}", "train.sequences_per_step=8",
                      "train.sequences_per_forward=4", "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("planner_training")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "learning_rate": "0.001", "batch_size": "8", "epochs": "2", "dataset_version": "2026-05-04",
        "model_base": "tiny", "fine_tuning_method": "lora", "lora_r": "16", "lora_alpha": "32",
    }
    tags = run.data.tags
    assert (tags["policy_id"], tags["task"], tags["dataset_version"]) == ("planner-sft", "planner", "2026-05-04")
    for name in ("train_loss", "val_loss"):  # one value per epoch, at step = epoch
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history), name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/step_loss")] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "tokenizer", "config.yaml", "train.log", "plots"} <= artifacts
    assert "tokenizer/tokenizer.json" in {a.path for a in client.list_artifacts(run.info.run_id, "tokenizer")}

    # the LoRA adapter moved (B starts at zero) on q/k/v/o only, as the preset says
    adapter = _trainable(run_dir / "checkpoints" / "step-000004")
    lora_b = {name: t for name, t in adapter.items() if "lora_B" in name}
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b.values())
    assert {name.split(".")[-4] for name in lora_b} == {"q_proj", "k_proj", "v_proj", "o_proj"}

    # registered as planner_model version 1; models:/planner_model/1 is a folder transformers loads alone
    version = client.get_model_version("planner_model", "1")
    assert version.run_id == run.info.run_id and tags["registered_model_version"] == "1"
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mlflow.set_tracking_uri(tracking_uri)
    folder = mlflow.artifacts.download_artifacts("models:/planner_model/1", dst_path=str(tmp_path / "downloaded"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and tokenizer.chat_template
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "tokenizer" / "tokenizer.json").is_file()


def _short_chats(path: Path, count: int) -> Path:
    """Short prompt/completion rows, so that packing puts several in one sequence."""
    rows = [{"prompt": f"What is {i} plus {i + 3}?", "completion": f"It is {2 * i + 3}."} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path):
    data = _short_chats(tmp_path / "chats.jsonl", 20)  # 18 train / 2 val; ~50 tokens each, two per sequence
    common = ["train", "algo=sft", *SMALL, f"data.path={data}", "train.sequences_per_step=4", "train.sequences_per_forward=2",
              "train.keep_last_n=0", "model.lora.dropout=0.1"]  # dropout: the RNG must be restored too
    straight = run_cli([*common, "train.output_dir=straight", "tracking.enabled=false"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli([*common, "train.output_dir=resumed", "train.stop_after_steps=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "resume with" in first.stdout and not (tmp_path / "resumed" / "model").exists()
    second = run_cli([*common, "train.output_dir=resumed", "train.resume=auto"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]

    steps_a, epochs_a = _records(tmp_path / "straight")
    steps_b, epochs_b = _records(tmp_path / "resumed")
    assert len(steps_a) > 2 and sorted(steps_a) == sorted(steps_b)
    assert "18 train conversations in 9 sequences" in (tmp_path / "straight" / "train.log").read_text()  # packed
    for step in steps_a:
        assert steps_a[step]["train/step_loss"] == steps_b[step]["train/step_loss"], step
    assert sorted(epochs_a) == [1, 2]
    for epoch in (1, 2):
        assert epochs_a[epoch]["train_loss"] == epochs_b[epoch]["train_loss"]
        assert epochs_a[epoch]["val_loss"] == epochs_b[epoch]["val_loss"]
    last = f"step-{max(steps_a):06d}"
    a, b = _trainable(tmp_path / "straight" / "checkpoints" / last), _trainable(tmp_path / "resumed" / "checkpoints" / last)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert load_file(tmp_path / "straight" / "model" / "model.safetensors").keys()

    # the resumed invocation continued the same MLflow run: both epochs' val_loss in one run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("palaestra").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    assert run.info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("bad, message", [
    ("nowhere", "data.path=nowhere does not exist"),
    ("broken.jsonl", "broken.jsonl:2: not valid JSON"),
])
def test_bad_data_is_a_one_line_error(tmp_path, bad, message):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    result = run_cli(["train", "experiment=planner", "model=tiny", f"data.path={bad}"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("palaestra: error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()
