"""Every refusal in OpenAI's error shape, with the right status, over raw HTTP (httpx)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import BatchedInferenceEngine
from smallmind_server import create_app
from tests.server.conftest import TINY_NAME, LiveServer, live_server, make_engine, serve_app, wait_until

TIMEOUT_S = 60.0
MESSAGES = [{"role": "user", "content": "Hello!"}]


def post(server: LiveServer, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(server.v1 + path, json=body, timeout=TIMEOUT_S, **kwargs)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


def test_bad_json_is_400(tiny_server: LiveServer) -> None:
    response = httpx.post(
        tiny_server.v1 + "/chat/completions",
        content=b'{"messages": [',
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT_S,
    )
    assert "JSON" in error_of(response, 400)["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 5), ("top_p", 1.5), ("max_tokens", 0), ("seed", -1), ("n", 0), ("n", 17), ("top_k", -3),
     ("frequency_penalty", 2.5), ("presence_penalty", -3), ("logit_bias", {"x": 1}), ("top_logprobs", 21),
     ("stop", ["a", "b", "c", "d", "e"]), ("bogus_field", 1), ("audio", {}), ("prediction", {})],
)  # fmt: skip
def test_unknown_or_out_of_range_fields_are_400_naming_the_field(
    tiny_server: LiveServer, field: str, value: Any
) -> None:
    error = error_of(post(tiny_server, "/chat/completions", {"messages": MESSAGES, field: value}), 400)
    assert error["param"] == field
    assert field in error["message"]


def test_bad_messages_are_400(tiny_server: LiveServer) -> None:
    for messages in ([], [{"role": "robot", "content": "hi"}], [{"role": "user", "content": "  "}]):
        error_of(post(tiny_server, "/chat/completions", {"messages": messages}), 400)


def test_prompt_over_the_context_is_400_with_both_numbers(tiny_server: LiveServer) -> None:
    long_text = "the sea is wide " * 200  # far more than the tiny model's 256-token context
    error = error_of(
        post(tiny_server, "/chat/completions", {"messages": [{"role": "user", "content": long_text}]}), 400
    )
    assert error["code"] == "context_length_exceeded"
    assert "256" in error["message"]
    n_tokens = [int(w) for w in error["message"].replace("(", " ").split() if w.isdigit()]
    assert any(n > 256 for n in n_tokens), error["message"]
    error = error_of(post(tiny_server, "/completions", {"prompt": long_text}), 400)
    assert error["code"] == "context_length_exceeded"


def test_prompt_plus_max_tokens_over_the_context_is_400(tiny_server: LiveServer) -> None:
    error = error_of(post(tiny_server, "/chat/completions", {"messages": MESSAGES, "max_tokens": 240}), 400)
    assert error["code"] == "context_length_exceeded"
    assert "240 in the completion" in error["message"] and "256" in error["message"]


def test_max_tokens_over_the_servers_cap_is_400(tiny_server: LiveServer) -> None:
    error = error_of(post(tiny_server, "/completions", {"prompt": "Hi", "max_tokens": 241}), 400)
    assert error["param"] == "max_tokens" and "240" in error["message"]


def test_unknown_model_is_404(tiny_server: LiveServer) -> None:
    error = error_of(post(tiny_server, "/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    error = error_of(
        post(tiny_server, "/chat/completions", {"model": "/etc/passwd", "messages": MESSAGES}), 404
    )
    error_of(httpx.get(tiny_server.base_url + "/v1/nothing-here", timeout=TIMEOUT_S), 404)


def test_api_key_missing_or_wrong_is_401(tiny_engine: BatchedInferenceEngine) -> None:
    with live_server(tiny_engine, TINY_NAME, api_key="s3cret") as server:
        body = {"messages": MESSAGES, "max_tokens": 2}
        assert error_of(post(server, "/chat/completions", body), 401)["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer nope"}
        error_of(post(server, "/chat/completions", body, headers=wrong), 401)
        error_of(httpx.get(server.v1 + "/models", timeout=TIMEOUT_S), 401)
        error_of(httpx.get(server.base_url + "/metrics", timeout=TIMEOUT_S), 401)
        right = {"Authorization": "Bearer s3cret"}
        assert post(server, "/chat/completions", body, headers=right).status_code == 200
        assert httpx.get(server.base_url + "/health", timeout=TIMEOUT_S).status_code == 200


def test_oversized_body_is_413(tiny_engine: BatchedInferenceEngine) -> None:
    with live_server(tiny_engine, TINY_NAME, max_body_bytes=2_000) as server:
        body = {"messages": [{"role": "user", "content": "x" * 3_000}]}
        assert error_of(post(server, "/chat/completions", body), 413)["code"] == "request_too_large"

        def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield json.dumps(body).encode()

        response = httpx.post(server.v1 + "/chat/completions", content=chunked(), timeout=TIMEOUT_S)
        error_of(response, 413)
        assert post(server, "/chat/completions", {"messages": MESSAGES, "max_tokens": 2}).status_code == 200


def test_full_queue_is_429_with_retry_after(long_context_model: Path) -> None:
    engine = make_engine(
        long_context_model, max_batch_size=1, max_total_queued_requests=1, max_batch_wait_ms=0
    )
    try:
        with live_server(engine, TINY_NAME) as server, httpx.Client(timeout=TIMEOUT_S) as http:
            body = {"messages": MESSAGES, "max_tokens": 3000, "temperature": 0, "stream": True}
            request = http.build_request("POST", server.v1 + "/chat/completions", json=body)
            first = http.send(request, stream=True)
            wait_until(lambda: engine.metrics.snapshot().running == 1, what="the first request running")
            second = http.send(
                http.build_request("POST", server.v1 + "/chat/completions", json=body), stream=True
            )
            assert engine.metrics.snapshot().queue_depth == 1
            third = post(server, "/chat/completions", body)
            error = error_of(third, 429)
            assert error["code"] == "queue_full" and third.headers["retry-after"] == "1"
            assert (first.status_code, second.status_code) == (200, 200)
            first.close()  # both clients leave: both requests end cancelled
            second.close()
            wait_until(lambda: engine.metrics.snapshot().cancelled == 2, what="both requests cancelled")
    finally:
        engine.stop()


def test_health_is_503_while_loading_then_200(tiny_engine: BatchedInferenceEngine) -> None:
    app = create_app(None, TINY_NAME)
    with serve_app(app) as url:
        assert httpx.get(url + "/health", timeout=TIMEOUT_S).status_code == 503
        response = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES}, timeout=TIMEOUT_S)
        assert error_of(response, 503)["code"] == "model_loading"
        app.state.server.attach(tiny_engine)
        assert httpx.get(url + "/health", timeout=TIMEOUT_S).json() == {"status": "ok"}
