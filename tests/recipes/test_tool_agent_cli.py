"""Tool-calling GRPO through the real CLI: the tiny model with a calculator and a tool that hangs, and the embedded model,
which calls the calculator from its first step (the plain format's worked exchange)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli
from tests.recipes.test_grpo_cli import TINY

pytestmark = pytest.mark.slow


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_tool_agent_trains_evaluates_and_logs_tool_use(tmp_path):
    result = run_cli(["train", *TINY, "agent.tools=[calculator,tests.unit.test_agent_tools:sleeper]",
                      "agent.tool_timeout_s=1", "train.steps=2", "train.eval_interval=2", "train.log_samples_interval=1",
                      "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "agent: tools calculator, sleeper in the plain format, up to 3 calls an episode" in log
    steps = [r for r in _records(tmp_path / "run") if "learning_rate" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert {"tool/calls_per_episode", "tool/valid_call_share", "tool/used_share"} <= set(record)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(state["mlflow_run_id"])
    assert "eval/tool/used_share" in run.data.metrics and "tool/used_share" in run.data.metrics
    table = Path(client.download_artifacts(run.info.run_id, "eval/samples_train_step000002.json", str(tmp_path)))
    assert '"transcript"' in table.read_text() and "<|im_start|>" not in table.read_text().split('"transcript"')[0][-5:]


def test_embedded_model_calls_the_calculator_and_trains_on_its_own_tokens(tmp_path):
    result = run_cli(["train", "task=large_sum", "agent.tools=[calculator]", "agent.max_turns=1", "train.steps=2",
                      "train.completions_per_step=16", "algo.num_generations=4", "train.completions_per_forward=8",
                      "algo.max_completion_length=32", "task.test_size=4", "train.eval_interval=2",
                      "tracking.enabled=false", "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(tmp_path / "run")
    steps = [r for r in records if "learning_rate" in r]
    # the worked exchange makes the base model call the calculator from the first steps (about a third of its episodes
    # in the first steps of bench/tool_agents.py), and most calls run
    assert sum(r["tool/used_share"] for r in steps) > 0
    assert all(r["tool/valid_call_share"] >= 0.5 for r in steps if r["tool/calls_per_episode"] > 0)
    # it learns from its episodes: some step's rewards differ within a group and move the weights; a step whose
    # rewards are all equal cannot (GRPO's advantages are zero). Which steps are which depends on the CPU's precision.
    assert any(r["grad_norm"] > 0 for r in steps)
    assert all(r["grad_norm"] == 0 for r in steps if r["reward/std"] == 0)
    # the loss counts the sampled tokens only: the completion length excludes the results' tokens
    assert all(r["completion_length/max"] <= 2 * 32 for r in steps)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "eval (train, step 2)" in log and "tool/used_share=" in log


@pytest.mark.parametrize("program", ["openai_agent", "langgraph_agent"])
def test_an_agent_program_trains_through_the_recorded_endpoint(tmp_path, program):
    result = run_cli(["train", *TINY, f"agent.program=tests.recipes.agent_programs:{program}", "train.steps=2",
                      "train.eval_interval=2", "tracking.enabled=false", "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(tmp_path / "run")
    steps = [r for r in records if "learning_rate" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:  # two calls an episode, each a row trained with the episode's advantage
        assert record["program/calls_per_episode"] == 2.0 and record["program/failed_share"] == 0.0
        assert record["grad_norm"] > 0 or record["reward/std"] == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"agent: the program tests.recipes.agent_programs:{program}" in log
    assert "eval (train, step 2)" in log and "program/calls_per_episode=2" in log


def test_a_team_whose_roles_call_tools(tmp_path):
    from tests.recipes.test_grpo_cli import TEAM

    result = run_cli([*TEAM, "agent.tools=[calculator]", "agent.max_turns=1", "train.steps=2", "train.eval_interval=2",
                      "tracking.enabled=false", "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r for r in _records(tmp_path / "run") if "learning_rate" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all({"tool/calls_per_episode", "tool/used_share"} <= set(r) for r in steps)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "agent: tools calculator in the plain format, up to 1 calls an episode" in log and "tool/used_share=" in log
