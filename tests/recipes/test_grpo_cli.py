"""The real ``palaestra`` CLI on the tiny model: training, tracking, resume and bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from palaestra.models import embedded_model_dir
from palaestra.planner.data import make_planner_dataset
from tests.conftest import REPO, run_cli, write_gsm8k

TINY = [
    "model=tiny", "task.train_size=32", "task.test_size=8", "algo.num_generations=4", "algo.max_completion_length=8",
    "train.completions_per_step=8", "train.completions_per_forward=4", "train.learning_rate=1e-3", "eval.batch_size=16",
    "task.rewards=[correctness,tests.recipes.rewards:digit_share]", "task.reward_weights=[1.0,1.0]",
]


def _metrics(run_dir: Path) -> dict[int, dict]:
    """Last record per step of the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record for record in records}


@pytest.mark.slow
def test_train_tiny_logs_everything(tmp_path):
    result = run_cli(["train", *TINY, "train.steps=3", "train.save_interval=2", "train.eval_interval=2",
                      "train.log_samples_interval=1", "algo.beta=0.04", "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    final = run_dir / "checkpoints" / "step-000003"
    adapter = load_file(final / "trainable.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero; training must move it"
    steps = _metrics(run_dir)
    assert sorted(steps) == [1, 2, 3]
    assert all(math.isfinite(steps[s]["loss"]) for s in steps)
    assert (run_dir / "train.log").read_text().count("step ") >= 3

    state = json.loads((final / "trainer_state.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in ("loss", "reward/mean", "reward/std", "reward/correctness/mean", "reward/digit_share/mean", "kl", "clip_ratio/region", "entropy",
                "completion_length/mean", "learning_rate", "grad_norm", "time/step", "tokens_per_second", "eval/accuracy"):
        assert key in run.data.metrics, key
    assert run.data.params["algo.beta"] == "0.04" and run.data.params["model.name"] == "tiny"
    for tag in ("task", "algo", "model", "dataset_version"):
        assert run.data.tags.get(tag), tag
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots", "samples", "train.log"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/reward_curve.png"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(tmp_path):
    common = ["train", *TINY, "train.steps=4", "train.save_interval=2", "train.keep_last_n=0", "algo.beta=0.04",
              "algo.num_iterations=2"]
    straight = run_cli([*common, "train.output_dir=straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli([*common, "train.output_dir=resumed", "train.stop_after_steps=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (tmp_path / "resumed" / "checkpoints" / "step-000004").exists()
    second = run_cli([*common, "train.output_dir=resumed", "train.resume=auto"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]

    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    for step in (1, 2, 3, 4):
        assert a[step]["loss"] == b[step]["loss"], step
        assert a[step]["reward/mean"] == b[step]["reward/mean"], step
    wa = load_file(tmp_path / "straight" / "checkpoints" / "step-000004" / "trainable.safetensors")
    wb = load_file(tmp_path / "resumed" / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # the resumed invocation continued the same MLflow run
    state_2 = json.loads((tmp_path / "resumed" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    state_4 = json.loads((tmp_path / "resumed" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state_2["mlflow_run_id"] == state_4["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(state_4["mlflow_run_id"], "loss")]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_run_command_reports_before_and_after(tmp_path):
    result = run_cli(["run", *TINY, "train.steps=2", "tracking.enabled=false"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "before" in result.stdout and "after" in result.stdout and "accuracy" in result.stdout


@pytest.mark.slow
def test_eval_command_on_a_checkpoint(tmp_path):
    trained = run_cli(["train", *TINY, "train.steps=1", "train.output_dir=run"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = run_cli(["eval", *TINY, "eval.checkpoint=run", "eval.greedy=false", "eval.num_samples=4",
                      "eval.pass_k=[1,4]"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pass@4" in result.stdout and "accuracy" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp32"])
def test_eval_command_on_the_base_model_at_every_precision(tmp_path, precision):
    # no checkpoint: fp32 weights, and at auto/bf16 the decode step computes in bf16 (it crashed there)
    result = run_cli(["eval", *TINY, f"model.precision={precision}", "eval.greedy=false", "eval.num_samples=4",
                      "eval.pass_k=[1,4]"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pass@4" in result.stdout and "accuracy" in result.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "task=no_such_task"], "no_such_task"),
        (["train", "model=tiny", "algo.num_generations=1"], "algo.num_generations=1 must be >= 2"),
        (["train", "model=tiny", "train.completions_per_step=30"], "not divisible by algo.num_generations"),
        (["train", "model=tiny", "train.learning_rate=-1"], "train.learning_rate=-1.0 must be >= 0"),
        (["train", "model=tiny", "task=gsm8k", "task.path=nowhere.jsonl"], "task.path=nowhere.jsonl does not exist"),
        (["train", "model=hf", "model.path=./no/such/folder"], "no/such/folder"),
        (["train", "model=tiny", "algo.teacher=./no/teacher"], "algo.teacher=./no/teacher is not a folder"),
        (["train", "model=tiny", "algo.teacher=.", "algo.reward_coef=0"], "holds neither a palaestra checkpoint nor a model"),
        (["train", "model=tiny", "algo.entropy_coef=-0.1"], "algo.entropy_coef=-0.1 must be >= 0"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_bad_input_fails_fast_and_writes_nothing(tmp_path, args, expected):
    result = run_cli(args, tmp_path, timeout=120)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_malformed_dataset_file_is_reported(tmp_path):
    data = write_gsm8k(tmp_path / "data.jsonl")
    with open(data, "a") as handle:
        handle.write("{not json\n")
    before = set(tmp_path.iterdir())
    result = run_cli(["train", "model=tiny", "task=gsm8k", f"task.path={data}"], tmp_path, timeout=120)
    assert result.returncode == 2 and "data.jsonl:13" in result.stderr and "Traceback" not in result.stderr
    assert set(tmp_path.iterdir()) == before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])
def test_signals_save_at_a_step_boundary(tmp_path, sig):
    """SIGUSR1 saves and goes on; SIGINT saves and exits with 130 (then SIGTERM, 143, for the USR1 case)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "palaestra.cli", "train", *TINY, "train.steps=2000", "train.save_interval=0",
         "tracking.enabled=false", "train.output_dir=run"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    process.send_signal(sig)
    if sig == signal.SIGUSR1:
        deadline = time.time() + 60
        while time.time() < deadline and not list((tmp_path / "run" / "checkpoints").glob("step-*")):
            time.sleep(0.2)
        assert list((tmp_path / "run" / "checkpoints").glob("step-*")), "SIGUSR1 must save a checkpoint"
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    # a stopped run says so: exit code 128 + the signal (130 for Ctrl-C, 143 for SIGTERM), and how to resume
    assert process.returncode == (130 if sig == signal.SIGINT else 143), stderr[-2000:]
    assert "resume with: palaestra train train.resume=auto train.output_dir=run" in stdout
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    last_step = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert saved[-1].name == f"step-{last_step:06d}"
    assert last_step < 2000


TEAM = ["train", "algo=at_grpo", "env=math", "env.name=tests.recipes.envs:CountingEnv", "+env.params.max_turns=2",
        "model=tiny", "env.train_envs=2", "env.test_envs=2", "algo.max_completion_length=6", "train.answers_per_forward=8",
        "train.learning_rate=1e-2", "train.save_interval=1"]


@pytest.mark.slow
@pytest.mark.parametrize("objective", [
    ["algo.loss_type=cispo", "algo.epsilon_high=5", "algo.advantage=rloo", "algo.overlong_buffer=4", "rollout.quantize=int8"],
    ["algo.loss_type=grpo", "algo.importance_sampling_level=sequence", "algo.epsilon=3e-4", "algo.epsilon_high=4e-4",
     "algo.advantage=reinforce_pp", "algo.num_iterations=2"],
])
def test_grpo_trains_with_the_newer_objectives(tmp_path, objective):
    """CISPO with RLOO's baseline and DAPO's overlong shaping, sampled on int8 weights (the mismatch corrected); GSPO's
    sequence-level ratio with REINFORCE++ advantages (two updates a batch, so the ratio moves off 1)."""
    result = run_cli(["train", *TINY, *objective, "train.steps=2", "tracking.enabled=false", "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = _metrics(tmp_path / "run")
    assert sorted(steps) == [1, 2] and all(math.isfinite(steps[s]["loss"]) for s in steps)
    if "algo.overlong_buffer=4" in objective:  # 8-token completions of the tiny model run into the band
        assert all(-1 <= steps[s]["reward/overlong/mean"] <= 0 for s in steps)
    if "rollout.quantize=int8" in objective:  # the sampler's log-probs came with the rollouts, the gap is measured
        assert all(steps[s]["rollout/logprob_gap/mean"] >= 0 and steps[s]["rollout/is_ratio/mean"] > 0 for s in steps)
    adapter = load_file(tmp_path / "run" / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)


@pytest.mark.slow
def test_dynamic_sampling_fills_the_step_with_groups_that_differ(tmp_path):
    """About half of chain_sum's answers are even, and every completion of their prompts scores 1: those groups
    are dropped and fresh prompts drawn until the step has its 2 groups, or 4 rounds are spent."""
    args = ["train", *TINY, "task.rewards=[tests.recipes.rewards:settled_for_even_answers]", "task.reward_weights=[1.0]",
            "algo.dynamic_sampling=true", "algo.max_sampling_rounds=4", "train.steps=3", "tracking.enabled=false",
            "train.output_dir=run"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = _metrics(tmp_path / "run")
    drawn = sum(steps[s]["sampling/rounds"] for s in steps)
    assert any(steps[s]["sampling/rounds"] > 1 for s in steps) and all(1 <= steps[s]["sampling/rounds"] <= 4 for s in steps)
    assert 0 < sum(steps[s]["sampling/dropped_share"] * steps[s]["sampling/rounds"] for s in steps) / drawn < 1
    for record in steps.values():  # full unless the cap ended the drawing
        assert record["sampling/groups"] == 2 or (record["sampling/rounds"] == 4 and record["sampling/groups"] < 2)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["data_position"] == 2 * drawn  # every round drew 2 fresh prompts (16 completions a step, 8 a group)


@pytest.mark.slow
def test_on_policy_distillation_brings_the_student_to_its_teacher(tmp_path):
    """algo.teacher: the teacher is the student's base fine-tuned (SFT on planner data); with algo.reward_coef=0 the
    only signal is the teacher's per-token log-probs, and the student's reverse KL to it falls."""
    data = make_planner_dataset(tmp_path, date="2026-05-04", n_train=16, n_val=4, n_test=4)
    teacher = run_cli(["train", "algo=sft", "model=tiny", "model.lora.enabled=false", "data.max_length=128",
                       "train.learning_rate=3e-3", "algo.epochs=4", f"data.path={data}", "train.sequences_per_step=4",
                       "train.sequences_per_forward=4", "tracking.enabled=false", "train.output_dir=teacher"], tmp_path)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    args = [*TINY, "model.lora.enabled=false", "train.learning_rate=1e-2", "train.completions_per_step=16",
            "train.completions_per_forward=8", "algo.teacher=teacher", "algo.reward_coef=0", "algo.entropy_coef=0.01",
            "train.steps=10", "tracking.enabled=false", "train.output_dir=student"]
    student = run_cli(["train", *args], tmp_path)
    assert student.returncode == 0, student.stderr[-3000:]
    reverse_kl = [record["distill/reverse_kl"] for _, record in sorted(_metrics(tmp_path / "student").items())]
    assert len(reverse_kl) == 10 and reverse_kl[0] > 0.5  # the fine-tuned teacher is far from the base at first
    assert sum(reverse_kl[-3:]) / 3 < 0.7 * sum(reverse_kl[:3]) / 3, reverse_kl
    # a teacher trained on another base model is refused in one line before any model loads
    other_base = run_cli(["train", "algo.teacher=teacher", "train.steps=1", "tracking.enabled=false"], tmp_path, timeout=120)
    assert other_base.returncode != 0 and "Traceback" not in other_base.stderr
    assert "algo.teacher=teacher was trained on the model 'tiny', not on this run's 'smollm2-135m'" in other_base.stderr
    # a teacher whose tokenizer is not the student's is refused in one line
    other = run_cli(["train", *TINY, f"algo.teacher={embedded_model_dir()}", "train.steps=1", "tracking.enabled=false"],
                    tmp_path)
    assert other.returncode != 0 and "has another tokenizer than the policy's model" in other.stderr
    assert "Traceback" not in other.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode, objective", [
    ("shared", []), ("per_role", ["algo.loss_type=sapo", "algo.advantage=reinforce_pp", "rollout.quantize=int8"]),
    ("separate", ["algo.advantage=rloo", "algo.entropy_coef=0.01"]),
])
def test_at_grpo_trains_every_policy_mode(tmp_path, mode, objective):
    result = run_cli([*TEAM, f"policy={mode}", *objective, "train.steps=2", "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "success_rate" in result.stdout  # the before/after table
    final = tmp_path / "run" / "checkpoints" / "step-000002"
    parts = sorted(p.name for p in final.glob("policy-*"))
    assert parts == (["policy-shared"] if mode == "shared" else ["policy-checker", "policy-proposer"])
    for part in parts:
        weights = load_file(final / part / "trainable.safetensors")
        assert any(t.abs().sum() > 0 for name, t in weights.items() if "lora_B" in name), f"{part} did not train"
    steps = _metrics(tmp_path / "run")
    assert sorted(steps) == [1, 2] and "success_rate" in steps[2] and "reward/proposer" in steps[2]
    assert any(key.endswith("/entropy") for key in steps[2]) == (mode == "separate")  # logged with the entropy bonus
    assert any(key.endswith("rollout/logprob_gap/mean") for key in steps[2]) == ("rollout.quantize=int8" in objective)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    state = json.loads((final / "trainer_state.json").read_text())
    run = client.get_run(state["mlflow_run_id"])
    assert run.data.tags["policy"] == mode and "eval/success_rate" in run.data.metrics
    transcripts = {a.path for a in client.list_artifacts(run.info.run_id, "transcripts")}
    assert "transcripts/before_step000000.json" in transcripts


@pytest.mark.slow
def test_at_grpo_resume_restores_every_policy(tmp_path):
    common = [*TEAM, "policy=per_role", "train.steps=2", "tracking.enabled=false"]
    straight = run_cli([*common, "train.output_dir=straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli([*common, "train.output_dir=resumed", "train.stop_after_steps=1"], tmp_path)
    second = run_cli([*common, "train.output_dir=resumed", "train.resume=auto"], tmp_path)
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-3000:]
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert a[2]["proposer/loss"] == b[2]["proposer/loss"] and a[2]["checker/loss"] == b[2]["checker/loss"]
    for part in ("policy-proposer", "policy-checker"):
        wa = load_file(tmp_path / "straight" / "checkpoints" / "step-000002" / part / "trainable.safetensors")
        wb = load_file(tmp_path / "resumed" / "checkpoints" / "step-000002" / part / "trainable.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_at_grpo_eval_command(tmp_path):
    trained = run_cli([*TEAM, "policy=per_role", "train.steps=1", "train.output_dir=run", "tracking.enabled=false"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = run_cli(["eval", *TEAM[1:], "policy=per_role", "eval.checkpoint=run", "tracking.enabled=false"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "success_rate" in result.stdout and "local_reward/checker" in result.stdout


def test_at_grpo_bad_input(tmp_path):
    result = run_cli(["train", "algo=at_grpo", "model=tiny", "algo.samples_per_state=1"], tmp_path, timeout=120)
    assert result.returncode == 2 and "algo.samples_per_state=1 must be >= 2" in result.stderr
    result = run_cli(["train", "algo=at_grpo", "model=tiny", "env.name=nowhere"], tmp_path, timeout=120)
    assert result.returncode == 2 and "unknown env.name 'nowhere'" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_merged_model_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained = run_cli(["train", *TINY, "train.steps=1", "train.output_dir=run", "tracking.enabled=false"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    merged = run_cli(["export", "model=tiny", "eval.checkpoint=run", "export.output_dir=merged"], tmp_path)
    assert merged.returncode == 0, merged.stderr[-3000:]
    adapter = run_cli(["export", "model=tiny", "eval.checkpoint=run", "export.output_dir=adapter", "export.merge=false"], tmp_path)
    assert adapter.returncode == 0, adapter.stderr[-3000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "adapter" / "adapter_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in model.named_parameters())
    # the merged model computes what base + adapter computed: compare with the checkpoint's adapter
    from peft import PeftModel

    from palaestra.models import build_tiny_model

    base, _ = build_tiny_model(seed=0)
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "run" / "checkpoints" / "step-000001" / "adapter")
    ids = tokenizer("What is 2 + 3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, with_adapter(ids).logits, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("reward, message", [
    ("nan_for_the_second", "reward 'tests.recipes.rewards:nan_for_the_second' gave nan for completion 1 ("),
    ("one_value_short", "reward 'tests.recipes.rewards:one_value_short' gave 7 values for 8 completions; it must"),
])
def test_a_broken_reward_stops_the_run_in_one_line_before_any_update(tmp_path, reward, message):
    args = [*TINY[:-2], f"task.rewards=[tests.recipes.rewards:{reward}]", "train.steps=3", "train.save_interval=1",
            "tracking.enabled=false", "train.output_dir=run"]
    result = run_cli(["train", *args], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and f"palaestra: error: {message}" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # the first step's update never happened
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_reward_that_raises_shows_its_own_traceback_under_its_name(tmp_path):
    args = [*TINY[:-2], "task.rewards=[tests.recipes.rewards:raising]", "train.steps=2", "tracking.enabled=false",
            "train.output_dir=run"]
    result = run_cli(["train", *args], tmp_path)
    assert result.returncode != 0
    assert "palaestra: error: reward 'tests.recipes.rewards:raising' raised on a batch of 8 completions (KeyError); its traceback:" in result.stderr
    assert "KeyError: 'answer_column_missing'" in result.stderr and "tests/recipes/rewards.py" in result.stderr
