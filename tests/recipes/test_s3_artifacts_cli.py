"""MLflow with its artifacts in S3: a real ``mlflow server`` against an S3-compatible server (moto's) that the tests
start, as a MinIO setup runs. Each layout gets the planner contract run, registration, replay and serving.

- ``--artifacts-destination s3://...``: the server proxies the artifacts, and palaestra holds no S3 credentials.
- ``--default-artifact-root s3://... --no-serve-artifacts``: palaestra writes to S3 itself, with
  ``MLFLOW_S3_ENDPOINT_URL`` and the AWS variables, as the planner template's setup does.

The S3 server checks credentials: after its first four requests (the test's IAM user, access key and bucket),
a request signed with an unknown key is refused, as AWS and MinIO refuse it.
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

from palaestra.planner.data import make_planner_dataset
from tests.conftest import REPO, free_port

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

BUCKET = "mlflow"
SMALL = ["model=tiny", "data.max_length=128", "train.learning_rate=1e-3", "algo.epochs=1", "train.threads=1",
         "train.sequences_per_step=8", "train.sequences_per_forward=4"]


def _wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start (exit code {process.poll()})")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server with an IAM user allowed s3:*, its access key, and the bucket; then it checks signatures."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_port(port, server, "the S3 server")
        endpoint = f"http://127.0.0.1:{port}"
        setup = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="palaestra")
        iam.put_user_policy(UserName="palaestra", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="palaestra")["AccessKey"]
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)  # the fourth request: signatures count from here
        credentials = {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                       "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1"}
        yield {"endpoint": endpoint, "env": credentials}
    finally:
        _stop(server)


def _objects(s3: dict, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1",
                          aws_access_key_id=s3["env"]["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=s3["env"]["AWS_SECRET_ACCESS_KEY"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="module", params=["proxied", "direct"])
def store(request, s3, tmp_path_factory):
    """An ``mlflow server`` whose artifacts live in the bucket, in either layout; the environment palaestra runs in."""
    layout = request.param
    root = tmp_path_factory.mktemp(f"s3-{layout}")
    port = free_port()
    artifacts = (["--artifacts-destination", f"s3://{BUCKET}/{layout}"] if layout == "proxied" else
                 ["--default-artifact-root", f"s3://{BUCKET}/{layout}", "--no-serve-artifacts"])
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'store.db'}", *artifacts],
        cwd=root, env=dict(os.environ, **s3["env"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow server did not start")
                time.sleep(0.3)
        # proxied: palaestra holds no S3 credentials at all; direct: it writes to S3 with them
        client_env = {key: "" for key in s3["env"]} if layout == "proxied" else s3["env"]
        yield {"layout": layout, "uri": f"http://127.0.0.1:{port}", "root": root, "env": client_env}
    finally:
        _stop(server)


def _cli(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """The real palaestra command with ``env`` added (an empty value removes the variable)."""
    full = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    full.pop("MLFLOW_TRACKING_URI", None)
    for key, value in env.items():
        if value:
            full[key] = value
        else:
            full.pop(key, None)
    return subprocess.run([sys.executable, "-m", "palaestra.cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_the_planner_contract_run_registers_replays_and_serves_through_s3(store, s3, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    for key, value in store["env"].items():  # this process reads the store (and serves) as palaestra's commands do
        monkeypatch.setenv(key, value) if value else monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PALAESTRA_CACHE", str(tmp_path / "cache"))
    data = make_planner_dataset(tmp_path, date="2026-05-04", n_train=8, n_val=2, n_test=2)
    trained = _cli(["train", "experiment=planner", *SMALL, f"data.path={data}", f"tracking.tracking_uri={store['uri']}",
                    "tracking.required=true", "train.output_dir=run"], tmp_path, store["env"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "cannot be written" not in trained.stdout + trained.stderr and "Traceback" not in trained.stderr

    client = MlflowClient(tracking_uri=store["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("planner_training").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["dataset_version"] == "2026-05-04"
    assert {"model", "tokenizer", "config.yaml", "train.log"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    stored = _objects(s3, f"{store['layout']}/")  # the files are in the bucket, under the layout's prefix
    assert any(key.endswith("/model/model.safetensors") for key in stored), stored[:20]
    assert any(key.endswith("/config.yaml") for key in stored)
    assert client.get_model_version("planner_model", "1").run_id == run.info.run_id

    replayed = _cli(["replay", "--model", "planner_model", "--version", "1", "--dataset", str(data), "--max-examples", "1",
                     "--max-new-tokens", "8", "--device", "cpu", "--tracking-uri", store["uri"]], tmp_path, store["env"])
    assert replayed.returncode in (0, 1), replayed.stderr[-3000:]  # 1: the gate rejected the tiny model, as it should
    assert "Traceback" not in replayed.stderr
    tags = client.get_model_version("planner_model", "1").tags
    assert tags["status"] in ("candidate", "rejected") and tags["replay_dataset_version"] == "2026-05-04"
    created = _cli(["policy", "create", "--model", "planner_model", "--version", "1", "--tracking-uri", store["uri"]],
                   tmp_path, store["env"])
    assert created.returncode == 0, created.stderr[-3000:]
    promoted = _cli(["policy", "promote", "--model", "planner_model", "--policy-version", "1", "--force",
                     "--tracking-uri", store["uri"]], tmp_path, store["env"])
    assert promoted.returncode == 0, promoted.stderr[-3000:]

    # palaestra serve of planner_model@active: downloaded from the bucket and answering the openai client
    from openai import OpenAI

    from palaestra.serving import BackgroundServer, build_app
    from palaestra.serving.command import build_services
    from tests.serving.conftest import serve_config

    config = serve_config(None, None, max_tokens=8, registry=True)
    config.serve.models, config.tracking.tracking_uri = [], store["uri"]  # the base and the registry's models
    with BackgroundServer(build_app(build_services(config))) as running:
        openai_client = OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert "planner_model@active" in {m.id for m in openai_client.models.list().data}
        reply = openai_client.chat.completions.create(model="planner_model@active", max_tokens=4, temperature=0,
                                                      messages=[{"role": "user", "content": "Plan a trip."}])
        assert reply.usage.completion_tokens >= 1


@pytest.mark.slow
def test_wrong_s3_settings_are_one_line_and_training_goes_on(s3, tmp_path):
    """palaestra writes to S3 itself (the direct layout) with a wrong key, then a wrong endpoint."""
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store_dir / 'store.db'}", "--default-artifact-root",
         f"s3://{BUCKET}/wrong", "--no-serve-artifacts"],
        cwd=store_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for_port(port, server, "mlflow server")
        uri = f"http://127.0.0.1:{port}"
        data = make_planner_dataset(tmp_path, date="2026-05-04", n_train=8, n_val=2, n_test=2)
        args = ["train", "algo=sft", "data=planner", *SMALL, f"data.path={data}", f"tracking.tracking_uri={uri}"]
        bad_key = dict(s3["env"], AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG1")
        trained = _cli([*args, "train.output_dir=run"], tmp_path, bad_key)
        assert trained.returncode == 0, trained.stderr[-3000:]
        said = [line for line in (trained.stdout + trained.stderr).splitlines() if "cannot be written" in line]
        assert len(said) == 1 and "refused the credentials" in said[0] and "AWS_ACCESS_KEY_ID" in said[0], said
        assert "Traceback" not in trained.stderr
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("palaestra").experiment_id])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/step_loss")] == [1]  # metrics went
        assert (tmp_path / "run" / "tracking" / "rejected.jsonl").is_file()  # the refused artifacts are kept

        wrong_endpoint = dict(s3["env"], MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:9")
        refused = _cli([*args, "tracking.required=true", "train.output_dir=run2"], tmp_path, wrong_endpoint)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert "the S3 endpoint http://127.0.0.1:9 does not answer; check MLFLOW_S3_ENDPOINT_URL" in refused.stderr
        assert not (tmp_path / "run2" / "checkpoints").exists()  # refused before training
    finally:
        _stop(server)
