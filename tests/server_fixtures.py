"""Fixtures of the server tests: a real uvicorn server on 127.0.0.1, on a free port, in a thread.

Import the fixtures into a test module (`from server_fixtures import micro_server`); pytest puts
the tests folder on sys.path.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from flashserve import LLMEngine
from flashserve.server.api import build_app

MICRO_NAME = "micro"
MICRO_OPTIONS = {"num_kv_blocks": 64, "block_size": 16, "max_model_len": 128, "max_num_seqs": 64, "seed": 0}


class RunningServer:
    """The flashserve app served by uvicorn in a background thread until `stop()`."""

    def __init__(self, engine: LLMEngine, served_model_names: list[str]):
        self.engine = engine
        self.model = served_model_names[0]
        self.app = build_app(engine, served_model_names)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def start(self, timeout_s: float = 30.0) -> RunningServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on port {self.port} did not start within {timeout_s} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._socket.close()

    def stats(self, since_step: int = -1) -> dict:
        response = httpx.get(f"{self.url}/v1/stats", params={"since_step": since_step}, timeout=10)
        response.raise_for_status()
        return response.json()

    def wait_idle(self, timeout_s: float = 10.0) -> dict:
        """Poll /v1/stats until no request runs or waits and no KV block is used; return the stats."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.stats()
            if stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_blocks_used"] == 0:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not become idle within {timeout_s} s: {stats}")
            time.sleep(0.05)


def start_server(model: str, name: str, **options) -> RunningServer:
    return RunningServer(LLMEngine(model=model, **options), [name]).start()


@pytest.fixture(scope="module")
def micro_server(micro_llama) -> Iterator[RunningServer]:
    """A server of the micro test model, named "micro", with a 64-block cache and max_model_len 128."""
    server = start_server(micro_llama, MICRO_NAME, **MICRO_OPTIONS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stories_server(stories260k) -> Iterator[RunningServer]:
    """A server of the trained stories260K model, named "stories"; skipped where it is absent."""
    server = start_server(stories260k, "stories", num_kv_blocks=128, seed=0)
    yield server
    server.stop()
