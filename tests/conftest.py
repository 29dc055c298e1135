"""Shared fixtures: every test runs offline, in its own working directory."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def run_cli(args: list[str], cwd: Path, timeout: int = 600, processes: int = 1) -> subprocess.CompletedProcess:
    """Run the real ``palaestra`` command in ``cwd`` (``processes`` > 1: data parallel, started as torchrun starts
    them, one thread each, a local rendezvous); returns the completed process.

    The processes are forked from this test worker's warm command (:mod:`tests.warm_command`: the imports done
    once), unless ``PALAESTRA_TESTS_COLD=1`` asks for fresh interpreters (and torchrun itself) each time."""
    env = _command_environment()
    if processes > 1:
        env["OMP_NUM_THREADS"] = "1"
    if warm():
        return WARM.run(args, cwd, env, timeout, processes=processes)
    launcher = [sys.executable, "-m", "palaestra.cli"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "palaestra.cli"]
    return subprocess.run([*launcher, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _command_environment() -> dict[str, str]:
    """The environment a test's command runs in: this process's, offline, unbuffered, this checkout first on the
    path, and no tracking server of the user's."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


class _WarmCommand:
    """This test worker's :mod:`tests.warm_command` process, started at its first command."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.buffer = b""
        self.outputs = Path(tempfile.mkdtemp(prefix="palaestra-command-"))  # its stdout and stderr, outside the test's folder
        self.env = _command_environment()  # it imports in this worker's, as it started: before any test's own settings

    def run(self, args: list[str], cwd: Path, env: dict, timeout: float, *, processes: int = 1,
            probe: bool = False) -> subprocess.CompletedProcess:
        """The command's completed process (``probe``: run under :mod:`tests.recipes.cli_probe`)."""
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, "-m", "tests.warm_command"], cwd=REPO, env=self.env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
            self.buffer = b""
        out, err = self.outputs / "stdout", self.outputs / "stderr"
        request = {"args": [str(arg) for arg in args], "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err),
                   "processes": processes, "port": free_port() if processes > 1 else None, "probe": probe}
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        deadline = time.monotonic() + 120 + timeout  # its imports, the first time
        pids = self._answer(deadline)["pids"]
        deadline = time.monotonic() + timeout
        try:
            status = self._answer(deadline)["status"]
        except subprocess.TimeoutExpired:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._answer(time.monotonic() + 60)
            raise subprocess.TimeoutExpired(["palaestra", *args], timeout, out.read_text(errors="replace"),
                                            err.read_text(errors="replace")) from None
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        out.unlink()
        err.unlink()
        return subprocess.CompletedProcess(["palaestra", *args], os.waitstatus_to_exitcode(status), stdout, stderr)

    def _answer(self, deadline: float) -> dict:
        """The next JSON line from the warm command, waiting until ``deadline``."""
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                raise subprocess.TimeoutExpired("tests.warm_command", left)
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the warm command ended (exit code {self.process.wait()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


WARM = _WarmCommand()


def warm() -> bool:
    """Whether commands run forked from the warm command (``PALAESTRA_TESTS_COLD=1``: fresh interpreters)."""
    return os.environ.get("PALAESTRA_TESTS_COLD") != "1"


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
