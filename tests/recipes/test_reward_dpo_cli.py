"""The real ``palaestra`` CLI on the tiny model: reward model and DPO training, their outputs, resume and bad input."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import run_cli

TINY = [
    "model=tiny", "model.precision=fp32", "train.threads=1", "data.name=synthetic", "data.path=prefs",
    "data.max_length=128", "train.pairs_per_step=8", "train.pairs_per_forward=4", "train.learning_rate=3e-3",
]


def _write_pairs(folder: Path, train: int = 32, val: int = 16, seed: int = 0) -> Path:
    """Pairs where one answer is clearly better: a sentence with the sum against a curt refusal."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("preferences_train.jsonl", train), ("preferences_val.jsonl", val)):
        rows = []
        for _ in range(count):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                         "chosen": f"The answer is {a + b}.", "rejected": rng.choice(["no", "whatever", "nope!!", "ask later"])})
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def _metrics(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record for record in records}


def _lora_moved(checkpoint: Path) -> bool:
    weights = load_file(checkpoint / "trainable.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    return bool(lora_b) and any(t.abs().sum() > 0 for t in lora_b)  # B starts at zero


def _run(client: MlflowClient, run_dir: Path):
    state = json.loads(sorted((run_dir / "checkpoints").glob("step-*/trainer_state.json"))[-1].read_text())
    return client.get_run(state["mlflow_run_id"])


@pytest.mark.slow
def test_reward_model_learns_the_preference_and_exports_a_scorer(tmp_path):
    _write_pairs(tmp_path / "prefs")
    result = run_cli(["run", "algo=reward", *TINY, "algo.epochs=4", "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pairwise_accuracy" in result.stdout  # the before/after table
    run_dir = tmp_path / "run"

    steps = _metrics(run_dir)
    assert sorted(steps) == list(range(1, 17))  # 32 pairs in batches of 8, 4 epochs
    assert all(math.isfinite(steps[s][k]) for s in steps for k in ("loss", "accuracy", "margin", "grad_norm"))
    final = run_dir / "checkpoints" / "step-000016"
    assert _lora_moved(final)
    assert "base_model.model.score.modules_to_save.default.weight" in load_file(final / "trainable.safetensors")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = _run(client, run_dir)
    assert run.info.status == "FINISHED"
    for key in ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "learning_rate", "eval/pairwise_accuracy", "eval/margin"):
        assert key in run.data.metrics, key
    assert run.data.tags["algo"] == "reward" and run.data.tags["task"] == "synthetic" and run.data.tags["dataset_version"] == "prefs"
    assert run.data.tags["policy_id"] == "synthetic-reward" and run.data.params["algo.name"] == "reward"
    accuracy = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/pairwise_accuracy")}
    margin = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/margin")}
    assert sorted(accuracy) == [0, 4, 8, 12, 16]  # before training, then after every epoch
    assert accuracy[16] >= 0.9 and margin[16] > margin[0] + 1.0

    # the merged folder is a plain Hugging Face reward model, and the scorer ranks chosen above rejected
    from transformers import AutoModelForSequenceClassification

    from palaestra.rewards import resolve_reward
    from palaestra.rewards.reward_model import load_reward_model

    folder = run_dir / "reward_model"
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    pairs = [json.loads(line) for line in (tmp_path / "prefs" / "preferences_val.jsonl").read_text().splitlines()]
    scorer = load_reward_model(str(folder))
    assert load_reward_model(str(folder)) is scorer  # cached per folder
    chosen = scorer.score([p["messages"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = scorer.score([p["messages"] for p in pairs], [p["rejected"] for p in pairs])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(pairs) >= 0.9
    reward = resolve_reward(f"reward_model:{folder}")
    assert reward([p["chosen"] for p in pairs], prompt=[p["messages"] for p in pairs], answer=[""] * len(pairs)) == pytest.approx(chosen)


@pytest.mark.slow
def test_dpo_trains_the_policy_and_exports_a_merged_model(tmp_path):
    _write_pairs(tmp_path / "prefs")
    result = run_cli(["train", "algo=dpo", *TINY, "algo.epochs=2", "algo.beta=0.2", "train.output_dir=run",
                      "tracking.registered_model=synthetic_dpo"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"

    steps = _metrics(run_dir)
    assert sorted(steps) == list(range(1, 9))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert all(math.isfinite(steps[s][key]) for s in steps), key
    assert steps[1]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert steps[8]["rewards/margins"] > 0
    assert _lora_moved(run_dir / "checkpoints" / "step-000008")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = _run(client, run_dir)
    assert run.info.status == "FINISHED" and run.data.tags["algo"] == "dpo"
    assert {"rewards/margins", "rewards/accuracies", "eval/preference_accuracy", "eval/reward_margin"} <= set(run.data.metrics)
    assert run.data.metrics["eval/preference_accuracy"] >= 0.9
    assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert [str(v.version) for v in client.search_model_versions("name='synthetic_dpo'")] == ["1"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palaestra.models import build_tiny_model

    merged = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert AutoTokenizer.from_pretrained(run_dir / "model").chat_template
    base, _ = build_tiny_model()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])  # the adapter was merged in


@pytest.mark.slow
def test_interrupted_reward_model_resumes_exactly(tmp_path):
    _write_pairs(tmp_path / "prefs", train=24, val=8)
    common = ["train", "algo=reward", *TINY, "algo.epochs=2", "train.keep_last_n=0", "model.lora.dropout=0.1"]
    straight = run_cli([*common, "train.output_dir=straight", "tracking.enabled=false"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli([*common, "train.output_dir=resumed", "train.stop_after_steps=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "resume with" in first.stdout and not (tmp_path / "resumed" / "reward_model").exists()
    second = run_cli([*common, "train.output_dir=resumed", "train.resume=auto"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]

    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], step
    wa = load_file(tmp_path / "straight" / "checkpoints" / "step-000006" / "trainable.safetensors")
    wb = load_file(tmp_path / "resumed" / "checkpoints" / "step-000006" / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = _run(client, tmp_path / "resumed")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 7))  # one MLflow run



@pytest.mark.slow
def test_interrupted_dpo_resumes_exactly(tmp_path):
    _write_pairs(tmp_path / "prefs", train=16, val=8)
    common = ["train", "algo=dpo", *TINY, "algo.epochs=2", "train.keep_last_n=0", "model.lora.dropout=0.1",
              "tracking.enabled=false"]
    straight = run_cli([*common, "train.output_dir=straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli([*common, "train.output_dir=resumed", "train.stop_after_steps=3"], tmp_path)  # mid-epoch
    assert first.returncode == 0, first.stderr[-3000:]
    assert "resume with" in first.stdout and not (tmp_path / "resumed" / "model").exists()
    second = run_cli([*common, "train.output_dir=resumed", "train.resume=auto"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]

    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 5))
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], step
        assert a[step]["rewards/margins"] == b[step]["rewards/margins"], step
    wa = load_file(tmp_path / "straight" / "checkpoints" / "step-000004" / "trainable.safetensors")
    wb = load_file(tmp_path / "resumed" / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "resumed" / "model").is_dir()  # exported once training is done


def test_a_bad_preference_row_is_a_one_line_error(tmp_path):
    folder = _write_pairs(tmp_path / "prefs", train=4, val=2)
    with open(folder / "preferences_train.jsonl", "a") as handle:
        handle.write(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    result = run_cli(["train", "--target=dpo", *TINY, "tracking.enabled=false"], tmp_path)  # the loader reward and dpo share
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "palaestra: error: prefs/preferences_train.jsonl:5: needs a string 'rejected' "
        "(rows are {\"messages\" or \"prompt\", \"chosen\", \"rejected\"})"
    )
    assert not (tmp_path / "runs").exists()  # failed before any run folder or model
