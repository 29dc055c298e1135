"""Rollouts apart from the trainer, through the real CLI on the tiny model: GRPO and AT-GRPO sampling on a ``palaestra
serve`` rollout worker, and a team's environments stepped in worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, free_port, run_cli
from tests.recipes.test_grpo_cli import TINY

FP32 = ["model.precision=fp32", "model.dtype=float32"]


def _start_worker(port: int, cwd: Path) -> subprocess.Popen:
    """``palaestra serve`` as a rollout worker on ``port``, answering /health."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "palaestra.cli", "serve", "model=tiny", "model.dtype=float32", f"serve.port={port}",
         "serve.embedder=null", "serve.runtime_lora=true", "serve.logprobs_mode=processed_logprobs"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the rollout worker did not start")


def _steps(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {record["step"]: record for record in records if "learning_rate" in record}  # training steps, not evals


@pytest.mark.slow
def test_grpo_trains_on_a_worker_that_is_killed_and_restarted(tmp_path):
    port = free_port()
    worker = _start_worker(port, tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    train = subprocess.Popen(
        [sys.executable, "-m", "palaestra.cli", "train", *TINY, *FP32, "model.lora.enabled=true", "train.steps=6",
         "train.eval_interval=0", "rollout.engine=server", f"rollout.servers=[http://127.0.0.1:{port}/v1]",
         "rollout.server_wait_s=90", "train.output_dir=run"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(_steps(tmp_path / "run")) < 2 and train.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        steps_at_kill = len(_steps(tmp_path / "run"))
        assert train.poll() is None and steps_at_kill < 6, "the run must still be going when its worker dies"
        worker.send_signal(signal.SIGKILL)  # mid-run: the adapter it held is gone with it
        worker.wait()
        time.sleep(2)
        worker = _start_worker(port, tmp_path)
        _, stderr = train.communicate(timeout=300)
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=30)
        if train.poll() is None:
            train.kill()
    assert train.returncode == 0, stderr[-3000:]
    assert "rollout server http://127.0.0.1" in (tmp_path / "run" / "train.log").read_text()  # the failure was seen

    steps = _steps(tmp_path / "run")
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # the restart cost no step
    for step, record in steps.items():
        # the worker's log-probs are the trainer's for the adapter it was just sent: fp32 on both sides
        assert record["rollout/logprob_gap/max"] < 1e-3, (step, record["rollout/logprob_gap/max"])
        assert record["rollout/is_capped_share"] == 0.0
    adapter = load_file(tmp_path / "run" / "checkpoints" / "step-000006" / "trainable.safetensors")
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)
    published = [p.name for p in (tmp_path / "run" / "rollout_adapters").iterdir()]
    assert len(published) == 1 and published[0].startswith("default-"), published  # old versions removed


def test_no_worker_answering_is_one_line_before_the_model_loads(tmp_path):
    port = free_port()
    result = run_cli(["train", *TINY, "model.lora.enabled=true", "rollout.engine=server",
                      f"rollout.servers=[http://127.0.0.1:{port}]", "rollout.server_wait_s=0"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"palaestra: error: no rollout server answers GET /v1/models at http://127.0.0.1:{port}")
    assert "\n" not in result.stderr.strip()


@pytest.mark.slow
def test_a_per_role_team_samples_on_a_worker_with_an_adapter_per_role(tmp_path):
    from tests.recipes.test_grpo_cli import TEAM

    port = free_port()
    worker = _start_worker(port, tmp_path)
    try:
        result = run_cli([*TEAM, *FP32, "policy=per_role", "train.steps=2", "tracking.enabled=false", "train.output_dir=run",
                          "rollout.engine=server", f"rollout.servers=[http://127.0.0.1:{port}]"], tmp_path)
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=30)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = _steps(tmp_path / "run")
    assert sorted(steps) == [1, 2]
    for record in steps.values():
        for role in ("proposer", "checker"):  # each role's answers came from its own adapter on the worker
            assert record[f"{role}/rollout/logprob_gap/max"] < 1e-3, record
    published = sorted(p.name.split("-")[0] for p in (tmp_path / "run" / "rollout_adapters").iterdir())
    assert published == ["checker", "proposer"]  # the latest version of each role's adapter, side by side


@pytest.mark.slow
def test_a_team_whose_environments_hang_die_or_raise_in_workers_loses_episodes_not_the_run(tmp_path):
    from tests.recipes.test_grpo_cli import TEAM

    team = [key if key != "env.name=tests.recipes.envs:CountingEnv" else "env.name=tests.recipes.envs:FlakyEnv" for key in TEAM]
    result = run_cli([*team, "train.steps=2", "tracking.enabled=false", "train.output_dir=run", "env.workers=2",
                      "env.step_timeout_s=2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = _steps(tmp_path / "run")
    assert sorted(steps) == [1, 2]
    # train seeds 0, 1 then 2, 3: one behaves, one hangs, one kills its worker, one raises
    assert steps[1]["lost_steps"] > 0 and steps[2]["lost_steps"] > 0
    assert steps[1]["success_rate"] == 0.5  # seed 0's episode, beside the hung one, played on and succeeded
