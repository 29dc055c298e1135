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
main one writes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from palaestra import checkpoint as ckpt
from palaestra.config import ConfigError
from palaestra.distributed import Distributed
from palaestra.recipes.common import (
    StopSignals,
    append_jsonl,
    attach_log_file,
    fmt,
    lock_run_folder,
    memory_figures,
    remember,
    resolve_run_dir,
    timed,
)

log = logging.getLogger("palaestra")

__all__ = ["Decision", "Run", "config_dict", "decide"]

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


def config_dict(config) -> dict:
    """The resolved config as plain containers (MLflow params and the config.yaml artifact): what
    the method reads, without the other methods' sections (task, env, policy, data), the commands'
    (export, pipeline) and the shared keys the method ignores."""
    from omegaconf import OmegaConf

    from palaestra.recipes.methods import OPTIONAL_SECTIONS, method_of

    method = method_of(config)
    resolved = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    for key in (*OPTIONAL_SECTIONS, "export", "pipeline"):
        if key not in method.reads:
            resolved.pop(key, None)
    for ignored in method.ignores:
        *parents, leaf = ignored.split(".")
        section = resolved
        for parent in parents:
            section = section.get(parent, {}) if isinstance(section, dict) else {}
        if isinstance(section, dict):
            section.pop(leaf, None)
    return resolved


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
        clock: seconds, for the time budget (tests pass a fake one).
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
        self.patience = train.early_stopping_patience if patience is None else patience
        self.dist = dist or Distributed()
        self.progress_keys, self.curves, self.plot = tuple(progress), tuple(curves), plot
        self.clock = clock
        self.tracker = None
        self.out_of_time = False
        self.steps_this_run = 0
        self._checkpoint: dict[str, Any] = {}
        self._stop: StopSignals | None = None
        self._progress = None
        self._started = clock()
        self._step_started = time.perf_counter()
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
                                      **(state or {})}

    # ------------------------------------------------------------------------------------ opening

    @property
    def step(self) -> int:
        """The last step done (0 before the first)."""
        return self.state["step"]

    def resume(self, *, model=None, optimizer=None, scheduler=None, parts: dict | None = None, restore_rng: bool = True) -> bool:
        """Say what a checkpoint holds (a model with its optimizer and scheduler, or ``parts``) and, when
        the run resumes, load the checkpoint into it and the trainer state; True when it resumed."""
        self._checkpoint = {"parts": parts} if parts is not None else {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        if self.resume_from is None:
            return False
        # with resume=auto a corrupt checkpoint gives way to the one before it; a chosen one must load
        candidates = [self.resume_from, *(ckpt.earlier_checkpoints(self.resume_from) if self.train.resume == "auto" else [])]
        for position, checkpoint in enumerate(candidates):
            try:
                self._check_identity(checkpoint)
                loaded = ckpt.load_checkpoint(checkpoint, restore_rng=restore_rng, **self._checkpoint)
            except ckpt.CorruptCheckpoint as error:
                if position + 1 == len(candidates):
                    raise ConfigError(f"{error}; resume from another checkpoint (train.resume=<path>) or remove this one") from None
                log.warning("%s; resuming from the checkpoint before it, %s", error, candidates[position + 1])
                continue
            self.resume_from = checkpoint
            self.state.update(loaded)
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
                                           required=tracking.required)
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
        interval = bool(self.train.eval_interval) and step % self.train.eval_interval == 0
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
            if dist.is_main:
                path = ckpt.save_checkpoint(self.run_dir, step, trainer_state=self.state,
                                            keep_last_n=train.keep_last_n or None, **self._checkpoint)
                if decision.improved and train.save_best:
                    ckpt.save_best(self.run_dir, path, self.best_metric, decision.best, mode=self.best_mode)
            dist.barrier()
        if decision.reason == "early_stopping":
            log.info("early stopping at step %d: no better %s in %d evaluations", step, self.best_metric,
                     decision.evals_without_improvement)
        elif decision.stop and decision.reason != "finished":
            log.info("stopping at step %d (%s; checkpoint saved); resume with train.resume=auto train.output_dir=%s",
                     step, decision.reason.replace("_", " "), self.run_dir)
        return decision.stop

    # -------------------------------------------------------------------------------------- closing

    @property
    def finished(self) -> bool:
        """The run reached its last step or stopped early (a resumed invocation has nothing left to do)."""
        return self.step >= self.total_steps or bool(self.state["early_stopped"])

    def load_best(self, model) -> bool:
        """Put the weights of the best evaluation (``checkpoints/best``) on ``model`` when the run kept them
        (``train.save_best``); True when it did."""
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
