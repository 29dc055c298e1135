"""The run around a recipe's loop, in one component every recipe *calls* (not a base class).

A recipe keeps its own steps in plain view and hands the rest to a :class:`Run`::

    run = Run(config.train, method="grpo", runs_root=Path("runs") / "chain_sum-grpo", total_steps=50,
              best=("accuracy", "max"), dist=dist, progress=("reward/mean",), curves=("reward/mean",))
    run.resume(model=model, optimizer=optimizer, scheduler=scheduler)   # the latest checkpoint, if any
    run.track(config.tracking, run_name="...", tags={...}, config=config_dict(config))
    with run:                                                           # signals, progress bar, final status on errors
        for step in run.steps():
            ...                                                         # 1. roll out, 2. score, ... (the recipe's own)
            run.log(step, metrics)                                      # metrics.jsonl, MLflow, train.log, progress bar
            figures = run.log_eval(step, "train", evaluate(...)) if run.eval_due(step) else None
            if run.end_of_step(step, figures):                          # save / keep-best / early stop / budget / signals
                break
    results = run.finish()                                              # plots, train.log artifact, FINISHED or KILLED

What the run owns: the run folder (locked: one process writes it at a time) and its ``train.log``
(``train.output_dir`` or a new timestamped folder; ``train.resume``), the checkpoint (written by
:func:`palaestra.checkpoint.save_checkpoint` from :meth:`Run.end_of_step`; it records what it belongs
to, and a resume with other settings is refused), the MLflow run (resumed with the checkpoint),
SIGUSR1 (save at the next step boundary) and SIGINT/SIGTERM (save and stop there), the progress
bar, the per-step figures (plus ``memory/rss_mb`` and ``memory/peak_rss_mb``), and the decision
after every step, which :func:`decide` makes from plain numbers so that it is tested by hand.
Several processes (:class:`palaestra.distributed.Distributed`) agree on every decision; only the
main one writes, but for a sharded model's checkpoint (``train.strategy=fsdp``), to which every
process writes its shards.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from palaestra import checkpoint as ckpt
from palaestra.config.errors import ConfigError
from palaestra.distributed import Distributed
from palaestra.optim import fit_schedule
from palaestra.runtime import timed

log = logging.getLogger("palaestra")

__all__ = ["CALIBRATION_STEPS", "Decision", "Run", "config_dict", "decide", "planned_steps"]

_SHORT = {"tokens_per_second": "tok/s", "documents_per_second": "docs/s"}
"""Progress-bar names of long figure names (the others: "reward/mean" -> "reward_mean")."""


@dataclass(frozen=True)
class Decision:
    """What happens after a step."""

    save: bool
    """Write a checkpoint of this step."""
    stop: bool
    """Leave the loop after this step."""
    reason: str
    """Why it stops: finished, early_stopping, signal, time_budget, stop_after_steps ("" when it goes on)."""
    improved: bool
    """This step's evaluation is the best so far (keep-best copies its checkpoint)."""
    best: float | None
    """The best evaluation so far."""
    evals_without_improvement: int
    """Evaluations since the best one (early stopping counts them)."""


def decide(
    step: int, *, total_steps: int, save_interval: int, value: float | None, best: float | None, mode: str,
    evals_without_improvement: int, patience: int, steps_this_run: int, stop_after_steps: int, out_of_time: bool,
    signal_stop: bool, signal_save: bool,
) -> Decision:
    """The end-of-step decision, from plain numbers.

    ``value`` is this step's evaluation of the best metric (None: no evaluation this step); it
    improves on ``best`` when higher (``mode="max"``) or lower (``"min"``); NaN never improves.
    A checkpoint is written every ``save_interval`` steps, on SIGUSR1 (``signal_save``), after every
    evaluation (so that keep-best can copy it), at the last step and whenever the loop stops. The
    loop stops at the last step, after ``patience`` evaluations without improvement, and, before the
    last step only (after it there is nothing left to interrupt, and the run counts as finished),
    on SIGINT/SIGTERM (``signal_stop``), a spent time budget or ``stop_after_steps`` steps of this
    invocation.
    """
    improved = False
    if value is not None:
        better = best is None or (value > best if mode == "max" else value < best)
        if not math.isnan(value) and better:
            best, evals_without_improvement, improved = value, 0, True
        else:
            evals_without_improvement += 1
    last = step >= total_steps
    more = not last
    reasons = {
        "finished": last,
        "early_stopping": bool(patience) and evals_without_improvement >= patience,
        "signal": more and signal_stop,
        "time_budget": more and out_of_time,
        "stop_after_steps": more and bool(stop_after_steps) and steps_this_run >= stop_after_steps,
    }
    reason = next((name for name, due in reasons.items() if due), "")
    interval = bool(save_interval) and step % save_interval == 0
    save = bool(reason) or interval or signal_save or value is not None
    return Decision(save, bool(reason), reason, improved, best, evals_without_improvement)


CALIBRATION_STEPS = 3
"""Steps an invocation runs before ``train.time_budget_s`` fits the step count (the first, which warms up, is not
counted in the time per step)."""


def planned_steps(step: int, *, spent_s: float, budget_s: float, step_s: float, most: int) -> int:
    """The step a run with a time budget ends at: after ``step`` steps that took ``spent_s`` seconds, as many more
    steps of ``step_s`` seconds as the rest of ``budget_s`` holds, at most ``most`` in all (and never before
    ``step``: a spent budget ends the run now).

    >>> planned_steps(3, spent_s=30.0, budget_s=100.0, step_s=10.0, most=120)  # 70 s left: 7 more steps
    10
    >>> planned_steps(3, spent_s=30.0, budget_s=100.0, step_s=0.5, most=120)   # fast: all 120 fit
    120
    >>> planned_steps(12, spent_s=130.0, budget_s=100.0, step_s=10.0, most=120)  # over budget: stop at once
    12
    """
    if step_s <= 0:
        return most
    return max(step, min(most, step + int((budget_s - spent_s) // step_s)))


def config_dict(config) -> dict:
    """The resolved config as plain containers (MLflow params and the config.yaml artifact): every key the
    method reads, which is every key of its schema."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


class Run:
    """One training run's bookkeeping; see the module docstring for how a recipe uses it.

    Args:
        train: the ``train`` config section (run folder, resume, intervals, budgets, keep-best).
        method: the method's name (progress bar, log lines).
        runs_root: where a new run folder goes (``runs_root/<timestamp>``) unless ``train.output_dir`` says.
        total_steps: the step the run ends at.
        best: ``(figure, mode)``: the evaluation figure keep-best and early stopping follow, and ``max``
            (higher is better) or ``min`` (see :func:`palaestra.recipes.methods.best_metric`).
        patience: evaluations without improvement before early stopping (default ``train.early_stopping_patience``).
        dist: this process's place among several (default: a single process).
        state: the recipe's own entries of the trainer state (data position, ...), saved in every checkpoint.
        progress: per-step figures shown in the progress bar.
        curves: per-step figures kept for the run's plot (evaluation figures are always kept).
        plot: ``(file name, title)`` of the plot logged at the end (None: no plot).
        identity: what the checkpoints belong to besides the method (base model, adapter shape, ...):
            saved in each one; resuming a checkpoint whose identity differs is a one-line ConfigError.
        clock: seconds, for the time budgets (tests pass a fake one).
    """

    def __init__(
        self, train, *, method: str, runs_root: Path, total_steps: int, best: tuple[str, str],
        patience: int | None = None, dist: Distributed | None = None, state: dict | None = None,
        progress: tuple[str, ...] = (), curves: tuple[str, ...] = (), plot: tuple[str, str] | None = None,
        identity: dict | None = None, clock: Callable[[], float] = time.perf_counter,
    ):
        self.best_metric, self.best_mode = best
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"the best mode must be max or min, got {self.best_mode!r}")
        self.train, self.method, self.total_steps = train, method, total_steps
        # a step loop's train section has its evaluation interval and patience; epoch methods pass theirs
        self.patience = getattr(train, "early_stopping_patience", 0) if patience is None else patience
        self.eval_interval = getattr(train, "eval_interval", 0)
        self.dist = dist or Distributed()
        self.progress_keys, self.curves, self.plot = tuple(progress), tuple(curves), plot
        self.clock = clock
        self.tracker = None
        self.out_of_time = False
        self.steps_this_run = 0
        self.rng_restored = False
        self._checkpoint: dict[str, Any] = {}
        self._stop: StopSignals | None = None
        self._progress = None
        self._started = clock()
        self._step_started = time.perf_counter()
        self._step_clock = clock()
        self._most_steps = total_steps  # what a time budget may fit the run's steps down to
        self._step_seconds: list[float] = []  # this invocation's steps, for the time budget
        self.timings: dict[str, float] = {}
        """Where the current step's time goes, in seconds (``time/<name>``; ``time/other`` is the rest)."""

        # the run folder (every process agrees on the main process's) and its train.log
        self.run_dir, self.resume_from = self.dist.broadcast(resolve_run_dir(train, Path(runs_root)))
        self._lock = None
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock = lock_run_folder(self.run_dir)  # one run per folder (ConfigError if another holds it)
            attach_log_file(self.run_dir / "train.log")
        self.dist.barrier()
        self.identity = {"method": method, **{key: str(value) for key, value in (identity or {}).items()}}
        self.state: dict[str, Any] = {"step": 0, "mlflow_run_id": None, "best_metric": None, "evals_without_improvement": 0,
                                      "early_stopped": False, "last_eval": None, "history": {}, "identity": self.identity,
                                      "budget_spent_s": 0.0, "planned_steps": None,
                                      **(state or {})}

    # ------------------------------------------------------------------------------------ opening

    @property
    def step(self) -> int:
        """The last step done (0 before the first)."""
        return self.state["step"]

    def resume(self, *, model=None, optimizer=None, scheduler=None, parts: dict | None = None) -> bool:
        """Say what a checkpoint holds (a model with its optimizer and scheduler, or ``parts``) and, when
        the run resumes, load the checkpoint into it, the trainer state and this process's random states;
        True when it resumed. ``rng_restored`` is False after a resume when the checkpoint holds no random
        states for this process (it was written by fewer processes): the recipe seeds it afresh."""
        self._checkpoint = {"parts": parts} if parts is not None else {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        if self.resume_from is None:
            return False
        # with resume=auto a corrupt checkpoint gives way to the one before it; a chosen one must load
        candidates = [self.resume_from, *(ckpt.earlier_checkpoints(self.resume_from) if self.train.resume == "auto" else [])]
        for position, checkpoint in enumerate(candidates):
            try:
                self._check_identity(checkpoint)
                loaded = ckpt.load_checkpoint(checkpoint, restore_rng=False, **self._checkpoint)
                self.rng_restored = ckpt.restore_rank_rng(checkpoint, self.dist.rank)
            except ckpt.CorruptCheckpoint as error:
                if position + 1 == len(candidates):
                    raise ConfigError(f"{error}; resume from another checkpoint (train.resume=<path>) or remove this one") from None
                log.warning("%s; resuming from the checkpoint before it, %s", error, candidates[position + 1])
                continue
            self.resume_from = checkpoint
            self.state.update(loaded)
            if self.state.get("planned_steps"):  # a time budget had fitted the steps (the schedule's state has them)
                self.total_steps = self.state["planned_steps"]
            log.info("resumed from %s at step %d", checkpoint, self.state["step"])
            return True
        return False

    def _check_identity(self, checkpoint: Path) -> None:
        """A checkpoint of another method, base model or adapter shape is refused before anything is loaded into the model."""
        saved = ckpt.read_trainer_state(checkpoint).get("identity")
        if not saved:  # written before checkpoints recorded what they belong to
            return
        differences = [f"{key} {saved.get(key)!r} there, {self.identity.get(key)!r} here"
                       for key in dict.fromkeys([*saved, *self.identity]) if saved.get(key) != self.identity.get(key)]
        if differences:
            raise ConfigError(f"train.resume: {checkpoint} belongs to another run ({'; '.join(differences)}); resume it "
                              "with the settings it was trained with, or start a new run without train.resume")

    def track(self, tracking, *, run_name: str, tags: dict, config: dict, params: dict | None = None):
        """Start the MLflow run (the main process only; the run folder's MLflow run continues on resume).

        A new run gets ``params`` (default: the whole ``config``, flattened), ``tags`` plus ``run_dir``
        (and ``mlflow.parentRunId`` under a pipeline) and ``config`` as the artifact ``config.yaml``.
        The writes go through the run folder's journal (``tracking/``), so a store that is away never
        stops training (:class:`palaestra.tracking.BufferedTracker`). Returns the tracker (None: tracking off).
        """
        from palaestra.tracking import BufferedTracker, flatten_config

        if tracking.enabled and self.dist.is_main:
            self.tracker = BufferedTracker(self.run_dir / "tracking", tracking.experiment, run_name=tracking.run_name or run_name,
                                           run_id=self.state["mlflow_run_id"], tracking_uri=tracking.tracking_uri,
                                           required=tracking.required, loggers=tracking.loggers,
                                           logger_options={"wandb": {"project": tracking.wandb_project,
                                                                     "run_name": tracking.wandb_run_name}})
            if not self.tracker.resumed:
                self.tracker.log_params(flatten_config(config) if params is None else params)
                tags = {**tags, "run_dir": str(self.run_dir.resolve())}
                if tracking.parent_run_id:
                    tags["mlflow.parentRunId"] = tracking.parent_run_id  # shows as a child run in the UI
                self.tracker.set_tags(tags)
                self.tracker.log_dict(config, "config.yaml")
        self.state["mlflow_run_id"] = (self.tracker.run_id or None) if self.tracker else None
        return self.tracker

    def __enter__(self) -> Run:
        self._stop = StopSignals()
        self._progress = tqdm(total=self.total_steps, initial=self.step, desc=self.method, dynamic_ncols=True,
                              disable=not self.dist.is_main)
        self._started = self.clock()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None and self.tracker:
                self.tracker.end("KILLED" if self._stop.requested or exc_type is KeyboardInterrupt else "FAILED")
        finally:
            self._progress.close()
            self._stop.restore()
            if exc_type is not None:
                self.release()
        return False

    def release(self) -> None:
        """Let go of the run folder (another process may write it now); :meth:`finish` does it too."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ------------------------------------------------------------------------------------- the loop

    def steps(self):
        """The steps still to do, in order (``for step in run.steps():``); each ends with :meth:`log`."""
        while self.more():
            step = self.step + 1
            self._step_started = time.perf_counter()
            self._step_clock = self.clock()
            self.timings = {}
            yield step
            if self.step != step:
                raise RuntimeError(f"step {step} of {self.method} ended without run.log(step, ...)")

    def timed(self, name: str):
        """``with run.timed("generation"):`` adds the block's wall time to this step's ``time/<name>``."""
        return timed(self.timings, name)

    def step_seconds(self) -> float:
        """Wall time of the current step so far."""
        return time.perf_counter() - self._step_started

    def more(self) -> bool:
        """True while steps remain and nothing asked the run to stop."""
        stopped = self._stop is not None and self._stop.requested
        return self.step < self.total_steps and not stopped and not self.state["early_stopped"]

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Mark ``step`` done and record its figures (plus this process's memory): metrics.jsonl,
        MLflow, a train.log line and the progress bar, with its time (``time/step`` and the
        :meth:`timed` parts) and this process's memory. Returns the figures as logged."""
        self.state["step"] = step
        seconds = self.step_seconds()
        times = {"step": seconds, **self.timings, **({"other": seconds - sum(self.timings.values())} if self.timings else {})}
        metrics = {**metrics, **{f"time/{k}": v for k, v in times.items()}, **memory_figures()}
        if getattr(self.train, "time_budget_s", 0.0):
            metrics["budget/planned_steps"] = float(self.total_steps)
        remember(self.state, {k: metrics[k] for k in self.curves if k in metrics}, step)
        if self.dist.is_main:
            append_jsonl(self.run_dir / "metrics.jsonl", {"step": step, **metrics})
        log.info("step %d: %s", step, fmt(metrics), extra={"console": False})
        if self.tracker:
            self.tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)
            self.state["mlflow_run_id"] = self.tracker.run_id or None  # known once the store has answered
        self._progress.update(1)
        shown = {_SHORT.get(k, k.replace("/", "_")): f"{metrics[k]:.4g}" for k in self.progress_keys if k in metrics}
        self._progress.set_postfix(shown)
        return metrics

    def record(self, entry: dict) -> None:
        """Append one more record to metrics.jsonl (e.g. an epoch's figures)."""
        if self.dist.is_main:
            append_jsonl(self.run_dir / "metrics.jsonl", entry)

    def eval_due(self, step: int, epoch_steps: int = 0) -> bool:
        """True every ``train.eval_interval`` steps, and with ``epoch_steps`` at the end of every epoch
        of that many steps and at the last step."""
        interval = bool(self.eval_interval) and step % self.eval_interval == 0
        epoch_end = bool(epoch_steps) and (step % epoch_steps == 0 or step == self.total_steps)
        return interval or epoch_end

    def evaluation_at(self, step: int) -> dict | None:
        """The figures of the evaluation logged at ``step`` if it was the last one (before a resume too), else None."""
        last = self.state.get("last_eval")
        return last["figures"] if last and last["step"] == step else None

    def log_eval(self, step: int, label: str, figures: dict | None) -> dict | None:
        """Record an evaluation's figures (``eval/<name>`` in MLflow and the plot); returns them."""
        if figures is None:
            return None
        log.info("eval (%s, step %d): %s", label, step, fmt(figures))
        self.state["last_eval"] = {"step": step, "figures": figures}
        remember(self.state, {f"eval/{k}": v for k, v in figures.items()}, step)
        if self.tracker:
            self.tracker.log_metrics({f"eval/{k}": v for k, v in figures.items()}, step=step)
        return figures

    def end_of_step(self, step: int, figures: dict | None = None) -> bool:
        """Decide after ``step`` (``figures``: its evaluation, if any): save, keep the best, stop.

        Returns True when the loop should stop now (the checkpoint is written by then).
        """
        self.steps_this_run += 1
        value = None
        if figures is not None:
            if self.best_metric not in figures:
                raise ConfigError(f"train.best_metric={self.best_metric!r} is not a figure {self.method} evaluates; "
                                  f"use one of {', '.join(figures)}")
            value = float(figures[self.best_metric])
        dist, train = self.dist, self.train
        self._fit_to_time_budget(step)
        value = dist.broadcast(value)  # evaluations run on the main process
        out_of_time = dist.any(bool(train.max_seconds) and self.clock() - self._started >= train.max_seconds)
        decision = decide(
            step, total_steps=self.total_steps, save_interval=train.save_interval, value=value,
            best=self.state["best_metric"], mode=self.best_mode,
            evals_without_improvement=self.state["evals_without_improvement"], patience=self.patience,
            steps_this_run=self.steps_this_run, stop_after_steps=train.stop_after_steps, out_of_time=out_of_time,
            signal_stop=dist.any(self._stop.requested), signal_save=dist.any(self._stop.save_requested),
        )
        self.state["best_metric"] = decision.best
        self.state["evals_without_improvement"] = decision.evals_without_improvement
        self.state["early_stopped"] = decision.reason == "early_stopping"
        self.out_of_time = decision.reason == "time_budget"
        if decision.save:
            self._stop.save_requested = False
            rng_states = dist.gather_objects([ckpt.rng_state()]) if dist.enabled else None  # every process's
            saving = dict(trainer_state=self.state, rank_rng_states=rng_states, keep_last_n=train.keep_last_n or None,
                          **self._checkpoint)
            if self._sharded:  # every process writes its shards
                path = ckpt.save_sharded_checkpoint(self.run_dir, step, dist=dist, **saving)
            elif dist.is_main:
                path = ckpt.save_checkpoint(self.run_dir, step, **saving)
            if dist.is_main and decision.improved and train.save_best:
                ckpt.save_best(self.run_dir, path, self.best_metric, decision.best, mode=self.best_mode)
            dist.barrier()
        if decision.reason == "early_stopping":
            log.info("early stopping at step %d: no better %s in %d evaluations", step, self.best_metric,
                     decision.evals_without_improvement)
        elif decision.stop and decision.reason != "finished":
            log.info("stopping at step %d (%s; checkpoint saved); resume with train.resume=auto train.output_dir=%s",
                     step, decision.reason.replace("_", " "), self.run_dir)
        return decision.stop

    def _fit_to_time_budget(self, step: int) -> None:
        """With ``train.time_budget_s``: once this invocation has run :data:`CALIBRATION_STEPS` steps, and after
        every step from then on, the run's last step becomes the one the budget reaches at the measured time per
        step (:func:`planned_steps`; at most the configured steps), and the learning-rate schedule is fitted to
        it: the run does the work this machine does in the budget, its schedule complete. The seconds spent are
        kept in the checkpoint, so a resumed run spends what is left."""
        seconds = self.clock() - self._step_clock  # the step, its evaluation included
        self.state["budget_spent_s"] = self.state.get("budget_spent_s", 0.0) + seconds
        self._step_seconds.append(seconds)
        budget = getattr(self.train, "time_budget_s", 0.0)
        if not budget or len(self._step_seconds) < CALIBRATION_STEPS:
            return
        step_s = sum(self._step_seconds[1:]) / (len(self._step_seconds) - 1)
        planned = int(self.dist.broadcast(planned_steps(step, spent_s=self.state["budget_spent_s"], budget_s=budget,
                                                         step_s=step_s, most=self._most_steps)))
        if planned == self.total_steps:
            return
        if self.state.get("planned_steps") is None:
            log.info("train.time_budget_s=%g: a step takes %.1f s here; the run trains %d of %d steps, its "
                     "learning-rate schedule fitted to them (train.time_budget_s=0 runs them all)",
                     budget, step_s, planned, self._most_steps)
        for scheduler in self._schedulers():
            fit_schedule(scheduler, self.total_steps, planned)
        self.total_steps = self.state["planned_steps"] = planned
        if self._progress is not None:
            self._progress.total = planned
            self._progress.refresh()

    def _schedulers(self) -> list:
        """The learning-rate schedulers the checkpoint holds (the model's, or each part's)."""
        if "parts" in self._checkpoint:
            found = [getattr(part, "scheduler", None) for part in self._checkpoint["parts"].values()]
        else:
            found = [self._checkpoint.get("scheduler")]
        return [scheduler for scheduler in found if scheduler is not None]

    # -------------------------------------------------------------------------------------- closing

    @property
    def finished(self) -> bool:
        """The run reached its last step or stopped early (a resumed invocation has nothing left to do)."""
        return self.step >= self.total_steps or bool(self.state["early_stopped"])

    @property
    def _sharded(self) -> bool:
        """The checkpoint's model is sharded over the processes (``train.strategy=fsdp``)."""
        from palaestra.sharding import is_sharded

        return is_sharded(self._checkpoint.get("model"))

    def load_best(self, model) -> bool:
        """Put the weights of the best evaluation (``checkpoints/best``) on ``model`` when the run kept them
        (``train.save_best``); True when it did. Every process calls it when the model is sharded."""
        best = self.run_dir / "checkpoints" / "best"
        if not (self.train.save_best and (best / "trainer_state.json").is_file()):
            return False
        ckpt.load_checkpoint(best, model=model, restore_rng=False)
        return True

    @property
    def stopped_by_signal(self) -> bool:
        return self._stop is not None and self._stop.requested

    def finish(self) -> dict:
        """Log the plot and train.log, end the MLflow run (FINISHED, or KILLED when a signal stopped
        it before the end) and return the run's summary for the recipe's results (``stop_signal``:
        the signal's number when one stopped it)."""
        if self.tracker:
            curves = {k: [tuple(p) for p in v] for k, v in self.state["history"].items()
                      if k in self.curves or k == f"eval/{self.best_metric}"}
            if curves and self.plot:
                from palaestra.tracking import plot_curves

                path = plot_curves(curves, self.run_dir / self.plot[0], title=self.plot[1], smooth=5)
                self.tracker.log_artifact(str(path), "plots")
            self.tracker.log_artifact(str(self.run_dir / "train.log"))
            self.tracker.end("FINISHED" if self.finished or not self.stopped_by_signal else "KILLED")
            self.state["mlflow_run_id"] = self.tracker.run_id or None
        self.release()
        return {"run_dir": str(self.run_dir), "mlflow_run_id": self.state["mlflow_run_id"],
                "stop_signal": self._stop.received if self.stopped_by_signal else None,
                "mlflow_hint": self.tracker.run_url_hint() if self.tracker else None, "step": self.step,
                "finished": self.finished, "out_of_time": self.out_of_time, "train_seconds": self.clock() - self._started}


def remember(state: dict, figures: dict, step: int) -> None:
    """Keep curves in the trainer state so plots survive a resume."""
    for key, value in figures.items():
        state["history"].setdefault(key, []).append([step, float(value)])  # lists: JSON round-trips them


def attach_log_file(path: Path) -> None:
    """Log to train.log beside the checkpoints (appending on resume) and to the console."""
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = TqdmHandler()
    console.addFilter(lambda record: getattr(record, "console", True))  # per-step lines go to the file only
    log.addHandler(file_handler)
    log.addHandler(console)
    log.propagate = False


class TqdmHandler(logging.Handler):
    """Console lines that do not break the progress bar."""

    def emit(self, record):
        tqdm.write(self.format(record))


def append_jsonl(path: Path, record: dict) -> None:
    """A local, exact record of every step's figures beside the checkpoints."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def memory_figures() -> dict[str, float]:
    """This process's resident memory now and its peak so far, in MB (``memory/rss_mb``,
    ``memory/peak_rss_mb``): logged every step, so memory that grows with the steps shows in the run."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    try:
        with open("/proc/self/statm") as handle:
            current = int(handle.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # no /proc (macOS): the peak is the best figure there is
        current = peak
    return {"memory/rss_mb": current, "memory/peak_rss_mb": peak}


def fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


class StopSignals:
    """SIGUSR1: save a checkpoint at the next step boundary. SIGINT/SIGTERM: save and stop there.

    A second SIGINT interrupts immediately.
    """

    def __init__(self):
        self.requested = False
        self.save_requested = False
        self.received: int | None = None
        """The signal that stopped the run (SIGINT or SIGTERM), for the exit code 128 + its number."""
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, sig, frame):
        if sig == getattr(signal, "SIGUSR1", None):
            self.save_requested = True
            return
        if self.requested and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.received = self.received or int(sig)
        log.info("signal %s received: saving at the end of this step", signal.Signals(sig).name)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def lock_run_folder(run_dir: Path):
    """Hold ``run_dir/.lock`` while this process writes the run folder; returns the open lock file (close it
    to let go), or None where the system has no ``flock``.

    A second process that wants the same folder gets a one-line ConfigError at once instead of
    interleaving its train.log and metrics.jsonl with the first and pruning its checkpoints. The
    operating system drops the lock when the holder ends, however it ends, so a killed run leaves no
    stale lock behind.
    """
    try:
        import fcntl
    except ImportError:  # not a Unix system
        return None
    from palaestra.config.errors import ConfigError

    handle = open(Path(run_dir) / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"run folder {run_dir} is in use by {holder}; wait for that run to end, or give another "
                          "train.output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()}")
    handle.flush()
    return handle


def resolve_run_dir(train_cfg, runs_root: Path) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None: a fresh start).

    ``train.resume`` = a path: that checkpoint (its run folder continues; a different
    ``train.output_dir`` is a ConfigError). ``train.output_dir``:
    that folder (with ``resume=auto``, its latest checkpoint). Otherwise a new timestamped folder
    under ``runs_root``, or with ``resume=auto`` the newest run there that has a checkpoint.
    """
    from palaestra import checkpoint as ckpt

    resume = train_cfg.resume
    if resume and resume != "auto":
        checkpoint = ckpt.resolve_resume(resume, Path(resume))
        if checkpoint is not None:
            own = checkpoint.parent.parent  # a resumed run goes on in its own folder (and its own MLflow run)
            if train_cfg.output_dir and Path(train_cfg.output_dir).resolve() != own.resolve():
                from palaestra.config.errors import ConfigError

                raise ConfigError(f"train.resume={resume} goes on in its own run folder {own}, not "
                                  f"train.output_dir={train_cfg.output_dir}; drop one of the two")
            return own, checkpoint
    if train_cfg.output_dir:
        run_dir = Path(train_cfg.output_dir)
        return run_dir, ckpt.resolve_resume(resume, run_dir) if resume else None
    if resume == "auto":
        for candidate in sorted(runs_root.glob("*"), reverse=True):
            checkpoint = ckpt.latest_checkpoint(candidate)
            if checkpoint is not None:
                return candidate, checkpoint
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = runs_root / stamp
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = runs_root / f"{stamp}-{suffix}"
    return run_dir, None


def track_data_method(run, config, dataset_version: str | None = None):
    """Start the MLflow run of a method trained on the ``data`` section (reward, dpo, ppo): the planner
    contract's tags (policy_id, task, dataset_version: default the data folder's) and the whole config as params."""
    from palaestra.data.chat import dataset_version as version_of
    from palaestra.models import model_id

    data, algo = config.data, config.algo.name
    dataset_version = dataset_version or version_of(data.path, data.version)
    # the reward model is no policy: its tracking has no policy_id key, and its runs are tagged <data>-reward
    policy_id = getattr(config.tracking, "policy_id", None) or f"{data.name}-{algo}"
    tags = {"task": data.name, "algo": algo, "model": model_id(config.model.name, config.model.path),
            "dataset_version": dataset_version, "policy_id": policy_id}
    return run.track(config.tracking, run_name=f"{data.name}-{algo}-{config.model.name}", tags=tags, config=config_dict(config))
