"""``palaestra serve``: one-line config errors before anything loads, and the real command serving."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from palaestra.config import ConfigError, ServeJob
from palaestra.config.sections import validate_sections
from palaestra.serving.catalog import plan_models
from tests.conftest import REPO, run_cli


@pytest.mark.parametrize("key, value, expected", [
    ("port", 70000, "serve.port=70000 must be in [0, 65535]"),
    ("max_batch_size", 0, "serve.max_batch_size=0 must be >= 1"),
    ("device", "tpu", "serve.device='tpu' is unknown"),
    ("models", ["no/such/run"], "serve.models: no/such/run is not a folder"),
    ("index", "no/such/rag", "serve.index=no/such/rag holds no retrieval index"),
    ("named_models", {"x": "no/such/run"}, "serve.models: no/such/run is not a folder"),
])
def test_bad_serve_settings_are_one_line_errors(key, value, expected):
    config = ServeJob()
    setattr(config.serve, key, value)
    with pytest.raises(ConfigError) as caught:
        validate_sections(config)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_model_ids_come_from_the_folders(tmp_path, adapter_dir):
    run = tmp_path / "chain_sum-grpo"
    step = run / "checkpoints" / "step-000004"
    (step / "adapter").mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    plan = plan_models([str(run), str(step), str(adapter_dir)], "tiny")
    assert {key: (source.kind, source.folder.name) for key, source in plan.items()} == {
        "chain_sum-grpo": ("adapter", "adapter"), "chain_sum-grpo/step-000004": ("adapter", "adapter"), "tuned": ("adapter", "tuned")}
    with pytest.raises(ConfigError, match="two models would be served as 'tuned'"):
        plan_models([str(adapter_dir), str(adapter_dir)], "tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no checkpoint, adapter or model"):
        plan_models([], "tiny", {"x": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="has the base model's id"):
        plan_models([], "tiny", {"tiny": str(adapter_dir)})


def test_the_command_rejects_a_bad_setting_in_one_line(tmp_path):
    result = run_cli(["serve", "model=tiny", "serve.port=-1"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "palaestra: error: serve.port=-1 must be in [0, 65535]"


@pytest.mark.slow
def test_palaestra_serve_answers_until_stopped(tmp_path, adapter_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "palaestra.cli", "serve", "model=tiny", "model.dtype=float32", f"serve.port={port}",
         "serve.embedder=null", f"+serve.named_models.tuned={adapter_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert ids == ["tiny", "tuned"]
        reply = httpx.post(f"{url}/v1/chat/completions", json={"model": "tuned", "temperature": 0, "max_tokens": 40,
                                                                "messages": [{"role": "user", "content": "Say hi"}]})
        assert reply.json()["choices"][0]["message"]["content"] == "Hello there, friend!"
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
