"""``palaestra train experiment=aflow`` through the real CLI: the tiny policy writes workflows for the
math / QA / code mixture, a scripted executor runs them, GRPO trains on the workflow reward."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import run_cli

AFLOW_TINY = [
    "experiment=aflow", "model=tiny", "task.workflow.executor.backend=scripted", "task.train_size=12", "task.test_size=6",
    "algo.max_prompt_length=256", "algo.max_completion_length=12", "train.completions_per_step=8", "train.completions_per_forward=4",
    "train.learning_rate=1e-3", "train.steps=2", "train.save_interval=1", "train.eval_interval=2", "eval.max_examples=6",
    "train.log_samples_interval=1", "train.output_dir=run",
    # a random policy writes no valid workflow, so every workflow reward is 0 and the advantages vanish; the
    # test's digit_share reward (weight 1) gives GRPO something to climb, the workflow rewards are still computed
    "task.rewards=[palaestra.workflows.reward:workflow_reward,palaestra.workflows.reward:workflow_valid,"
    "palaestra.workflows.reward:workflow_clean,palaestra.workflows.reward:workflow_fallback,tests.recipes.rewards:digit_share]",
    "task.reward_weights=[1.0,0.0,0.0,0.0,1.0]",
]


@pytest.mark.slow
def test_aflow_trains_on_workflow_rewards_with_a_scripted_executor(tmp_path):
    result = run_cli(["run", *AFLOW_TINY], tmp_path)  # run: evaluated before and after training
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    final = run_dir / "checkpoints" / "step-000002"
    adapter = load_file(final / "trainable.safetensors")
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name), "training must move LoRA B"

    # the experience buffer travels in the trainer state (the random tiny policy earns nothing, so it is empty)
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["task_state"]["experience"]["capacity"] == 8 and state["task_state"]["experience"]["entries"] == {}

    assert "workflows: 8 run, 8 " in (run_dir / "train.log").read_text()  # each step's 2 problems x 4 workflows
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "reward/workflow_reward/mean" in r}
    assert sorted(steps) == [1, 2]
    for record in steps.values():
        # a random policy writes no valid workflow: every one falls back and earns 0
        assert record["reward/workflow_valid/mean"] == 0.0 and record["reward/workflow_fallback/mean"] == 1.0
        assert record["reward/workflow_reward/mean"] == 0.0 and record["temperature"] <= 0.5

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in ("reward/workflow_reward/mean", "reward/workflow_valid/mean", "reward/workflow_clean/mean",
                "eval/accuracy", "eval/format_accuracy", *(f"eval/workflow/{domain}/{figure}" for domain in
                ("all", "math", "qa", "code") for figure in ("accuracy", "mean_reward", "validity_rate", "share/fallback",
                                                             "share/clean", "executor_calls"))):
        assert key in run.data.metrics, key
    assert run.data.metrics["eval/workflow/all/share/fallback"] == 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/workflow_outcomes.png" in artifacts
    # the sample workflows of each evaluation (what the policy wrote, and its reward)
    evals = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert any("samples_after" in path for path in evals)
    assert run.data.params["task.workflow.executor.backend"] == "scripted"
    assert run.data.tags["dataset_version"].startswith("workflow:mixture[math=0.4")


@pytest.mark.slow
def test_eval_reports_the_workflow_figures_per_domain(tmp_path):
    result = run_cli(["eval", "experiment=aflow", "model=tiny", "task.workflow.executor.backend=scripted",
                      "task.train_size=12", "task.test_size=6", "algo.max_prompt_length=256", "eval.max_new_tokens=12",
                      "eval.max_examples=6"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split()[0]: float(line.split()[1]) for line in result.stdout.splitlines()
             if line.startswith("  workflow/")}
    for domain in ("all", "math", "qa", "code"):
        for figure in ("accuracy", "mean_reward", "validity_rate", "share/parse_failure", "share/validation_failure",
                       "share/repaired", "share/fallback", "share/runtime_error", "share/clean", "executor_calls"):
            assert f"workflow/{domain}/{figure}" in lines, (domain, figure)
    assert lines["workflow/all/share/fallback"] == 1.0 and lines["workflow/all/executor_calls"] == 1.0


@pytest.mark.slow
def test_any_grpo_run_can_train_on_the_mixture(tmp_path):
    result = run_cli(["train", "task=mixture", "model=tiny", "task.train_size=20", "task.test_size=6", "train.steps=2",
                      "train.completions_per_step=8", "train.completions_per_forward=4", "algo.num_generations=4",
                      "algo.max_completion_length=16", "train.eval_interval=2", "tracking.enabled=false",
                      "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward/domain_tier_reward/mean" in r] == [1, 2]
    assert "eval (train, step 2): accuracy=" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_an_interrupted_aflow_run_resumes_with_its_task_state(tmp_path):
    common = ["train", *[a for a in AFLOW_TINY if not a.startswith(("train.eval_interval", "train.log_samples"))],
              "tracking.enabled=false"]
    first = run_cli([*common, "train.stop_after_steps=1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints" / "step-000002").exists()
    second = run_cli([*common, "train.resume=auto"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and set(state["task_state"]) == {"experience"}
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_aflow_pipeline_warm_starts_on_demonstrations_then_runs_grpo(tmp_path):
    result = run_cli([
        "pipeline", "aflow", "model=tiny", "task.workflow.executor.backend=scripted", "task.train_size=12",
        "task.test_size=6", "eval.max_examples=6", "train.threads=1", "data.max_length=384", "sft.algo.max_steps=1",
        "grpo.algo.max_prompt_length=256", "grpo.algo.max_completion_length=12", "grpo.train.completions_per_step=8",
        "grpo.train.completions_per_forward=4", "grpo.train.steps=1", "grpo.train.eval_interval=0", "pipeline.output_dir=pipe",
    ], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = {s["stage"]: s for s in json.loads((tmp_path / "pipe" / "history.json").read_text())["stages"]}
    assert list(stages) == ["data", "sft", "grpo"] and all(s["status"] == "succeeded" for s in stages.values())

    # the data stage: one demonstration per distinct training problem of the GRPO stage's workflow task
    demonstrations = [json.loads(line) for line in
                      (tmp_path / stages["data"]["outputs"]["data_path"] / "train.jsonl").read_text().splitlines()]
    assert demonstrations and all([m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
                                  for row in demonstrations)
    assert "class Workflow with `async def __call__(self, problem)`" in demonstrations[0]["messages"][0]["content"]

    # GRPO starts from SFT's model, on the workflow task, evaluated before and after
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    grpo_run = client.get_run(stages["grpo"]["mlflow_run_id"])
    assert grpo_run.data.params["model.path"] == stages["sft"]["outputs"]["model_dir"]
    assert grpo_run.data.params["task.name"] == "aflow"
    assert "plots/workflow_outcomes.png" in {a.path for a in client.list_artifacts(grpo_run.info.run_id, "plots")}
    assert "workflow/all/validity_rate" in stages["grpo"]["metrics"]
