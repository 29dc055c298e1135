"""The run component: the end-of-step decisions by hand, then a whole run of a tiny model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from palaestra.config import ConfigError, StepLoopSettings
from palaestra.optim import lr_lambda
from palaestra.recipes.run import Run, decide, planned_steps

QUIET = dict(total_steps=10, save_interval=0, value=None, best=None, mode="max", evals_without_improvement=0,
             patience=0, steps_this_run=1, stop_after_steps=0, out_of_time=False, signal_stop=False, signal_save=False)


def _decide(step: int, **changes):
    return decide(step, **{**QUIET, **changes})


def test_save_interval_and_the_last_step():
    # save_interval=3 over 7 steps: steps 3 and 6 by the interval, 7 because it is the last
    saved = [step for step in range(1, 8) if _decide(step, total_steps=7, save_interval=3).save]
    assert saved == [3, 6, 7]
    assert not _decide(6, total_steps=7, save_interval=3).stop
    last = _decide(7, total_steps=7)
    assert (last.stop, last.reason) == (True, "finished")


def test_sigusr1_saves_and_goes_on():
    decision = _decide(4, signal_save=True)
    assert decision.save and not decision.stop and decision.reason == ""


def test_keep_best_follows_the_metric_in_its_direction():
    # max: 0.5 (first: best), 0.4 (worse: one eval without improvement), 0.6 (best again)
    best, bad, improved = None, 0, []
    for value in (0.5, 0.4, 0.6):
        d = _decide(2, value=value, best=best, evals_without_improvement=bad)
        best, bad = d.best, d.evals_without_improvement
        improved.append(d.improved)
        assert d.save  # every evaluation is saved, so that the best can be copied
    assert (improved, best, bad) == ([True, False, True], 0.6, 0)
    # min (a loss): 2.0 -> 1.5 improves, 1.7 does not
    d = _decide(2, value=1.5, best=2.0, mode="min")
    assert d.improved and d.best == 1.5
    d = _decide(2, value=1.7, best=1.5, mode="min")
    assert not d.improved and d.best == 1.5 and d.evals_without_improvement == 1
    # NaN never wins
    d = _decide(2, value=math.nan, best=0.3)
    assert not d.improved and d.best == 0.3 and d.evals_without_improvement == 1


def test_early_stopping_after_patience_evaluations_without_improvement():
    # patience 2, best 0.5: 0.4 (1 without improvement, go on), 0.45 (2: stop)
    d1 = _decide(4, value=0.4, best=0.5, evals_without_improvement=0, patience=2)
    assert not d1.stop and d1.evals_without_improvement == 1
    d2 = _decide(6, value=0.45, best=0.5, evals_without_improvement=1, patience=2)
    assert (d2.stop, d2.save, d2.reason, d2.evals_without_improvement) == (True, True, "early_stopping", 2)
    # patience 0 never stops
    assert not _decide(6, value=0.1, best=0.5, evals_without_improvement=9, patience=0).stop


def test_time_budget_stops_and_saves_before_the_last_step_only():
    d = _decide(3, out_of_time=True)
    assert (d.stop, d.save, d.reason) == (True, True, "time_budget")
    d = _decide(10, out_of_time=True)  # spent on the last step: the run simply finished
    assert d.reason == "finished"


def test_stop_after_n_steps_of_this_invocation():
    assert not _decide(5, stop_after_steps=2, steps_this_run=1).stop
    d = _decide(6, stop_after_steps=2, steps_this_run=2)
    assert (d.stop, d.save, d.reason) == (True, True, "stop_after_steps")


def test_interrupted_on_the_last_step_is_a_finished_run():
    d = _decide(9, signal_stop=True)
    assert (d.stop, d.save, d.reason) == (True, True, "signal")
    for changes in ({"signal_stop": True}, {"stop_after_steps": 1}, {"out_of_time": True}):
        d = _decide(10, **changes)
        assert (d.stop, d.save, d.reason) == (True, True, "finished"), changes


# ------------------------------------------------------------------------------------ a whole run


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _train(tmp_path, *, steps=6, evals=None, clock=None, method="toy", identity=None, learning_rates=None, **train_changes):
    """A Linear model trained by a loop shaped like a recipe's; eval figures from ``evals`` (step -> value)."""
    train = replace(StepLoopSettings(), **{"output_dir": str(tmp_path / "run"), "resume": "auto", "save_interval": 0,
                                      "keep_last_n": 0, **train_changes})
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, 0.0, "cosine"))
    clock = clock or _Clock()
    run = Run(train, method=method, runs_root=tmp_path / "runs", total_steps=steps, best=("score", "max"),
              state={"data_position": 0}, progress=("loss",), identity=identity or {"model": "linear-3"}, clock=clock)
    run.resume(model=model, optimizer=optimizer, scheduler=scheduler)
    with run:
        for step in run.steps():
            if learning_rates is not None:
                learning_rates[step] = optimizer.param_groups[0]["lr"]
            x = torch.randn(4, 3)
            with run.timed("forward_backward"):
                loss = model(x).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            scheduler.step()
            run.state["data_position"] += 4
            run.log(step, {"loss": float(loss.detach())})
            clock.now += 1.0
            figures = run.log_eval(step, "train", {"score": evals[step]}) if evals and step in evals else None
            if run.end_of_step(step, figures):
                break
    return run, run.finish(), model


def _steps(run_dir) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


def test_a_run_stops_resumes_and_ends_exactly_like_a_straight_one(tmp_path):
    straight, summary, model_a = _train(tmp_path / "a")
    assert summary["finished"] and summary["step"] == 6 and _steps(tmp_path / "a" / "run") == [6]
    records = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["memory/rss_mb"] > 0 and r["memory/peak_rss_mb"] > 0 for r in records)  # every method logs them
    assert all(r["time/step"] >= r["time/forward_backward"] >= 0 and "time/other" in r for r in records)

    first, summary, _ = _train(tmp_path / "b", stop_after_steps=4)
    assert not summary["finished"] and summary["step"] == 4 and _steps(tmp_path / "b" / "run") == [4]
    second, summary, model_b = _train(tmp_path / "b")
    assert summary["finished"] and second.state["data_position"] == 24
    a = [json.loads(line)["loss"] for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line)["loss"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert a == b
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))


def test_keep_best_and_early_stopping_in_a_run(tmp_path):
    # evaluations at steps 2, 4, 6: 0.5 (best), 0.3, 0.2 -> patience 2 stops at step 6 of 10
    run, summary, _ = _train(tmp_path, steps=10, evals={2: 0.5, 4: 0.3, 6: 0.2}, early_stopping_patience=2)
    assert summary["finished"] and summary["step"] == 6 and run.state["early_stopped"]
    assert _steps(tmp_path / "run") == [2, 4, 6]
    assert run.evaluation_at(6) == {"score": 0.2} and run.evaluation_at(5) is None
    best = json.loads((tmp_path / "run" / "checkpoints" / "best" / "best.json").read_text())
    assert (best["metric"], best["value"], best["checkpoint"]) == ("score", 0.5, "step-000002")
    # a resumed early-stopped run has nothing left to do
    again, summary, _ = _train(tmp_path, steps=10, evals={2: 0.5, 4: 0.3, 6: 0.2}, early_stopping_patience=2)
    assert summary["finished"] and summary["step"] == 6


def test_time_budget_in_a_run(tmp_path):
    # the fake clock advances 1 s per step: a 3 s budget stops after step 3, saved
    run, summary, _ = _train(tmp_path, max_seconds=3.0)
    assert (summary["step"], summary["out_of_time"], summary["finished"]) == (3, True, False)
    assert _steps(tmp_path / "run") == [3]


def test_planned_steps_by_hand():
    # 3 steps in 30 s of a 100 s budget at 10 s a step: 7 more fit
    assert planned_steps(3, spent_s=30.0, budget_s=100.0, step_s=10.0, most=120) == 10
    assert planned_steps(3, spent_s=30.0, budget_s=100.0, step_s=10.0, most=8) == 8  # never past train.steps
    assert planned_steps(3, spent_s=30.0, budget_s=35.0, step_s=10.0, most=120) == 3  # 5 s left: none more
    assert planned_steps(5, spent_s=50.0, budget_s=40.0, step_s=10.0, most=120) == 5  # spent: stop now


def test_a_time_budget_fits_the_steps_and_the_schedule_and_a_resume_keeps_them(tmp_path):
    # 1 s a step (the fake clock), 20 steps asked, 8 s of budget: after 3 steps the run plans 8, its cosine
    # schedule fitted to 8 updates (lr 0.1 at update 0 down to 0 after the 8th)
    rates: dict[int, float] = {}
    run, summary, _ = _train(tmp_path / "a", steps=20, time_budget_s=8.0, learning_rates=rates)
    assert (summary["step"], summary["finished"], run.total_steps) == (8, True, 8)
    records = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["budget/planned_steps"] for r in records] == [20, 20, 20, 8, 8, 8, 8, 8]
    fitted = lr_lambda(8, 0.0, "cosine")
    assert rates[4] == pytest.approx(0.1 * fitted(3)) and rates[8] == pytest.approx(0.1 * fitted(7))
    # stopped after 5 steps and resumed: the plan, the schedule and the seconds spent come back with the checkpoint
    resumed_rates: dict[int, float] = {}
    _train(tmp_path / "b", steps=20, time_budget_s=8.0, stop_after_steps=5, learning_rates=resumed_rates)
    second, summary, _ = _train(tmp_path / "b", steps=20, time_budget_s=8.0, learning_rates=resumed_rates)
    assert (summary["step"], second.total_steps, second.state["budget_spent_s"]) == (8, 8, 8.0)
    assert resumed_rates == pytest.approx(rates)


def test_a_best_metric_the_method_does_not_report_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="train.best_metric='score' is not a figure toy evaluates; use one of loss"):
        train = replace(StepLoopSettings(), output_dir=str(tmp_path / "run"))
        run = Run(train, method="toy", runs_root=tmp_path, total_steps=2, best=("score", "max"))
        run.resume(model=torch.nn.Linear(1, 1))
        with run:
            run.log(1, {"loss": 1.0})
            run.end_of_step(1, {"loss": 1.0})


def test_evaluations_due_by_interval_and_by_epoch(tmp_path):
    train = replace(StepLoopSettings(), output_dir=str(tmp_path / "run"), eval_interval=3)
    run = Run(train, method="toy", runs_root=tmp_path, total_steps=10, best=("score", "max"))
    assert [s for s in range(1, 11) if run.eval_due(s)] == [3, 6, 9]
    # epochs of 4 steps: their ends (4, 8), the last step (10) and the interval
    assert [s for s in range(1, 11) if run.eval_due(s, epoch_steps=4)] == [3, 4, 6, 8, 9, 10]


def test_a_step_must_be_logged(tmp_path):
    train = replace(StepLoopSettings(), output_dir=str(tmp_path / "run"))
    run = Run(train, method="toy", runs_root=tmp_path, total_steps=3, best=("score", "max"))
    with pytest.raises(RuntimeError, match="step 1 of toy ended without run.log"):
        with run:
            for _ in run.steps():
                pass


def test_one_run_per_folder_and_a_killed_holder_leaves_no_lock(tmp_path):
    import subprocess
    import sys
    import time

    from palaestra.recipes.run import lock_run_folder

    held = lock_run_folder(tmp_path)
    with pytest.raises(ConfigError, match=rf"run folder {tmp_path} is in use by process \d+; wait for that run to end"):
        lock_run_folder(tmp_path)
    held.close()
    lock_run_folder(tmp_path).close()  # let go: free again

    # a holder killed with SIGKILL (no cleanup at all) does not keep the folder
    code = ("import sys, time; from palaestra.recipes.run import lock_run_folder; h = lock_run_folder(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"in use by process {holder.pid}"):
        lock_run_folder(tmp_path)
    holder.kill()
    holder.wait(timeout=10)
    time.sleep(0.1)
    lock_run_folder(tmp_path).close()


def test_a_checkpoint_of_another_method_or_model_is_refused_by_name(tmp_path):
    _train(tmp_path, steps=4, save_interval=2)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["identity"] == {"method": "toy", "model": "linear-3"}
    more = dict(steps=6, save_interval=2)
    with pytest.raises(ConfigError, match=r"belongs to another run \(method 'toy' there, 'sft' here\); resume it with"):
        _train(tmp_path, method="sft", **more)
    with pytest.raises(ConfigError, match="model 'linear-3' there, 'linear-4' here"):
        _train(tmp_path, identity={"model": "linear-4"}, **more)
    run, summary, _ = _train(tmp_path, **more)  # the same settings go on
    assert summary["finished"] and run.resume_from.name == "step-000004"


def test_resuming_a_checkpoint_keeps_its_own_run_folder(tmp_path):
    from palaestra.recipes.run import resolve_run_dir

    _train(tmp_path, steps=2, save_interval=2)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    train = replace(StepLoopSettings(), resume=str(checkpoint), output_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match=f"goes on in its own run folder {tmp_path / 'run'}, not train.output_dir="):
        resolve_run_dir(train, tmp_path / "runs")
    assert resolve_run_dir(replace(train, output_dir=None), tmp_path / "runs") == (tmp_path / "run", checkpoint)


@pytest.mark.parametrize("damage", ["truncated weights", "empty optimizer", "broken state"])
def test_a_corrupt_checkpoint_is_named_and_auto_resume_takes_the_one_before(tmp_path, damage):
    _train(tmp_path, steps=4, save_interval=2)
    latest = tmp_path / "run" / "checkpoints" / "step-000004"
    file = {"truncated weights": "trainable.safetensors", "empty optimizer": "optimizer.pt",
            "broken state": "trainer_state.json"}[damage]
    (latest / file).write_bytes((latest / file).read_bytes()[:10] if damage != "empty optimizer" else b"")
    run, summary, _ = _train(tmp_path, steps=6, save_interval=2)  # resume=auto: a warning, then step 2's checkpoint
    assert run.resume_from.name == "step-000002" and summary["finished"]
    records = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records == [1, 2, 3, 4, 3, 4, 5, 6]  # steps 3 and 4 trained again from step 2

    from palaestra import checkpoint as ckpt

    (latest / file).write_bytes(b"")  # a chosen checkpoint has no fallback: one line naming the file
    model = torch.nn.Linear(3, 1)
    run = Run(replace(StepLoopSettings(), resume=str(latest)), method="toy", runs_root=tmp_path, total_steps=6,
              best=("score", "max"), identity={"model": "linear-3"})
    with pytest.raises(ConfigError, match=rf"checkpoint file {latest / file} is corrupt \(.*\); resume from another"):
        run.resume(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert issubclass(ckpt.CorruptCheckpoint, ValueError)
