"""A client that leaves cancels its request: the engine counts a cancel and stops generating for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine import BatchedInferenceEngine
from tests.server.conftest import TINY_NAME, LiveServer, live_server, make_engine, wait_until

TIMEOUT_S = 60.0
MAX_TOKENS = 3000  # far more than the tests wait for: only a cancel ends these requests early
BODY = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": MAX_TOKENS,
        "temperature": 0}  # fmt: skip


@pytest.fixture(scope="module")
def long_server(long_context_model: Path) -> Iterator[LiveServer]:
    engine = make_engine(long_context_model, max_batch_wait_ms=0)
    with live_server(engine, TINY_NAME) as server:
        yield server
    engine.stop()


def finished_cancelled(server: LiveServer) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=TIMEOUT_S).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("smallmind_server_requests_finished") and 'finish_reason="cancelled"' in line
    )


def assert_cancelled_promptly(engine: BatchedInferenceEngine, cancelled_before: int) -> None:
    wait_until(lambda: engine.metrics.snapshot().cancelled == cancelled_before + 1, 10.0, "the cancel")
    wait_until(lambda: engine.metrics.snapshot().running == 0, 10.0, "the engine to go idle")
    generated = engine.metrics.snapshot().generated_tokens
    assert generated < MAX_TOKENS  # it never ran to its end


def test_client_leaving_a_stream_cancels_its_request(long_server: LiveServer) -> None:
    engine = long_server.engine
    before = engine.metrics.snapshot()
    with httpx.stream("POST", long_server.v1 + "/chat/completions", json={**BODY, "stream": True},
                      timeout=TIMEOUT_S) as response:  # fmt: skip
        lines = response.iter_lines()
        data = [line for line, _ in zip(lines, range(8), strict=False) if line.startswith("data:")]
        assert len(data) >= 3  # tokens were streaming
    assert_cancelled_promptly(engine, before.cancelled)
    assert finished_cancelled(long_server) >= 1


def test_client_leaving_a_non_streamed_request_cancels_it(long_server: LiveServer) -> None:
    engine = long_server.engine
    before = engine.metrics.snapshot()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes the connection
        httpx.post(
            long_server.v1 + "/chat/completions", json=BODY, timeout=httpx.Timeout(TIMEOUT_S, read=0.5)
        )
    assert_cancelled_promptly(engine, before.cancelled)
    assert engine.metrics.snapshot().generated_tokens - before.generated_tokens < MAX_TOKENS
