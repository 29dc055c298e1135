"""Checkpoints: bit-for-bit resume (weights, optimizer, scheduler, RNG), pruning, best, resume."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from palaestra.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_best,
    save_checkpoint,
)


def _build(seed: int = 0):
    """A tiny model with its first layer frozen, AdamW and a warmup LambdaLR."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler) -> float:
    # every source of randomness a recipe might touch: torch (data + dropout-like noise),
    # python `random` (e.g. shuffling) and numpy (e.g. sampling a task)
    x = torch.randn(16, 4)
    hidden = model[:2](x)
    hidden = hidden * (torch.rand_like(hidden) > 0.2)  # dropout-like mask
    scale = random.random() + float(np.random.rand())
    loss = (model[2:](hidden) * scale).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def _reseed(seed: int = 1):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_resume_is_bit_for_bit(tmp_path):
    model, opt, sched = _build()
    _reseed()
    for _ in range(3):
        _train_step(model, opt, sched)
    ckpt = save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched,
                           trainer_state={"data_position": 48, "mlflow_run_id": "abc"})
    expected = [_train_step(model, opt, sched) for _ in range(3)]

    # fresh objects, as after a restart: the frozen base comes back from its seed (in a recipe, from
    # the base model files); trainable weights and RNG states are scrambled and must come back
    model2, opt2, sched2 = _build()
    with torch.no_grad():
        for p in model2.parameters():
            if p.requires_grad:
                p.normal_()
    _reseed(999)
    state = load_checkpoint(ckpt, model=model2, optimizer=opt2, scheduler=sched2)
    assert state == {"data_position": 48, "mlflow_run_id": "abc", "step": 3}
    assert sched2.last_epoch == 3
    got = [_train_step(model2, opt2, sched2) for _ in range(3)]

    assert got == expected  # exact float equality
    for (name, p1), (_, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p1, p2), name
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(s1[k], s2[k]) for k in ("exp_avg", "exp_avg_sq"))


def test_checkpoint_contents(tmp_path):
    model, opt, sched = _build()
    ckpt = save_checkpoint(tmp_path, 7, model=model, optimizer=opt, scheduler=sched,
                           trainer_state={"best": None})
    assert ckpt == tmp_path / "checkpoints" / "step-000007"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "optimizer.pt", "rng.pt", "scheduler.pt", "trainable.safetensors", "trainer_state.json",
    ]
    # only trainable parameters: layers 2 and 4, not the frozen layer 0
    assert sorted(load_file(ckpt / "trainable.safetensors")) == [
        "2.bias", "2.weight", "4.bias", "4.weight",
    ]
    assert json.loads((ckpt / "trainer_state.json").read_text()) == {"best": None, "step": 7}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000007"]  # no temp left

    # saving the same step again replaces it
    save_checkpoint(tmp_path, 7, model=model, optimizer=opt, scheduler=sched,
                    trainer_state={"best": 1.0})
    assert json.loads((ckpt / "trainer_state.json").read_text())["best"] == 1.0
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000007"]


def test_tied_weights_are_saved_once(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as in many LMs
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=None,
                           trainer_state={})
    assert sorted(load_file(ckpt / "trainable.safetensors")) == ["0.weight"]
    fresh = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    fresh[1].weight = fresh[0].weight
    load_checkpoint(ckpt, model=fresh)
    assert torch.equal(fresh[1].weight, model[0].weight)


def test_load_reports_missing_trainable_params(tmp_path):
    model, opt, sched = _build()
    ckpt = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched,
                           trainer_state={})
    other, _, _ = _build()
    other[0].requires_grad_(True)  # now layer 0 is trainable but was not saved
    with pytest.raises(ValueError, match=r"missing trainable \['0.bias', '0.weight'\]"):
        load_checkpoint(ckpt, model=other)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path, model=model)


def test_keep_last_n_and_stale_tmp(tmp_path):
    model, opt, sched = _build()
    ckpts = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched,
                        trainer_state={}, keep_last_n=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000030", "step-000040"]

    save_best(tmp_path, ckpts / "step-000030", "acc", 0.5)
    # an unfinished write from a crashed process, and a step folder without trainer_state.json
    (ckpts / ".tmp-step-000050-99999").mkdir()
    (ckpts / ".tmp-step-000050-99999" / "trainer_state.json").write_text("{}")
    (ckpts / "step-000060").mkdir()
    assert latest_checkpoint(tmp_path) == ckpts / "step-000040"
    assert latest_checkpoint(tmp_path / "nowhere") is None

    # pruning keeps the checkpoint just written even when it is an older step, and keeps best
    save_checkpoint(tmp_path, 5, model=model, optimizer=opt, scheduler=sched,
                    trainer_state={}, keep_last_n=1)
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == [
        "best", "step-000005", "step-000060",
    ]
    with pytest.raises(ValueError, match="keep_last_n"):
        save_checkpoint(tmp_path, 6, model=model, optimizer=opt, scheduler=sched,
                        trainer_state={}, keep_last_n=0)


def test_save_best_only_on_improvement(tmp_path):
    model, opt, sched = _build()
    ckpts = tmp_path / "checkpoints"
    a = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, trainer_state={})
    b = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, trainer_state={})

    def record():
        return json.loads((ckpts / "best" / "best.json").read_text())

    assert save_best(tmp_path, a, "eval/acc", 0.5) is True
    assert record()["checkpoint"] == "step-000001"
    assert save_best(tmp_path, b, "eval/acc", 0.4) is False  # worse
    assert save_best(tmp_path, b, "eval/acc", 0.5) is False  # a tie is not an improvement
    assert save_best(tmp_path, b, "eval/acc", float("nan")) is False
    assert record()["value"] == 0.5
    assert save_best(tmp_path, b, "eval/acc", 0.75) is True
    assert record() == {"metric": "eval/acc", "value": 0.75, "mode": "max",
                        "checkpoint": "step-000002"}
    assert json.loads((ckpts / "best" / "trainer_state.json").read_text())["step"] == 2
    # the best copy is a loadable checkpoint
    assert load_checkpoint(ckpts / "best", model=model, restore_rng=False)["step"] == 2

    # mode="min": lower is better
    assert save_best(tmp_path / "r2", a, "loss", 1.0, mode="min") is True
    assert save_best(tmp_path / "r2", b, "loss", 2.0, mode="min") is False
    assert save_best(tmp_path / "r2", b, "loss", 0.5, mode="min") is True
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "step-000001", "step-000002"]


def test_resolve_resume(tmp_path, monkeypatch):
    model, opt, sched = _build()
    run = tmp_path / "runs" / "exp1"
    assert resolve_resume(None, run) is None
    assert resolve_resume("", run) is None
    assert resolve_resume("auto", run) is None  # nothing yet: a fresh start, not an error

    for step in (1, 2):
        save_checkpoint(run, step, model=model, optimizer=opt, scheduler=sched, trainer_state={})
    latest = run / "checkpoints" / "step-000002"
    assert resolve_resume("auto", run) == latest
    assert resolve_resume(str(run / "checkpoints" / "step-000001"), run) == (
        run / "checkpoints" / "step-000001"
    )
    assert resolve_resume(str(run), tmp_path / "other") == latest  # a run directory
    assert resolve_resume(str(run / "checkpoints"), run) == latest  # its checkpoints folder
    monkeypatch.chdir(tmp_path)
    assert resolve_resume("exp1", tmp_path / "new", runs_root=tmp_path / "runs") == latest

    with pytest.raises(FileNotFoundError, match=r"resume='nope': no such checkpoint") as err:
        resolve_resume("nope", run)
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        resolve_resume(str(tmp_path / "empty"), run)


def test_peft_model_also_saves_a_standard_adapter(tmp_path):
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.proj(x))

    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, target_modules=["proj"]))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ckpt = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=None,
                           trainer_state={})
    # our file holds only the adapter ...
    assert all("lora_" in name for name in load_file(ckpt / "trainable.safetensors"))
    # ... and peft can load the copy in its own format directly
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(Tiny(), ckpt / "adapter")
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), model(x))
