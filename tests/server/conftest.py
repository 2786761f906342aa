"""Server-test fixtures: a real engine (tiny model, or SmolLM2) served by a real uvicorn on 127.0.0.1.

The server runs in a thread of the test process on a socket bound beforehand to a free port, so the
tests can read the engine's own metrics and compare against the engine run directly.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from engine import BatchedInferenceEngine, BatchingOptions, GgufFile, Model, Tokenizer
from smallmind_server import create_app
from tests.fixtures.tiny_model import write_tiny_gguf

START_TIMEOUT_S = 30.0
TINY_NAME = "tiny"


@dataclass
class LiveServer:
    engine: BatchedInferenceEngine
    base_url: str  # http://127.0.0.1:PORT
    model_name: str
    api_key: str | None = None

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"


@contextlib.contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"


def make_engine(path: Path, **batching: Any) -> BatchedInferenceEngine:
    f = GgufFile(path)
    engine = BatchedInferenceEngine(Model.from_gguf(f), Tokenizer.from_gguf(f), BatchingOptions(**batching))
    engine.start()
    return engine


@contextlib.contextmanager
def live_server(engine: BatchedInferenceEngine, name: str, **app_options: Any) -> Iterator[LiveServer]:
    app = create_app(engine, name, **app_options)
    with serve_app(app) as url:
        yield LiveServer(engine, url, name, app_options.get("api_key"))


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_path: Path) -> Iterator[BatchedInferenceEngine]:
    engine = make_engine(tiny_model_path, max_batch_wait_ms=2.0)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def tiny_server(tiny_engine: BatchedInferenceEngine) -> Iterator[LiveServer]:
    with live_server(tiny_engine, TINY_NAME, max_tokens_cap=240) as server:
        yield server


@pytest.fixture(scope="session")
def long_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 4,096-token context: room for replies long enough to interrupt."""
    return write_tiny_gguf(tmp_path_factory.mktemp("long") / "tiny_long.gguf", context_length=4096)


def wait_until(condition: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition()`` every 10 ms; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(
    scope="session",
    params=[
        pytest.param("smollm2", marks=pytest.mark.smollm2),
        pytest.param("gemma3", marks=pytest.mark.gemma3),
    ],
)
def real_model_server(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """SmolLM2 or Gemma 3 served on 127.0.0.1, once per test session for every module that uses it
    (the API feature tests with the openai client and with LangChain/LiteLLM)."""
    path: Path = request.getfixturevalue(f"{request.param}_path")
    engine = make_engine(path, max_batch_wait_ms=5.0)
    with live_server(engine, request.param) as server:
        yield server
    engine.stop()
