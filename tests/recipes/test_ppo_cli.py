"""``palaestra train --target=ppo`` on the tiny model and a small planner dataset made in the test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from palaestra.planner.data import make_planner_dataset
from tests.conftest import run_cli

TINY = [
    "--target=ppo", "model=tiny", "data.max_length=256", "algo.prompts_per_step=4", "algo.max_completion_length=12",
    "train.minibatch_size=2", "train.learning_rate=1e-3", "eval.max_examples=2", "eval.batch_size=2",
    "data.rewards=[tests.recipes.rewards:digit_share]", "train.threads=1",
]


def _dataset(tmp_path: Path) -> str:
    folder = make_planner_dataset(tmp_path, date="2026-01-15", n_train=16, n_val=4, n_test=4, preferences=False)
    return f"data.path={folder}"


def _metrics(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record for record in records}


def _mlflow(tmp_path: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.slow
def test_ppo_trains_the_adapter_and_the_value_head(tmp_path):
    data = _dataset(tmp_path)
    client = _mlflow(tmp_path)
    parent = client.create_run(client.create_experiment("pipeline")).info.run_id
    result = run_cli(["train", *TINY, data, "train.steps=3", "train.eval_interval=2", "train.log_samples_interval=1",
                      "train.output_dir=run", f"tracking.parent_run_id={parent}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    final = run_dir / "checkpoints" / "step-000003"
    adapter = load_file(final / "trainable.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero; training must move it"
    head = load_file(final / "policy-value_head" / "trainable.safetensors")
    assert head["linear.weight"].abs().sum() > 0, "the value head starts at zero; training must move it"

    steps = _metrics(run_dir)
    assert sorted(steps) == [1, 2, 3]
    assert all(math.isfinite(steps[s]["loss"]) and math.isfinite(steps[s]["value_loss"]) for s in steps)
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "model" / "tokenizer_config.json").is_file()
    assert (run_dir / "value_head" / "value_head.safetensors").is_file()

    state = json.loads((final / "trainer_state.json").read_text())
    assert state["data_position"] == 12  # 3 steps x 4 prompts
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in ("reward/mean", "reward/digit_share/mean", "kl", "policy_loss", "value_loss", "clipfrac", "approx_kl",
                "entropy", "explained_variance", "learning_rate", "time/generation", "eval/reward"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "value_loss")] == [1, 2, 3]
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["algo"] == "ppo" and run.data.tags["task"] == "planner"
    assert run.data.tags["dataset_version"] == "2026-01-15"
    assert run.data.params["algo.kl_coef"] == "0.05"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots", "samples", "eval", "train.log"} <= artifacts


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(tmp_path):
    common = ["train", *TINY, _dataset(tmp_path), "train.steps=4", "train.save_interval=2", "train.keep_last_n=0"]
    straight = run_cli([*common, "train.output_dir=straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli([*common, "train.output_dir=resumed", "train.stop_after_steps=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (tmp_path / "resumed" / "checkpoints" / "step-000004").exists()
    assert not (tmp_path / "resumed" / "model").exists()  # exported only when training is done
    second = run_cli([*common, "train.output_dir=resumed", "train.resume=auto"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]

    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    for step in (1, 2, 3, 4):
        for key in ("loss", "policy_loss", "value_loss", "reward/mean", "kl"):
            assert a[step][key] == b[step][key], (step, key)
    for part in ("trainable.safetensors", "policy-value_head/trainable.safetensors"):
        wa = load_file(tmp_path / "straight" / "checkpoints" / "step-000004" / part)
        wb = load_file(tmp_path / "resumed" / "checkpoints" / "step-000004" / part)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), part

    state_2 = json.loads((tmp_path / "resumed" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    state_4 = json.loads((tmp_path / "resumed" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state_2["mlflow_run_id"] == state_4["mlflow_run_id"]
    steps = [m.step for m in _mlflow(tmp_path).get_metric_history(state_4["mlflow_run_id"], "value_loss")]
    assert steps == [1, 2, 3, 4]


def test_missing_reward_model_folder_is_a_one_line_error(tmp_path):
    result = run_cli(["train", *TINY, _dataset(tmp_path), "algo.reward_model=no/such/folder"], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "algo.reward_model=no/such/folder" in lines[0], result.stderr[-2000:]


def _tiny_reward_model(folder: Path) -> Path:
    """A random one-label sequence classifier on the tiny model's tokenizer, saved as a reward model folder."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from palaestra.models import build_tiny_model

    _, tokenizer = build_tiny_model()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.mark.slow
def test_ppo_with_a_reward_model(tmp_path):
    pytest.importorskip("palaestra.rewards.reward_model")
    folder = _tiny_reward_model(tmp_path / "reward_model")
    result = run_cli(["train", *TINY, _dataset(tmp_path), "train.steps=2", "train.output_dir=run",
                      f"algo.reward_model={folder}", "tracking.enabled=false"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = _metrics(tmp_path / "run")
    assert sorted(steps) == [1, 2]
    assert all(math.isfinite(steps[s]["reward/reward_model/mean"]) for s in steps)
    assert (tmp_path / "run" / "model" / "config.json").is_file()
