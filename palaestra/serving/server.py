"""Run the API with uvicorn: in the foreground (``palaestra serve``) or on a thread (tests, notebooks, benchmarks).

:class:`BackgroundServer` binds its socket before it starts (port 0: a free port, known at once),
runs uvicorn on a thread and waits for ``/health`` to say the models are loaded.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

__all__ = ["BackgroundServer"]


class BackgroundServer:
    """``with BackgroundServer(app) as server: OpenAI(base_url=server.url + "/v1", api_key="-")``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True,
                                       name="palaestra-uvicorn")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> "BackgroundServer":
        """Start serving and wait until ``/health`` answers 200 (raises RuntimeError if loading fails)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"{self.url}/health", timeout=5)
                if response.status_code == 200:
                    return self
                if response.json().get("status") == "failed":
                    self.stop()
                    raise RuntimeError(f"the server could not load its models: {response.json().get('error')}")
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server did not become ready within {timeout:.0f} s")

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.socket.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
