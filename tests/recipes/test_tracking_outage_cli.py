"""A real ``mlflow server`` that goes away in the middle of a real training run: the run trains on
through the outage, and afterwards the store holds every step's metrics exactly once.

The outage lasts ``PALAESTRA_OUTAGE_SECONDS`` (default 40 s; palaestra has no retry budget to
outlast: the writer retries until the store is back, so any length behaves the same).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO, run_cli
from tests.recipes.test_grpo_cli import TINY

OUTAGE_SECONDS = float(os.environ.get("PALAESTRA_OUTAGE_SECONDS", "40"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(folder: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'store.db'}", "--default-artifact-root", str(folder / "artifacts")],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(0.3)
    _stop_server(server)
    raise RuntimeError("mlflow server did not start")


def _stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)  # the server and its worker, at once, as a crash would
    server.wait(timeout=30)


def _last_step(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def _wait_for_step(metrics: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if _last_step(metrics) >= step:
            return _last_step(metrics)
        time.sleep(0.2)
    raise AssertionError(f"training did not reach step {step} (exit code {process.poll()})")


@pytest.mark.slow
def test_training_goes_on_while_the_tracking_server_is_away(tmp_path):
    port = _free_port()
    server = _start_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    out, err = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")  # files: a full pipe would stall training
    process = subprocess.Popen(
        [sys.executable, "-m", "palaestra.cli", "train", *TINY, "train.steps=50000", "train.save_interval=0",
         "train.eval_interval=0", f"tracking.tracking_uri={uri}", "tracking.experiment=outage", "train.output_dir=run"],
        cwd=tmp_path, env=env, stdout=out, stderr=err, text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        _wait_for_step(metrics, 3, process)
        _stop_server(server)
        down_at = _last_step(metrics)
        time.sleep(OUTAGE_SECONDS)
        up_at = _last_step(metrics)
        server = _start_server(tmp_path, port)
        _wait_for_step(metrics, _last_step(metrics) + 3, process)
        process.send_signal(signal.SIGINT)  # stop (saves, ends the MLflow run, exits 130)
        process.wait(timeout=180)
        stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
        assert process.returncode == 130, stderr[-3000:]
        assert "Traceback" not in stdout + stderr
        assert "stopped answering (connection" in stdout and "is back: the waiting writes were sent" in stdout
        trained_while_down = up_at - down_at
        assert trained_while_down >= 3, (down_at, up_at)

        last = _last_step(metrics)
        run_id = json.loads((tmp_path / "run" / "tracking" / "run.json").read_text())["run_id"]
        client = MlflowClient(uri)
        steps = [m.step for m in client.get_metric_history(run_id, "time/step")]
        assert sorted(steps) == list(range(1, last + 1))  # every step, exactly once
        assert client.get_run(run_id).info.status == "KILLED"
        print(f"outage {OUTAGE_SECONDS:.0f} s: {trained_while_down} steps trained while the store was away; "
              f"{len(steps)} of {last} steps' metrics stored")
    finally:
        if process.poll() is None:
            process.kill()
        out.close(), err.close()
        _stop_server(server)


def _dead_uri() -> str:
    return f"http://127.0.0.1:{_free_port()}"  # nothing listens there


@pytest.mark.slow
def test_a_dead_store_at_the_start_is_one_warning_and_the_resume_sends_the_writes(tmp_path):
    dead = _dead_uri()
    result = run_cli(["train", *TINY, "train.steps=2", f"tracking.tracking_uri={dead}", "train.output_dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    warned = [line for line in result.stdout.splitlines() if "cannot be reached" in line]
    assert len(warned) == 1 and "(connection refused)" in warned[0] and "wait in run/tracking" in warned[0], result.stdout
    assert "sent when this run is resumed" in result.stdout

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resumed = run_cli(["train", *TINY, "train.steps=3", "train.resume=auto", f"tracking.tracking_uri={store}",
                       "train.output_dir=run"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_id = json.loads((tmp_path / "run" / "tracking" / "run.json").read_text())["run_id"]
    client = MlflowClient(store)
    assert sorted(m.step for m in client.get_metric_history(run_id, "time/step")) == [1, 2, 3]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["algo.name"] == "grpo"


def test_a_required_store_that_is_dead_is_one_line_before_the_model_loads(tmp_path):
    result = run_cli(["train", *TINY, f"tracking.tracking_uri={_dead_uri()}", "tracking.required=true"], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"palaestra: error: the tracking store {result.args[-2].split('=', 1)[1]} cannot be reached (connection refused); "
        "start it, or set tracking.required=false to train and send the metrics when it is back"]
    assert "device cpu" not in result.stdout  # the model was never loaded
