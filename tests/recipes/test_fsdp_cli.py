"""Sharded training (``train.strategy=fsdp``): the real CLI under torchrun with two gloo processes, each holding
half of the weights, makes the updates DDP makes; its sharded checkpoints resume bit for bit in two processes
and load in one; its export is the plain Hugging Face folder a DDP run writes.

Every run computes in fp32 on one thread per process, so that the strategies differ only in how the
gradients travel (a reduce-scatter of shards, or an all-reduce of whole gradients)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from palaestra.planner.data import make_planner_dataset
from tests.conftest import run_cli

EXACT = ["model=tiny", "model.precision=fp32", "train.threads=1", "tracking.enabled=false"]


def _sft(tmp_path: Path) -> list[str]:
    """SFT on 13 conversations, 4 a step over two processes: the last step has one, so one process runs no
    micro-batch of its own and passes idly beside the other."""
    data = make_planner_dataset(tmp_path, date="2026-05-04", n_train=13, n_val=5, n_test=2)
    return ["train", "algo=sft", *EXACT, f"data.path={data}", "data.max_length=128", "algo.packing=false",
            "algo.epochs=1", "train.sequences_per_step=4", "train.sequences_per_forward=2", "train.learning_rate=1e-3",
            "train.keep_last_n=0", "train.save_interval=2"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(args: list[str], tmp_path: Path, processes: int = 2) -> None:
    done = run_cli(args, tmp_path, processes=processes)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_same_model(one: Path, two: Path, atol: float) -> None:
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), (name, (a[name] - b[name]).abs().max())


@pytest.mark.slow
def test_sharded_sft_makes_the_updates_of_ddp_and_exports_the_same_model(tmp_path):
    """LoRA with the LM head chunked (the head runs after the sharded model's forward, on its gathered weights)."""
    args = [*_sft(tmp_path), "train.logprob_chunk_tokens=16"]
    _train([*args, "train.strategy=fsdp", "train.output_dir=fsdp"], tmp_path)
    _train([*args, "train.strategy=ddp", "train.output_dir=ddp"], tmp_path)
    sharded, replicated = _records(tmp_path / "fsdp"), _records(tmp_path / "ddp")
    assert [r["step"] for r in sharded] == [r["step"] for r in replicated] == [1, 2, 3, 4, 4]
    for a, b in zip(sharded, replicated):
        for key in ("train/step_loss", "grad_norm", "val_loss"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-5), key
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step-000004"
    assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "trainable.safetensors").exists()
    assert (checkpoint / "adapter-config" / "adapter_config.json").is_file()
    _assert_same_model(tmp_path / "fsdp" / "model", tmp_path / "ddp" / "model", atol=1e-5)


@pytest.mark.slow
def test_sharded_grpo_full_finetuning_makes_the_updates_of_ddp(tmp_path):
    """Full fine-tuning with a KL penalty (the reference sharded too) and two updates per rollout batch; the
    rollouts and the evaluation run on the gathered weights."""
    from tests.recipes.test_grpo_cli import TINY

    args = ["train", *TINY, "model.precision=fp32", "train.threads=1", "tracking.enabled=false", "model.lora.enabled=false",
            "algo.beta=0.04", "algo.num_iterations=2", "train.steps=5", "train.eval_interval=5"]
    _train([*args, "train.strategy=fsdp", "train.output_dir=fsdp"], tmp_path)
    _train([*args, "train.strategy=ddp", "train.output_dir=ddp"], tmp_path)
    sharded, replicated = _records(tmp_path / "fsdp"), _records(tmp_path / "ddp")
    assert [r["step"] for r in sharded] == [r["step"] for r in replicated] == [1, 2, 3, 4, 5]
    assert any(r["grad_norm"] > 0 for r in sharded)  # some group had rewards to learn from
    for a, b in zip(sharded, replicated):
        for key in ("loss", "kl", "grad_norm", "reward/mean", "completion_length/mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    evaluations = [json.loads((tmp_path / run / "checkpoints" / "step-000005" / "trainer_state.json").read_text())["last_eval"]
                   for run in ("fsdp", "ddp")]
    assert evaluations[0] == evaluations[1]


@pytest.mark.slow
def test_sharded_dpo_full_finetuning_makes_the_updates_of_ddp(tmp_path):
    """The frozen reference is sharded too; 13 pairs, 4 a step: the last step's one pair leaves a process idle."""
    from tests.recipes.test_reward_dpo_cli import _write_pairs

    _write_pairs(tmp_path / "prefs", train=13, val=7)
    args = ["train", "algo=dpo", *EXACT, "data.path=prefs", "data.max_length=64", "algo.epochs=1", "model.lora.enabled=false",
            "train.pairs_per_step=4", "train.pairs_per_forward=2", "train.learning_rate=1e-3"]
    _train([*args, "train.strategy=fsdp", "train.output_dir=fsdp"], tmp_path)
    _train([*args, "train.strategy=ddp", "train.output_dir=ddp"], tmp_path)
    sharded, replicated = _records(tmp_path / "fsdp"), _records(tmp_path / "ddp")
    assert [r["step"] for r in sharded] == [r["step"] for r in replicated] == [1, 2, 3, 4]
    for a, b in zip(sharded, replicated):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    evaluations = [json.loads((tmp_path / run / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
                   ["last_eval"]["figures"] for run in ("fsdp", "ddp")]
    assert evaluations[0] == pytest.approx(evaluations[1], abs=1e-5)  # held-out pairs scored on the gathered weights
    _assert_same_model(tmp_path / "fsdp" / "model", tmp_path / "ddp" / "model", atol=1e-5)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_bit_for_bit_in_two_processes_and_loads_in_one(tmp_path):
    args = [*_sft(tmp_path), "model.lora.enabled=false", "train.strategy=fsdp"]
    _train([*args, "train.output_dir=straight"], tmp_path)
    _train([*args, "train.output_dir=resumed", "train.stop_after_steps=2"], tmp_path)
    shutil.copytree(tmp_path / "resumed", tmp_path / "alone")  # the same checkpoint, for one process
    _train([*args, "train.output_dir=resumed", "train.resume=auto"], tmp_path)
    _train([*args, "train.output_dir=alone", "train.resume=auto"], tmp_path, processes=1)

    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["train/step_loss"] for r in _records(tmp_path / "resumed")[:2]] == \
        [r["train/step_loss"] for r in _records(tmp_path / "straight")[:2]]
    _assert_same_model(tmp_path / "straight" / "model", tmp_path / "alone" / "model", atol=1e-6)

    # the export command reads the sharded checkpoint in one process: the run's own export
    exported = run_cli(["export", "model=tiny", "eval.checkpoint=straight", "export.output_dir=exported"], tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    _assert_same_model(tmp_path / "straight" / "model", tmp_path / "exported", atol=0)


@pytest.mark.slow
def test_an_unsharded_checkpoint_is_not_resumed_sharded(tmp_path):
    args = _sft(tmp_path)
    _train([*args, "train.output_dir=run", "train.stop_after_steps=1"], tmp_path, processes=1)
    refused = run_cli([*args, "train.output_dir=run", "train.resume=auto", "train.strategy=fsdp"], tmp_path, processes=2)
    assert refused.returncode != 0
    assert "was saved by an unsharded run" in refused.stderr and "train.strategy=ddp" in refused.stderr
    # each process's one line, before the launcher's report of its failed children
    assert "Traceback" not in refused.stderr[: refused.stderr.index("palaestra: error")]


def test_sharding_settings_are_checked_before_the_model_loads(tmp_path):
    refused = run_cli(["train", "--target=mamba", "train.strategy=fsdp"], tmp_path)
    assert refused.returncode == 2 and "algo=mamba does not read train.strategy (algo=sft, algo=dpo, algo=grpo read it)" in refused.stderr

    refused = run_cli(["train", "model=tiny", "train.strategy=fsdp", "train.fsdp_cpu_offload=true"], tmp_path)
    assert refused.returncode == 2 and "train.fsdp_cpu_offload" in refused.stderr

    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    refused = run_cli(["train", "model=hf", f"model.path={encoder}", "train.strategy=fsdp"], tmp_path)
    assert refused.returncode == 2 and "BertModel without decoder layers to shard" in refused.stderr
    assert "Traceback" not in refused.stderr
