"""BufferedTracker and its journal: writes go to the run folder first and reach a real MLflow store in
order, exactly once, also when the store is away at the start, and after the process was killed."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from mlflow import MlflowClient

from palaestra.tracking import BufferedTracker, TrackingError
from palaestra.tracking.buffered import Journal
from tests.conftest import REPO


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    """A migrated SQLite store shared by the module (a new one takes seconds to migrate)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def _dead_uri() -> str:
    """An http store on a port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(metric.step for metric in MlflowClient(uri).get_metric_history(run_id, key))


def test_writes_reach_the_store_in_order_and_a_resumed_tracker_continues_the_run(tmp_path, store_uri):
    tracker = BufferedTracker(tmp_path / "tracking", "buffered", run_name="first", tracking_uri=store_uri)
    assert tracker.run_id and not tracker.resumed
    tracker.log_params({"algo.lr": 1e-4})
    tracker.set_tags({"task": "gsm8k"})
    for step in (1, 2, 3):
        tracker.log_metrics({"reward/mean": step / 10, "loss": 1.0}, step)
    tracker.log_dict({"a": 1}, "config.yaml")
    tracker.end("KILLED")
    run = MlflowClient(store_uri).get_run(tracker.run_id)
    assert run.data.params == {"algo.lr": "0.0001"} and run.data.tags["task"] == "gsm8k"
    assert run.info.status == "KILLED"
    assert _steps(store_uri, tracker.run_id, "reward/mean") == [1, 2, 3]
    assert json.loads((tmp_path / "tracking" / "run.json").read_text())["run_id"] == tracker.run_id
    assert (tmp_path / "tracking" / "sent").read_text() == "8"  # start, params, tags, 3 metrics (one batch), dict, end

    again = BufferedTracker(tmp_path / "tracking", "buffered", run_name="ignored", tracking_uri=store_uri)
    assert again.resumed and again.run_id == tracker.run_id
    again.log_metrics({"reward/mean": 0.4}, 4)
    again.end()
    assert _steps(store_uri, tracker.run_id, "reward/mean") == [1, 2, 3, 4]
    assert MlflowClient(store_uri).get_run(tracker.run_id).info.status == "FINISHED"


def test_a_dead_store_at_the_start_is_one_warning_and_the_writes_wait_for_the_next_tracker(tmp_path, store_uri, caplog):
    with caplog.at_level(logging.WARNING, logger="palaestra.tracking.buffered"):
        tracker = BufferedTracker(tmp_path / "tracking", "buffered", run_name="late", tracking_uri=_dead_uri(),
                                  wait_seconds=10)
        for step in (1, 2):
            tracker.log_metrics({"loss": 2.0 - step}, step)
        tracker.end()
    assert tracker.run_id == ""  # no MLflow run yet
    warnings = [r.getMessage() for r in caplog.records]
    assert any("cannot be reached (connection refused)" in m for m in warnings), warnings
    assert any("4 tracking writes could not be sent" in m for m in warnings), warnings  # start, 2 metrics, end
    assert not (tmp_path / "tracking" / "run.json").exists()

    # the next tracker on the folder (a resume) sends them to the store it has: the run is created then
    resumed = BufferedTracker(tmp_path / "tracking", "buffered", tracking_uri=store_uri)
    resumed.log_metrics({"loss": 0.5}, 3)
    resumed.end()
    run = MlflowClient(store_uri).get_run(resumed.run_id)
    assert run.info.run_name == "late" and run.info.status == "FINISHED"
    assert _steps(store_uri, resumed.run_id, "loss") == [1, 2, 3]


def test_a_required_store_that_is_dead_is_one_error(tmp_path):
    with pytest.raises(TrackingError, match=r"cannot be reached \(connection refused\); start it, or set tracking.required=false"):
        BufferedTracker(tmp_path / "tracking", "buffered", tracking_uri=_dead_uri(), required=True)


def test_writes_of_a_killed_process_are_sent_once_by_the_next_tracker(tmp_path, store_uri):
    """kill -9 after the store took some writes: the journal's unsent tail goes out, nothing twice."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from palaestra.tracking import BufferedTracker
        tracker = BufferedTracker(Path({str(tmp_path / "tracking")!r}), "buffered", run_name="killed", tracking_uri={store_uri!r})
        for step in range(1, 6):
            tracker.log_metrics({{"loss": 1.0 / step}}, step)
        assert tracker.flush(30)
        tracker.tracking_uri = "unused"
        tracker._stopping = True  # the writer stops: what follows stays in the journal only
        tracker._thread.join()
        for step in range(6, 9):
            tracker.log_metrics({{"loss": 1.0 / step}}, step)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    journal = Journal(tmp_path / "tracking")
    # 9 records written (start + 8 metrics): start + 5 sent, and only the 3 unsent ones are kept in memory
    assert (journal.sent, len(journal.records)) == (6, 3)
    journal.close()

    resumed = BufferedTracker(tmp_path / "tracking", "buffered", tracking_uri=store_uri)
    resumed.end()
    assert _steps(store_uri, resumed.run_id, "loss") == list(range(1, 9))


def test_a_torn_last_line_is_cut_and_a_resent_metric_is_stored_once(tmp_path, store_uri):
    folder = tmp_path / "tracking"
    tracker = BufferedTracker(folder, "buffered", tracking_uri=store_uri)
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.end()
    with open(folder / "journal.jsonl", "a") as journal:
        journal.write('{"op": "metrics", "metr')  # a process killed in the middle of a write
    (folder / "sent").write_text("1")  # as if the crash came before the count of the metrics was written
    resumed = BufferedTracker(folder, "buffered", tracking_uri=store_uri)
    resumed.end()
    # the metric record went out again with its own time: MLflow holds it once
    assert _steps(store_uri, resumed.run_id, "loss") == [1]
    lines = (folder / "journal.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)


def test_a_write_the_store_refuses_is_set_aside_and_the_later_ones_go_out(tmp_path, store_uri, caplog):
    tracker = BufferedTracker(tmp_path / "tracking", "buffered", tracking_uri=store_uri)
    with caplog.at_level(logging.WARNING, logger="palaestra.tracking.buffered"):
        tracker.log_table([{"a": 1}], "not-a-table.txt")  # refused every time: a table is a .json file
        tracker.log_metrics({"loss": 1.0}, 1)
        assert tracker.flush(30)
        tracker.end()
    assert _steps(store_uri, tracker.run_id, "loss") == [1]
    rejected = [json.loads(line) for line in (tmp_path / "tracking" / "rejected.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rejected] == ["not-a-table.txt"] and "name it <name>.json" in rejected[0]["reason"]
    assert any("refused a table write 3 times" in r.getMessage() for r in caplog.records)
