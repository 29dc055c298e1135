"""Data parallel: two processes on half the batch each make the same update as one on all of it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from palaestra.config.sampling import ClippedObjective
from palaestra.distributed import Distributed
from palaestra.models import apply_lora, build_tiny_model
from palaestra.recipes.grpo import update_policy
from palaestra.rollout.hf import Rollout
from tests.conftest import REPO


def _setup(loss_type: str):
    torch.manual_seed(0)
    model, _ = build_tiny_model(seed=0)
    model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0.0, 0.1, generator=generator)
    prompts = torch.randint(3, 200, (2, 6), generator=generator).repeat_interleave(4, 0)
    completions = torch.randint(3, 200, (8, 5), generator=generator)
    completion_mask = torch.ones(8, 5, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[6, 2:] = 0
    rollout = Rollout(prompts, torch.ones_like(prompts), completions, completion_mask, torch.zeros(8, dtype=torch.bool), [""] * 8)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, 0.8, -0.6, -0.4])
    algo = SimpleNamespace(**asdict(ClippedObjective(loss_type=loss_type)), max_completion_length=5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return model, rollout, advantages, algo, trainable, optimizer, scheduler


def _update(dist: Distributed, loss_type: str, micro_batch_size: int) -> dict[str, torch.Tensor]:
    model, rollout, advantages, algo, trainable, optimizer, scheduler = _setup(loss_type)
    rows = slice(dist.rank * 8 // dist.world, (dist.rank + 1) * 8 // dist.world)
    mine = Rollout(rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows],
                   rollout.completion_mask[rows], rollout.truncated[rows], rollout.texts[rows])
    count = 8 // dist.world
    slices = [slice(i, i + micro_batch_size) for i in range(0, count, micro_batch_size)]
    update_policy(model, optimizer, scheduler, trainable, mine, advantages[rows], mine.completion_mask.float(),
                  algo=algo, slices=slices, shared=1, precision="fp32", temperature=1.0, old_logps=None, ref_logps=None,
                  max_grad_norm=0.0, dist=dist, timings={})
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, store: str, loss_type: str, out: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        weights = _update(Distributed(rank=rank, world=2), loss_type, micro_batch_size=2)
        if rank == 0:
            torch.save(weights, out)
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_two_processes_update_like_one_process_on_the_whole_batch(tmp_path, loss_type):
    single = _update(Distributed(), loss_type, micro_batch_size=2)
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(str(tmp_path / "store"), loss_type, str(out)), nprocs=2, join=True)
    parallel = torch.load(out)
    assert single.keys() == parallel.keys()
    for name in single:
        assert torch.allclose(single[name], parallel[name], atol=1e-6), name
    assert any(not torch.equal(single[n], _setup(loss_type)[0].get_parameter(n)) for n in single)  # it did move


@pytest.mark.slow
def test_torchrun_two_processes_train_and_checkpoint(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with socket.socket() as probe:  # a free port on this machine for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port),
               "-m", "palaestra.cli", "train", "model=tiny", "task.train_size=32", "task.test_size=8",
               "algo.num_generations=4", "algo.max_completion_length=6", "train.completions_per_step=16", "train.completions_per_forward=4",
               "train.steps=2", "train.output_dir=run", "tracking.enabled=false"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "trainable.safetensors").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # the main process logs once per step


# ---------------------------------------------------------------- PPO: the same minibatch updates on two processes


def _ppo_setup():
    from palaestra.models.value_head import ValueHead, logprobs_and_values

    torch.manual_seed(0)
    model, _ = build_tiny_model(seed=0)
    model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    value_head = ValueHead.for_model(model)
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, 200, (8, 5), generator=generator)
    completion_ids = torch.randint(3, 200, (8, 6), generator=generator)
    mask = torch.ones(8, 6, dtype=torch.long)
    for row, length in enumerate([6, 3, 5, 1, 6, 2, 4, 6]):  # uneven lengths: the processes' token shares differ
        mask[row, length:] = 0
    batch = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids, "mask": mask}
    with torch.no_grad():
        batch["old_logp"], batch["old_values"] = logprobs_and_values(model, value_head, prompt_ids, batch["prompt_mask"],
                                                                     completion_ids, mask)[:2]
    batch["advantages"] = torch.randn(8, 6, generator=generator) * mask
    batch["returns"] = torch.randn(8, 6, generator=generator) * mask
    trainable = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    algo = SimpleNamespace(ppo_epochs=2, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, temperature=1.0)
    return model, value_head, batch, trainable, optimizer, scheduler, algo


def _ppo_update(dist: Distributed) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    from palaestra.recipes.ppo import ppo_update

    model, value_head, batch, trainable, optimizer, scheduler, algo = _ppo_setup()
    mine = {key: value[dist.rank * 8 // dist.world : (dist.rank + 1) * 8 // dist.world] for key, value in batch.items()}
    stats = ppo_update(model, value_head, optimizer, scheduler, trainable, mine, algo=algo, minibatch_size=3,
                       max_grad_norm=0.0, precision="fp32", order_seed=(0, 1), timings={}, dist=dist)
    weights = {n: p.detach().clone() for n, p in [*model.named_parameters(), *value_head.named_parameters()] if p.requires_grad}
    return weights, stats


def _ppo_worker(rank: int, store: str, out: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        result = _ppo_update(Distributed(rank=rank, world=2))
        if rank == 0:
            torch.save(result, out)
    finally:
        torch_dist.destroy_process_group()


def test_ppo_minibatches_on_two_processes_update_like_one_process(tmp_path):
    single, single_stats = _ppo_update(Distributed())
    out = tmp_path / "rank0.pt"
    mp.spawn(_ppo_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    parallel, parallel_stats = torch.load(out)
    assert single.keys() == parallel.keys()
    for name in single:
        assert torch.allclose(single[name], parallel[name], atol=1e-6), name
    assert parallel_stats == pytest.approx(single_stats, rel=1e-5, abs=1e-7)  # token means over the whole minibatch
    assert any(not torch.equal(single[n], _ppo_setup()[0].get_parameter(n)) for n in single if "lora" in n)  # it moved


def _whiten_worker(rank: int, store: str, out: str) -> None:
    from palaestra.algorithms.ppo import whiten

    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        x, mask = torch.arange(12.0).reshape(4, 3) ** 1.5, torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
        rows = slice(2 * rank, 2 * rank + 2)
        torch.save(whiten(x[rows], mask[rows], reduce_sum=Distributed(rank=rank, world=2).sum), f"{out}.{rank}")
    finally:
        torch_dist.destroy_process_group()


def test_whitening_over_two_processes_uses_every_process_tokens(tmp_path):
    from palaestra.algorithms.ppo import whiten

    x, mask = torch.arange(12.0).reshape(4, 3) ** 1.5, torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    out = tmp_path / "whitened"
    mp.spawn(_whiten_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    together = torch.cat([torch.load(f"{out}.0"), torch.load(f"{out}.1")])
    torch.testing.assert_close(together, whiten(x, mask))
