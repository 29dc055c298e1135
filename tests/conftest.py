"""Shared fixtures: every test runs offline, in its own working directory."""

from __future__ import annotations

import json
import os
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


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``palaestra`` command in ``cwd``; returns the completed process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "palaestra.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def write_gsm8k(path: Path, count: int = 12) -> Path:
    """A small GSM8K-format JSONL file: 'What is a plus b?' with the official '#### N' answers."""
    with open(path, "w") as handle:
        for i in range(count):
            a, b = i + 2, 3 * i + 1
            handle.write(json.dumps({"question": f"Tom has {a} apples and buys {b} more. How many now?",
                                     "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}"}) + "\n")
    return path
