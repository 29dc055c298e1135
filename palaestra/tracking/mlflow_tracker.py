"""Experiment tracking with MLflow: one `MlflowTracker` per training run.

By default everything stays on the local disk, with no server to start: runs go to a SQLite store
`./mlflow.db` and artifacts to `./mlartifacts` (the folder `mlflow ui` uses too). Set
`MLFLOW_TRACKING_URI` to use another store (a remote server, another database).

The tracker talks to MLflow through an `MlflowClient` with an explicit run id rather than the
global `mlflow.start_run()` state, so two trackers in one process (a training run and an evaluation,
say) never write into each other's run. Passing `run_id` resumes that run: metrics continue at
later steps and parameters that were already logged are left alone.

The first use of a new SQLite store runs MLflow's database migrations, which takes several seconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

__all__ = ["MlflowTracker", "TrackingError", "default_tracking_uri", "flatten_config"]

log = logging.getLogger(__name__)

# MLflow announces every schema migration of a new SQLite store at INFO level (a dozen lines);
# we say it once ourselves instead.
for _name in ("alembic", "mlflow.store.db.utils"):
    logging.getLogger(_name).setLevel(logging.WARNING)

_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Characters MLflow accepts in metric and param names (colons are refused on Windows, so not kept).
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- ]")


class TrackingError(RuntimeError):
    """An MLflow write or read failed; the message says which call, which run and which store."""


def default_tracking_uri(root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the SQLite store `<root or cwd>/mlflow.db` (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = (Path(root) if root is not None else Path.cwd()).resolve() / "mlflow.db"
    return f"sqlite:///{db}"


def _sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI; None for other stores and in-memory SQLite."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store live next to it in `mlartifacts/`; servers choose their own."""
    db = _sqlite_path(tracking_uri)
    if db is None:
        return None
    folder = db.parent / "mlartifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()


def _clean_name(name: str) -> str:
    """A metric/param name MLflow accepts: odd characters -> `_`, no empty or `..` path parts.

    >>> _clean_name("reward/pass@1 (mean)")
    'reward/pass_1 _mean_'
    """
    name = _BAD_NAME_CHARS.sub("_", str(name))
    # MLflow also refuses names that a file system would normalise ("a//b", "/a", "a/./b").
    parts = [p if p not in (".", "..") else "_" for p in name.split("/") if p]
    return "/".join(parts)[:MAX_ENTITY_KEY_LENGTH] or "_"


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> flat `{"a.b.c": "value"}` with string values (lists kept as their str).

    >>> flatten_config({"algo": {"lr": 1e-5, "betas": [0.9, 0.99]}, "seed": 0})
    {'algo.lr': '1e-05', 'algo.betas': '[0.9, 0.99]', 'seed': '0'}
    """
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class MlflowTracker:
    """One MLflow run: create (or resume with `run_id`) and log params, metrics and artifacts.

    Every MLflow failure is raised as a `TrackingError` naming the call, run and store, so a broken
    store stops training with a readable message instead of a deep MLflow traceback.
    """

    def __init__(
        self,
        experiment: str,
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        root: Path | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri or default_tracking_uri(root)
        self.run_id = run_id or ""
        self._ended = False
        db = _sqlite_path(self.tracking_uri)
        if db is not None and not db.exists():
            log.info("creating the MLflow store %s (first use migrates it: a few seconds)", db)
        with self._guard("connecting to the tracking store"):
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
        if run_id:
            with self._guard("resuming the run"):
                run = self.client.get_run(run_id)
                self.experiment_id = run.info.experiment_id
                if run.info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
        else:
            with self._guard(f"creating a run in experiment {experiment!r}"):
                self.experiment_id = self._experiment_id(experiment)
                run = self.client.create_run(self.experiment_id, run_name=run_name)
                self.run_id = run.info.run_id

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            return self.client.create_experiment(
                name, artifact_location=_artifact_location(self.tracking_uri)
            )
        if exp.lifecycle_stage == "deleted":  # a deleted name cannot be created again: revive it
            self.client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            run = f"run {self.run_id}" if self.run_id else "no run yet"
            raise TrackingError(
                f"MLflow failed while {what} ({run}, store {self.tracking_uri}): "
                f"{type(e).__name__}: {e}"
            ) from e

    # ----------------------------------------------------------------------------- params, metrics
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (stringified, truncated to MLflow's limit); keys already on the run are kept.

        MLflow refuses to change a logged param, so on resume we skip keys that are present and
        warn when the new value differs.
        """
        with self._guard("logging params"):
            existing = self.client.get_run(self.run_id).data.params
            new = []
            for key, value in params.items():
                key, value = _clean_name(key), str(value)[:MAX_PARAM_VAL_LENGTH]
                if key in existing:
                    if existing[key] != value:
                        log.warning("param %r already logged as %r; keeping it", key, existing[key])
                    continue
                new.append(Param(key, value))
            for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=new[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) run tags."""
        items = [RunTag(str(k), str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in tags.items()]
        with self._guard("setting tags"):
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalars at `step` in one batch (`reward/pass@1` is logged as `reward/pass_1`)."""
        now = int(time.time() * 1000)
        items = [Metric(_clean_name(k), float(v), now, int(step)) for k, v in metrics.items()]
        with self._guard(f"logging metrics at step {step}"):
            for i in range(0, len(items), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])

    def log_metric_records(self, records: list[Mapping[str, Any]]) -> None:
        """Log several steps' metrics in as few batches as MLflow allows; each record is
        ``{"metrics": {name: value}, "step": int, "time": ms}`` (a record sent again is the same metric)."""
        items = [Metric(_clean_name(k), float(v), int(r["time"]), int(r["step"])) for r in records for k, v in r["metrics"].items()]
        steps = f"{records[0]['step']}-{records[-1]['step']}" if records else "-"
        with self._guard(f"logging metrics of steps {steps}"):
            for i in range(0, len(items), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])

    # ----------------------------------------------------------------------------------- artifacts
    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Write rows (e.g. sampled completions) as a JSON table artifact, in MLflow's table layout
        (``{"columns": [...], "data": [[...], ...]}``); logging the same file again replaces it.

        Not ``MlflowClient.log_table``: it lists every table of a run in one tag, which MLflow cuts at
        8000 characters, so a long run's table number 150 or so fails for ever after.
        """
        columns = list(dict.fromkeys(key for row in rows for key in row))  # all columns, first-seen order
        table = {"columns": columns, "data": [[row.get(key) for key in columns] for row in rows]}  # a missing cell -> None
        with self._guard(f"logging table {artifact_file}"), tempfile.TemporaryDirectory() as folder:
            if not artifact_file.endswith(".json"):
                raise ValueError(f"a table is written as JSON: name it <name>.json, not {artifact_file!r}")
            path = Path(folder) / Path(artifact_file).name
            path.write_text(json.dumps(table, default=str))
            self.client.log_artifact(self.run_id, str(path), str(Path(artifact_file).parent).strip(".") or None)

    def log_text(self, text: str, artifact_file: str) -> None:
        with self._guard(f"logging text {artifact_file}"):
            self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        """Log a dict as JSON, or YAML when `artifact_file` ends in .yaml/.yml."""
        with self._guard(f"logging dict {artifact_file}"):
            self.client.log_dict(self.run_id, dict(d), artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        with self._guard(f"logging artifact {local_path}"):
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Log the contents of a folder (e.g. a model folder as the run's `model` artifact)."""
        with self._guard(f"logging artifacts {local_dir}"):
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        """Log a matplotlib figure as an image (e.g. `curves/reward.png`)."""
        with self._guard(f"logging figure {artifact_file}"):
            self.client.log_figure(self.run_id, fig, artifact_file)

    # --------------------------------------------------------------------------------- lifecycle
    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED; later calls do nothing."""
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        if self._ended:
            return
        with self._guard(f"ending the run as {status}"):
            self.client.set_terminated(self.run_id, status=status)
        self._ended = True

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is KeyboardInterrupt:
            self.end("KILLED")
        else:
            self.end("FAILED" if exc_type else "FINISHED")

    def run_url_hint(self) -> str:
        """One line telling the user how to look at this run."""
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"open {self.tracking_uri.rstrip('/')}/{page}"
        store = shlex.quote(self.tracking_uri)
        return (f"view the run: mlflow ui --backend-store-uri {store}  "
                f"then open http://127.0.0.1:5000/{page}")
