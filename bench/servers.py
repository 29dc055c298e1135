"""Starting a server process for a bench: a free port, then the process once it answers (the rollout benches')."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx

__all__ = ["free_port", "start_server"]


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(command: list[str], port: int, log_path: Path, *, ready_path: str = "/v1/models", timeout_s: float = 300,
                 **popen) -> tuple[subprocess.Popen, str]:
    """Start ``command`` (a server listening on ``port``, its output to ``log_path``); the process and its URL once
    ``GET ready_path`` answers 200. Exits with a line naming the log when it does not within ``timeout_s``."""
    process = subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}{ready_path}").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{command[0]} {command[1] if len(command) > 1 else ''} did not start; see {log_path}")
