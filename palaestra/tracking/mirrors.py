"""Loggers beside MLflow (``tracking.loggers``): each is fed from the run folder's tracking journal by its own thread.

Every tracking write of a run is first a record in ``<run folder>/tracking/journal.jsonl``
(:mod:`palaestra.tracking.buffered`). A :class:`Mirror` reads the records its logger has not taken yet
and hands them over in order; it counts what the logger took in ``tracking/sent-<logger>``, written
atomically after each record. A logger that fails is tried again a moment later from the same record, so
nothing is lost while it is away. A run stopped before its logger took everything, even by ``kill -9``,
resends the rest when it is resumed, and its count makes sure it sends nothing twice (at most the one
record in flight at the kill).

A logger is a small class with ``write(record)`` and ``close()``. The records are those of the journal:
``start``, ``params``, ``tags``, ``metrics``, ``table``, ``text``, ``dict``, ``artifact``, ``artifacts``, ``end``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from palaestra.config.tracking import LOGGERS

__all__ = ["LOGGERS", "Mirror", "TensorBoardLogger", "WandbLogger", "make_logger"]

log = logging.getLogger(__name__)

_RETRY_SECONDS = 2.0
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class TensorBoardLogger:
    """TensorBoard event files in ``folder`` (``tensorboard --logdir runs/`` shows every run).

    Each record goes over in TensorBoard's own form:
    - metrics become scalars at their step and time;
    - params and tags become one text each, a table of names and values;
    - tables, texts and dicts become text (a table as markdown, its first 50 rows);
    - image artifacts (the plots) become images.
    """

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, record: dict) -> None:
        op = record["op"]
        if op == "metrics":
            for name, value in record["metrics"].items():
                self.writer.add_scalar(name, value, record["step"], walltime=record["time"] / 1000)
        elif op in ("params", "tags"):
            rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(record[op].items()))
            self.writer.add_text(op, f"| name | value |\n|---|---|\n{rows}", 0)
        elif op == "table":
            self.writer.add_text(record["file"], _markdown_table(record["rows"][:50]), 0)
        elif op == "text":
            self.writer.add_text(record["file"], record["text"], 0)
        elif op == "dict":
            self.writer.add_text(record["file"], "```\n" + json.dumps(record["dict"], indent=1, default=str) + "\n```", 0)
        elif op == "artifact" and Path(record["path"]).suffix.lower() in _IMAGE_SUFFIXES and Path(record["path"]).is_file():
            import matplotlib.image

            image = matplotlib.image.imread(record["path"])  # [H, W, 3 or 4] floats in [0, 1]
            self.writer.add_image(f"{record['artifact_path'] or 'images'}/{Path(record['path']).stem}", image[..., :3], 0,
                                  dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run, continued by the same run folder when it is resumed (its id is kept in
    ``tracking/wandb.json``).

    W&B reads its own environment: ``WANDB_MODE`` (``offline`` writes the run under ``<run folder>/wandb`` for
    ``wandb sync``), ``WANDB_API_KEY``, ``WANDB_PROJECT``, ``WANDB_ENTITY``. The project is ``project``, else
    ``WANDB_PROJECT``, else the MLflow experiment's name; the run's name is ``run_name``, else the MLflow run's.

    Each record goes over in W&B's own form:
    - params and tags go to the run's config (tags under ``tags/``);
    - metrics go to its history at their step;
    - tables become ``wandb.Table``s;
    - texts and dicts become one-cell tables;
    - image artifacts (the plots) become ``wandb.Image``s.
    W&B keeps one value per name and step, and drops a step below its last: a resumed run's resent records
    are not stored twice.
    """

    def __init__(self, run_folder: Path, project: str | None = None, run_name: str | None = None):
        self.folder, self.project, self.run_name = Path(run_folder) / "wandb", project, run_name
        self._id_path = Path(run_folder) / "tracking" / "wandb.json"
        self.run = None
        self._step = 0

    def _start(self, record: dict) -> None:
        import wandb

        self.folder.mkdir(parents=True, exist_ok=True)
        known = json.loads(self._id_path.read_text()) if self._id_path.is_file() else {}
        self.run = wandb.init(project=self.project or os.environ.get("WANDB_PROJECT") or record["experiment"],
                              name=self.run_name or record.get("run_name"), id=known.get("id"), resume="allow",
                              dir=str(self.folder), settings=wandb.Settings(silent=True, console="off"))
        if not known:
            _write_atomically(self._id_path, json.dumps({"id": self.run.id, "project": self.run.project}))

    def write(self, record: dict) -> None:
        import wandb

        op = record["op"]
        if op == "start" or self.run is None:
            self._start(record if op == "start" else {"experiment": "palaestra"})
            if op == "start":
                return
        if op == "metrics":
            self._step = max(self._step, int(record["step"]))
            self.run.log(dict(record["metrics"]), step=int(record["step"]))
        elif op == "params":
            self.run.config.update(record["params"], allow_val_change=True)
        elif op == "tags":
            self.run.config.update({f"tags/{key}": value for key, value in record["tags"].items()}, allow_val_change=True)
        elif op == "table":
            columns = list(dict.fromkeys(key for row in record["rows"] for key in row))
            table = wandb.Table(columns=columns, data=[[_plain(row.get(c)) for c in columns] for row in record["rows"]])
            self.run.log({_key(record["file"]): table}, step=self._step)
        elif op in ("text", "dict"):
            text = record["text"] if op == "text" else json.dumps(record["dict"], indent=1, default=str)
            self.run.log({_key(record["file"]): wandb.Table(columns=["text"], data=[[text]])}, step=self._step)
        elif op == "artifact" and Path(record["path"]).suffix.lower() in _IMAGE_SUFFIXES and Path(record["path"]).is_file():
            name = f"{record['artifact_path'] or 'images'}/{Path(record['path']).stem}"
            self.run.log({name: wandb.Image(record["path"])}, step=self._step)
        elif op == "end":
            self.run.finish(exit_code=0 if record["status"] == "FINISHED" else 1)
            self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _key(file: str) -> str:
    """A W&B key for an artifact file name: ``samples/step000003.json`` -> ``samples/step000003``."""
    return str(Path(file).with_suffix(""))


def _plain(value):
    """A table cell W&B takes: numbers and text as they are, anything else as its text."""
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def _markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cell = lambda value: str(value).replace("|", "\\|").replace("\n", " ")[:200]  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def make_logger(name: str, run_folder: Path, options: dict | None = None):
    """The logger ``tracking.loggers`` names (not MLflow: :class:`~palaestra.tracking.BufferedTracker` is MLflow's),
    with its ``options`` (W&B: ``project``, ``run_name``)."""
    if name == "tensorboard":
        return TensorBoardLogger(run_folder / "tensorboard")
    if name == "wandb":
        return WandbLogger(run_folder, **(options or {}))
    raise ValueError(f"unknown logger {name!r}; known: {', '.join(LOGGERS)}")


class Mirror:
    """One logger fed from the journal at ``folder / "journal.jsonl"`` by a thread of its own.

    Args:
        folder: the journal's folder (``<run folder>/tracking``).
        name: the logger's name (its count is ``sent-<name>``).
        logger: the logger (``write(record)``, ``close()``).
    """

    def __init__(self, folder: Path, name: str, logger):
        self.name, self.logger = name, logger
        self.journal = Path(folder) / "journal.jsonl"
        self._count_path = Path(folder) / f"sent-{name}"
        self.sent = int(self._count_path.read_text() or 0) if self._count_path.is_file() else 0
        self._handle = None  # the journal, open where the next unsent record starts
        self._stopping = False
        self._wake = threading.Event()
        self._caught_up = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"palaestra-{name}", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """A record was appended to the journal."""
        self._caught_up.clear()
        self._wake.set()

    def close(self, wait_seconds: float) -> None:
        """Send what the journal holds (up to ``wait_seconds``), then stop and close the logger."""
        self.notify()
        self._caught_up.wait(wait_seconds)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=wait_seconds + 5)
        if not self._thread.is_alive():  # the last records, appended as the thread finished its pass
            try:
                self._send_new()
            except Exception as error:
                log.warning("the %s logger failed (%s); its last records are sent when this run is resumed", self.name,
                            str(error).splitlines()[0] if str(error) else type(error).__name__)
        if self._handle is not None:
            self._handle.close()
        try:
            self.logger.close()
        except Exception as error:  # closing is tidying: the records are counted already
            log.warning("closing the %s logger failed: %s", self.name, error)

    def _loop(self) -> None:
        failing = False
        while not self._stopping:
            self._wake.clear()
            try:
                self._send_new()
            except Exception as error:  # the logger could not take a record: the same one again later
                if not failing:
                    log.warning("the %s logger failed (%s); its records wait in %s and are sent when it works again",
                                self.name, str(error).splitlines()[0] if str(error) else type(error).__name__, self.journal)
                failing = True
                self._wake.wait(_RETRY_SECONDS)
                continue
            if failing:
                log.warning("the %s logger works again: the waiting records were sent", self.name)
                failing = False
            self._caught_up.set()
            self._wake.wait(1.0)

    def _send_new(self) -> None:
        """Hand the logger every complete journal line after the first ``sent``, counting each one."""
        if self._handle is None:
            if not self.journal.is_file():
                return
            self._handle = self.journal.open("rb")
            for _ in range(self.sent):  # once: the lines taken before (an earlier process of the same run)
                if not self._handle.readline().endswith(b"\n"):
                    raise RuntimeError(f"{self.journal} is shorter than the {self.sent} records counted as sent")
        while True:
            start = self._handle.tell()
            line = self._handle.readline()
            if not line.endswith(b"\n"):  # the end, or a line still being written: read it whole next time
                self._handle.seek(start)
                return
            if line.strip():
                try:
                    self.logger.write(json.loads(line))
                except Exception:
                    self._handle.seek(start)  # the same record again next time
                    raise
            self.sent += 1
            _write_atomically(self._count_path, str(self.sent))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
