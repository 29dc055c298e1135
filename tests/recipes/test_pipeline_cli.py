"""``palaestra pipeline rlhf`` end to end on the tiny model: every stage feeds the next, each is an
MLflow child run; a stage that fails stops the pipeline, and the same command resumes from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from palaestra.config import ConfigError
from palaestra.pipeline import compose_config, plan_stages, split_stage_overrides
from palaestra.planner.data import make_planner_dataset
from tests.conftest import run_cli


def test_stage_selection_and_per_stage_keys():
    assert plan_stages("rlhf", None, []) == ["sft", "reward", "ppo", "evaluate", "export"]
    assert plan_stages("rlhf", None, ["reward"]) == ["sft", "ppo", "evaluate", "export"]
    assert plan_stages("full", ["evaluate", "sft"], []) == ["sft", "evaluate"]  # pipeline order, whatever the order given
    with pytest.raises(ConfigError, match="unknown pipeline stage 'sfx'"):
        plan_stages("rlhf", ["sfx"], [])
    with pytest.raises(ConfigError, match="unknown pipeline"):
        plan_stages("nope", None, [])
    common, per_stage = split_stage_overrides(["model=tiny", "ppo.train.steps=3", "+sft.algo.foo=1", "data.path=x"])
    assert common == ["model=tiny", "data.path=x"] and per_stage == {"ppo": ["train.steps=3"], "sft": ["+algo.foo=1"]}


def test_a_stage_may_set_a_key_its_yaml_lacks_but_the_schema_has(tmp_path):
    # the mixture's YAML gives the code component no path; the command line sets it, and so must a stage
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"question": f"Print {n}.", "tests": [["", str(n)]]}) + "\n" for n in range(8)))
    config = compose_config(["algo=grpo", "experiment=aflow", f"task.components.code.path={data}"])
    assert config.task.components["code"].path == str(data)
    with pytest.raises(ConfigError, match="unknown config key 'task.nokey'"):
        compose_config(["algo=grpo", "task.nokey=1"])


@pytest.mark.slow
def test_rlhf_pipeline_runs_every_stage_then_resumes_from_a_failed_one(tmp_path):
    data = make_planner_dataset(tmp_path, date="2026-06-01", n_train=12, n_val=4, n_test=2)
    (data / "test.jsonl").rename(tmp_path / "test.jsonl")  # the evaluate stage reads it: it will fail there
    command = [
        "pipeline", "rlhf", "model=tiny", f"data.path={data}", "data.max_length=160", "train.threads=1",
        "sft.train.sequences_per_step=4", "sft.train.sequences_per_forward=4", "reward.train.pairs_per_step=4",
        "reward.train.pairs_per_forward=4", "train.save_interval=1",
        "sft.algo.max_steps=2", "reward.algo.max_steps=2", "ppo.train.steps=2", "ppo.algo.prompts_per_step=2",
        "ppo.algo.max_completion_length=8", "ppo.train.minibatch_size=2",
        "eval.max_new_tokens=8", "export.output_dir=shelf/exported", "pipeline.output_dir=pipe",
    ]

    first = run_cli(command, tmp_path)
    assert first.returncode == 1, first.stderr[-3000:]
    history = json.loads((tmp_path / "pipe" / "history.json").read_text())
    status = {s["stage"]: s["status"] for s in history["stages"]}
    assert status == {"sft": "succeeded", "reward": "succeeded", "ppo": "succeeded", "evaluate": "failed", "export": "pending"}
    stages = {s["stage"]: s for s in history["stages"]}
    assert "test.jsonl" in stages["evaluate"]["error"]
    # each stage's output fed the next
    sft_model, reward_model = stages["sft"]["outputs"]["model_dir"], stages["reward"]["outputs"]["reward_model_dir"]
    assert Path(sft_model).is_dir() and Path(reward_model).is_dir()
    assert "stage(s) evaluate failed" in first.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(history["parent_run_id"])
    assert parent.info.status == "FAILED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.data.tags["mlflow.runName"] for run in children) == ["rlhf/ppo", "rlhf/reward", "rlhf/sft"]
    ppo_run = next(run for run in children if run.data.tags["mlflow.runName"] == "rlhf/ppo")
    assert ppo_run.data.params.get("algo.reward_model") == reward_model  # the reward stage's model scored PPO
    assert ppo_run.data.params.get("model.path") == sft_model  # PPO started from the SFT policy

    # put the test split back and run the same command again: it resumes at evaluate, the finished stages stay
    (tmp_path / "test.jsonl").rename(data / "test.jsonl")
    second = run_cli(command, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    history = json.loads((tmp_path / "pipe" / "history.json").read_text())
    stages = {s["stage"]: s for s in history["stages"]}
    assert all(s["status"] == "succeeded" for s in stages.values()) and history["finished"]
    assert [stages[s]["attempts"] for s in ("sft", "reward", "ppo", "evaluate", "export")] == [1, 1, 1, 2, 1]
    assert {"constraint_respect", "plan_alignment"} <= set(stages["evaluate"]["metrics"])
    assert client.get_run(history["parent_run_id"]).info.status == "FINISHED"
    for line in ("sft", "reward", "ppo", "evaluate", "export"):
        assert line in second.stdout  # the history table

    from transformers import AutoModelForCausalLM

    exported = tmp_path / "shelf" / "exported"
    assert AutoModelForCausalLM.from_pretrained(exported).config.num_hidden_layers == 2
    assert stages["export"]["outputs"]["model_dir"] == stages["ppo"]["outputs"]["model_dir"]  # PPO's policy is the product


def test_bad_stage_key_fails_in_one_line_before_any_model_loads(tmp_path):
    data = make_planner_dataset(tmp_path, date="2026-06-01", n_train=4, n_val=2, n_test=2)
    result = run_cli(["pipeline", "rlhf", "model=tiny", f"data.path={data}", "ppo.algo.no_such_key=1",
                      "pipeline.output_dir=pipe"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("palaestra: error: stage ppo:")
    assert "no_such_key" in result.stderr and "Traceback" not in result.stderr
    history = json.loads((tmp_path / "pipe" / "history.json").read_text())
    assert all(s["status"] == "pending" for s in history["stages"])


@pytest.mark.slow
def test_full_pipeline_prepares_its_data_and_chains_dpo_into_ppo(tmp_path):
    result = run_cli([
        "pipeline", "full", "model=tiny", "data.max_length=160", "train.threads=1", "sft.train.sequences_per_step=4",
        "sft.train.sequences_per_forward=4", "reward.train.pairs_per_step=4", "reward.train.pairs_per_forward=4",
        "dpo.train.pairs_per_step=4", "dpo.train.pairs_per_forward=4", "sft.algo.max_steps=1", "reward.algo.max_steps=1", "dpo.algo.max_steps=1",
        "ppo.train.steps=1", "ppo.algo.prompts_per_step=2", "ppo.algo.max_completion_length=8",
        "eval.max_examples=2", "eval.max_new_tokens=8", "export.output_dir=exported", "pipeline.output_dir=pipe",
    ], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = {s["stage"]: s for s in json.loads((tmp_path / "pipe" / "history.json").read_text())["stages"]}
    assert list(stages) == ["data", "sft", "reward", "dpo", "ppo", "evaluate", "export"]
    data_path = Path(stages["data"]["outputs"]["data_path"])
    assert (data_path / "train.jsonl").is_file() and (data_path / "preferences_train.jsonl").is_file()
    assert data_path.is_relative_to((tmp_path / "pipe").resolve())  # generated inside the pipeline folder
    # the policy went sft -> dpo -> ppo, and PPO's is the exported one
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    dpo_run = client.get_run(stages["dpo"]["mlflow_run_id"])
    ppo_run = client.get_run(stages["ppo"]["mlflow_run_id"])
    assert dpo_run.data.params["model.path"] == stages["sft"]["outputs"]["model_dir"]
    assert ppo_run.data.params["model.path"] == stages["dpo"]["outputs"]["model_dir"]
    assert stages["export"]["outputs"]["model_dir"] == stages["ppo"]["outputs"]["model_dir"]
