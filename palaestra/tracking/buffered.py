"""Tracking that never stops training: every write goes to a journal in the run folder, and a
background writer sends it to MLflow.

A training run logs through a :class:`BufferedTracker`. Each call (params, tags, metrics, tables,
artifacts, the end of the run) is appended at once to ``<run folder>/tracking/journal.jsonl`` and the
call returns; a writer thread sends the records to the store in order, several steps' metrics in one
batch, and counts what it has sent in ``tracking/sent`` (written atomically after every write). When
the store is unreachable the writer keeps the records and tries again every few seconds (one warning
when it goes away, one line when it is back), so training goes on through an outage of any length.

Nothing is lost and nothing is stored twice: a run that ends while the store is away leaves its
unsent records in the journal, and the next tracker on the same run folder (``train.resume``, also
after ``kill -9``) sends them first; metrics carry the time they were logged, so a record sent again
after a crash between the write and its count matches the stored one and MLflow keeps one copy.
The MLflow run itself is created by the writer (its id is kept in ``tracking/run.json``), so a store
that is down when the run starts costs one warning line, not the run.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["BufferedTracker", "Journal", "check_store", "fail_fast"]

log = logging.getLogger(__name__)

# The writer retries on its own; MLflow's HTTP client would otherwise retry a dead server with back-off
# for about four minutes inside one call (7 retries), and wait two minutes for an answer.
# (MLflow also prints a link on stdout whenever a run ends on a server; palaestra prints its own once.)
_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
                  "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
_RETRY_SECONDS = (1.0, 2.0, 5.0)
"""Pauses between attempts while the store is away (the last one repeats)."""
_METRICS_PER_SEND = 1000
"""Metrics per batch call (MLflow's limit): a backlog goes out a thousand metrics at a time."""
_TRIES_BEFORE_SETTING_ASIDE = 3
"""Attempts at a write that the store refuses while it answers, before it is set aside."""
_UNREACHABLE = {"Connection refused": "connection refused", "timed out": "no answer", "Connection aborted": "connection lost",
                "Connection reset": "connection lost", "Name or service not known": "unknown host",
                "Failed to resolve": "unknown host"}
"""What a store that cannot be reached says (its error text -> a few words for the warning)."""


def fail_fast() -> None:
    """One attempt per HTTP write with a 15 s limit (unless the environment says otherwise): palaestra
    decides what a failed write costs, instead of MLflow's minutes of retries inside one call."""
    for key, value in _HTTP_SETTINGS.items():
        os.environ.setdefault(key, value)


def check_store(tracking_uri: str | None) -> None:
    """Raise a :class:`TrackingError` at once when the store does not answer (``tracking.required``)."""
    from mlflow import MlflowClient

    from palaestra.tracking.mlflow_tracker import TrackingError, default_tracking_uri

    fail_fast()
    uri = tracking_uri or default_tracking_uri()
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as error:
        raise TrackingError(f"the tracking store {uri} cannot be reached ({_one_line(error)}); start it, or set "
                            "tracking.required=false to train and send the metrics when it is back") from None


class Journal:
    """The run folder's append-only record of tracking writes and how many of them the store has.

    Args:
        folder: ``<run folder>/tracking`` (made if missing).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "journal.jsonl"
        self._sent_path = self.folder / "sent"
        self._run_path = self.folder / "run.json"
        self._drop_torn_tail()
        written = self._read()
        self.sent = min(int(self._sent_path.read_text() or 0), len(written)) if self._sent_path.is_file() else 0
        """How many records (from the first one ever written) the store has."""
        # only the unsent ones stay in memory: a long run's journal would otherwise grow the process every step
        self.records: deque[dict] = deque(written[self.sent :])
        """The unsent records, oldest first (the writer thread pops from the left as the main one appends)."""
        self._file = self.path.open("a", encoding="utf-8")

    def _drop_torn_tail(self) -> None:
        """A process killed while appending leaves half a line: cut it so the next record starts clean."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def append(self, record: dict) -> None:
        line = json.dumps(record, default=str)  # numpy numbers and the like as text, as a replay reads them
        self._file.write(line + "\n")
        self._file.flush()
        self.records.append(json.loads(line))  # deque appends and pops are atomic: the writer thread reads as it grows

    def set_aside(self, records: list[dict], reason: str) -> None:
        """Keep writes the store refused in ``rejected.jsonl`` (with why), out of the way of the others."""
        with (self.folder / "rejected.jsonl").open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps({"reason": reason, **record}, default=str) + "\n")

    def mark_sent(self, count: int) -> None:
        """The oldest ``count`` unsent records are in the store: count them and let them go."""
        for _ in range(count):
            self.records.popleft()
        self.sent += count
        _write_atomically(self._sent_path, str(self.sent))

    @property
    def run(self) -> dict:
        """``{"run_id": ..., "experiment_id": ...}`` once the writer has created the MLflow run, else {}."""
        return json.loads(self._run_path.read_text()) if self._run_path.is_file() else {}

    def remember_run(self, run_id: str, experiment_id: str) -> None:
        _write_atomically(self._run_path, json.dumps({"run_id": run_id, "experiment_id": experiment_id}))

    def close(self) -> None:
        self._file.close()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class BufferedTracker:
    """An MLflow run written through the run folder's :class:`Journal` by a background writer.

    The logging calls are those of :class:`~palaestra.tracking.MlflowTracker` and return at once.

    Args:
        folder: the journal's folder (``<run folder>/tracking``); a journal already there (the same run,
            resumed) is sent first and its MLflow run continues.
        experiment: MLflow experiment of a new run.
        run_name: name of a new run.
        run_id: an MLflow run to continue when the folder has no record of one (a checkpoint written
            before runs kept a journal).
        tracking_uri: the store (default: ``MLFLOW_TRACKING_URI`` or ``./mlflow.db``).
        required: a store that cannot be reached at the start is a :class:`TrackingError` (else one warning).
        wait_seconds: how long the start waits for the store, and the end for the last writes to go out.
        loggers: where the writes go: ``mlflow`` (this class's writer) and the loggers beside it
            (:mod:`palaestra.tracking.mirrors`, each fed from the same journal by a thread of its own).
        logger_options: keyword arguments of those loggers, by name (``{"wandb": {"project": ...}}``).
    """

    def __init__(self, folder: Path, experiment: str, *, run_name: str | None = None, run_id: str | None = None,
                 tracking_uri: str | None = None, required: bool = False, wait_seconds: float = 30.0,
                 loggers: Sequence[str] = ("mlflow",), logger_options: Mapping[str, dict] | None = None):
        from palaestra.tracking.mirrors import Mirror, make_logger
        from palaestra.tracking.mlflow_tracker import default_tracking_uri

        fail_fast()
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.journal = Journal(folder)
        self.wait_seconds = wait_seconds
        self.mlflow = "mlflow" in loggers
        options = logger_options or {}
        self.mirrors = [Mirror(self.journal.folder, name, make_logger(name, self.journal.folder.parent, options.get(name)))
                        for name in loggers if name != "mlflow"]
        known = self.journal.run or ({"run_id": run_id, "experiment_id": None} if run_id else {})
        self.resumed = bool(known) or bool(self.journal.sent or self.journal.records)  # a tracker wrote here before
        self._store = None  # the MlflowTracker the writer sends through, once connected
        self._run = known
        self._ended = False
        self._failure: str | None = None  # why the last attempt failed (None: the store answered)
        self._failed_attempts = 0
        self._refusals: dict[int, int] = {}  # journal position -> times the store answered and refused it
        self._said_away = False  # a warning said the store is away (the next success says it is back)
        self._wake = threading.Event()
        self._stopping = False
        self._start = {"op": "start", "experiment": experiment, "run_name": run_name}
        self._add(self._start)
        self._thread = threading.Thread(target=self._write_loop, name="palaestra-tracking", daemon=True)
        if not self.mlflow:
            return
        self._thread.start()
        if not self.flush(wait_seconds):
            from palaestra.tracking.mlflow_tracker import TrackingError

            if required:
                self.close(wait=False)
                raise TrackingError(f"the tracking store {self.tracking_uri} cannot be reached ({self._failure}); start it, "
                                    "or set tracking.required=false to train and send the metrics when it is back")
            self._said_away = True
            log.warning("the tracking store %s cannot be reached (%s): training goes on and its tracking writes wait in %s",
                        self.tracking_uri, self._failure, self.journal.folder)
        else:
            self._check_artifact_store(required)

    def _check_artifact_store(self, required: bool) -> None:
        """A store whose artifacts this process writes to S3 itself, and cannot: one line at the start (an error
        when ``required``), instead of a refused write at the first artifact."""
        from palaestra.tracking.mlflow_tracker import TrackingError
        from palaestra.tracking.s3 import s3_problem

        try:
            location = self._store.client.get_experiment(self._store.experiment_id).artifact_location
        except Exception:  # the store went away since: the writer says so
            return
        problem = s3_problem(location)
        if problem is None:
            return
        if required:
            self.close(wait=False)
            raise TrackingError(f"the artifact store {location} cannot be written ({problem}); fix it, or set "
                                "tracking.required=false to train with the metrics tracked and the artifacts kept aside")
        log.warning("the artifact store %s cannot be written (%s): training goes on with its metrics tracked, and the "
                    "artifacts the store refuses are kept in %s", location, problem, self.journal.folder / "rejected.jsonl")

    # ------------------------------------------------------------------------------ what training calls
    @property
    def run_id(self) -> str:
        """The MLflow run's id ("" until the store has been reached once)."""
        return self._run.get("run_id") or ""

    @property
    def experiment_id(self) -> str:
        return self._run.get("experiment_id") or ""

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._add({"op": "params", "params": {str(k): str(v) for k, v in params.items()}})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._add({"op": "tags", "tags": {str(k): str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # the time is fixed now, so a record sent twice is the same metric to MLflow
        self._add({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": int(step),
                   "time": int(time.time() * 1000)})

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        self._add({"op": "table", "rows": rows, "file": artifact_file})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._add({"op": "text", "text": text, "file": artifact_file})

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        self._add({"op": "dict", "dict": dict(d), "file": artifact_file})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Send a file of the run folder (read when it is sent: the file must stay where it is)."""
        self._add({"op": "artifact", "path": str(Path(local_path).resolve()), "artifact_path": artifact_path})

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._add({"op": "artifacts", "path": str(Path(local_dir).resolve()), "artifact_path": artifact_path})

    def end(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED) and wait up to ``wait_seconds`` for the last writes;
        what the store has not taken by then stays in the journal for the next resume."""
        if self._ended:
            return
        self._ended = True
        self._add({"op": "end", "status": status})
        self.close(wait=True)

    def live(self, timeout: float = 600.0):
        """The store's :class:`~palaestra.tracking.MlflowTracker` once every write so far is in it (for
        reads and the model registry), or None when the store does not answer (a failed attempt ends the
        wait at once; ``timeout`` bounds a write that takes long, such as a large model folder) or the run
        does not log to MLflow."""
        if not self.mlflow or not self.flush(timeout):
            return None
        return self._store

    def run_url_hint(self) -> str:
        if not self.mlflow:
            return "the run's figures: " + ", ".join(f"{m.name} in {m.logger.folder}" for m in self.mirrors)
        if self._store is not None:
            return self._store.run_url_hint()
        return f"MLflow run not created yet: the store {self.tracking_uri} was unreachable; its writes wait in {self.journal.folder}"

    # ------------------------------------------------------------------------------------ the writer
    @property
    def unsent(self) -> int:
        return len(self.journal.records)

    def _add(self, record: dict) -> None:
        self.journal.append(record)
        self._wake.set()
        for mirror in self.mirrors:
            mirror.notify()

    def flush(self, timeout: float) -> bool:
        """Wait for the store to hold every write so far, as long as it takes while writes keep going out and
        up to ``timeout`` seconds without one; True when it holds them all. A store that fails a fresh
        attempt is not waited for."""
        deadline, sent = time.monotonic() + timeout, self.journal.sent
        failed_before = self._failed_attempts
        self._wake.set()
        while self.unsent and time.monotonic() < deadline and self._thread.is_alive():
            if self._failed_attempts > failed_before:
                break
            if self.journal.sent > sent:  # progress: a long backlog is worth waiting for
                deadline, sent = time.monotonic() + timeout, self.journal.sent
            time.sleep(0.02)
        return not self.unsent

    def close(self, wait: bool = True) -> None:
        """Stop the writer and the loggers beside it (after up to ``wait_seconds`` of sending, when ``wait``) and
        say what was left."""
        for mirror in self.mirrors:
            mirror.close(self.wait_seconds if wait else 0.0)
        if not self.mlflow:
            self.journal.close()
            return
        if wait:
            self.flush(self.wait_seconds)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=self.wait_seconds + 5)
        if self.unsent:
            log.warning("%d tracking writes could not be sent to %s (%s); they are kept in %s and sent when this "
                        "run is resumed", self.unsent, self.tracking_uri, self._failure, self.journal.path)
        self.journal.close()

    def _write_loop(self) -> None:
        answered_once, attempt = False, 0
        while not self._stopping:
            self._wake.clear()
            try:
                self._send_pending()
            except _Refused:  # the store answers but refused a write: again in a moment (then it is set aside)
                self._wake.wait(_RETRY_SECONDS[0])
                continue
            except Exception as error:  # the store is away: keep the records, try again
                if self._failure is None and answered_once:
                    self._said_away = True
                    log.warning("the tracking store %s stopped answering (%s); training goes on and its writes wait in %s",
                                self.tracking_uri, _one_line(error), self.journal.folder)
                self._failure, self._store = _one_line(error), None
                self._failed_attempts += 1
                self._wake.wait(_RETRY_SECONDS[min(attempt, len(_RETRY_SECONDS) - 1)])
                attempt += 1
                continue
            if self._said_away:
                log.warning("the tracking store %s is back: the waiting writes were sent", self.tracking_uri)
            self._failure, self._said_away, answered_once, attempt = None, False, True, 0
            self._wake.wait(1.0)

    def _send_pending(self) -> None:
        """Send the unsent records in order, consecutive metrics in one batch, counting each one sent.

        A failure to reach the store is raised (the writer tries again later); a record the store refuses
        while it answers is tried ``_TRIES_BEFORE_SETTING_ASIDE`` times, then set aside in
        ``rejected.jsonl`` with a warning, so that one bad write never holds back the ones after it.
        """
        from palaestra.tracking.mlflow_tracker import MlflowTracker

        records = self.journal.records
        while records:
            record, position = records[0], self.journal.sent
            batch = [record]
            if record["op"] == "metrics":  # up to one MLflow batch of metrics, several steps at a time
                count = len(record["metrics"])
                while len(batch) < len(records) and records[len(batch)]["op"] == "metrics":
                    count += len(records[len(batch)]["metrics"])
                    if count > _METRICS_PER_SEND:
                        break
                    batch.append(records[len(batch)])
            if record["op"] == "start" or self._store is None:  # reaching the store: any failure means it is away
                # a start not yet sent creates the run; after one was sent, run.json knows the run and any start resumes it
                self._store = self._store or self._connect(record if record["op"] == "start" else self._start, MlflowTracker)
            try:
                if record["op"] == "metrics":
                    self._store.log_metric_records(batch)
                elif record["op"] != "start":
                    _send(self._store, record)
            except Exception as error:
                if _unreachable(error):
                    raise
                self._refusals[position] = self._refusals.get(position, 0) + 1
                if self._refusals[position] < _TRIES_BEFORE_SETTING_ASIDE:
                    raise _Refused from error
                self.journal.set_aside(batch, _one_line(error))
                log.warning("the tracking store refused a %s write %d times (%s); it is set aside in %s",
                            record["op"], _TRIES_BEFORE_SETTING_ASIDE, _one_line(error), self.journal.folder / "rejected.jsonl")
            self.journal.mark_sent(len(batch))

    def _connect(self, start: dict, tracker_class):
        """The store's tracker for this run: the known MLflow run, or a new one whose id is kept in run.json."""
        if self._run.get("run_id"):
            store = tracker_class(start["experiment"], run_id=self._run["run_id"], tracking_uri=self.tracking_uri)
        else:
            store = tracker_class(start["experiment"], run_name=start["run_name"], tracking_uri=self.tracking_uri)
        self._run = {"run_id": store.run_id, "experiment_id": store.experiment_id}
        self.journal.remember_run(store.run_id, store.experiment_id)
        return store


class _Refused(Exception):
    """The store answered and refused a write (tried again a few times, then set aside)."""


def _unreachable(error: Exception) -> bool:
    """The store could not be reached (as opposed to: it answered and refused the write)."""
    return any(cause in str(error) for cause in _UNREACHABLE)


def _one_line(error: Exception) -> str:
    """Why the store did not take a write, short: the network causes in a few words, else the error's first line."""
    text = str(error).strip()
    for cause, said in _UNREACHABLE.items():
        if cause in text:
            return said
    return (text.splitlines()[0] if text else type(error).__name__).split(": ", 1)[-1][:200]


def _send(store, record: dict) -> None:
    op = record["op"]
    if op == "params":
        store.log_params(record["params"])
    elif op == "tags":
        store.set_tags(record["tags"])
    elif op == "table":
        store.log_table(record["rows"], record["file"])
    elif op == "text":
        store.log_text(record["text"], record["file"])
    elif op == "dict":
        store.log_dict(record["dict"], record["file"])
    elif op == "artifact":
        if Path(record["path"]).exists():  # a file removed since (a pruned checkpoint) has nothing left to send
            store.log_artifact(record["path"], record["artifact_path"])
    elif op == "artifacts":
        if Path(record["path"]).exists():
            store.log_artifacts(record["path"], record["artifact_path"])
    elif op == "end":
        store.end(record["status"])
    else:
        raise ValueError(f"unknown tracking record {op!r}")
