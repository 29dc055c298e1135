"""Shared fixtures: every test runs offline, in its own working directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def run_cli(args: list[str], cwd: Path, timeout: int = 600, processes: int = 1) -> subprocess.CompletedProcess:
    """Run the real ``palaestra`` command in ``cwd`` (``processes`` > 1: under torchrun, one thread each, a local
    rendezvous); returns the completed process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    launcher = [sys.executable, "-m", "palaestra.cli"]
    if processes > 1:
        env["OMP_NUM_THREADS"] = "1"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "palaestra.cli"]
    return subprocess.run([*launcher, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port free on this machine now (for a torchrun rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_gsm8k(path: Path, count: int = 12) -> Path:
    """A small GSM8K-format JSONL file: 'What is a plus b?' with the official '#### N' answers."""
    with open(path, "w") as handle:
        for i in range(count):
            a, b = i + 2, 3 * i + 1
            handle.write(json.dumps({"question": f"Tom has {a} apples and buys {b} more. How many now?",
                                     "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}"}) + "\n")
    return path
