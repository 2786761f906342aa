"""RemoteEngine against real servers on 127.0.0.1: ``smallmind serve`` in a subprocess (greedy replies
equal the local engine's, streaming, cancel, auth, models) and hand-written servers that fail (busy
with Retry-After, a stream cut mid-reply, silence), plus refused connections, DNS and TLS failures.
Every failure must end its request within its timeout with a message naming the endpoint and cause.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine import BatchedInferenceEngine, GenerationEvent, InferenceOptions
from engine.constraints import Constraint
from engine.errors import RemoteEngineError
from engine.remote import RemoteEngine
from tests.fixtures.http_faults import STREAM_HEAD, delta, fault_server, sse_chunk, status, whole_stream
from tests.fixtures.served import smallmind_serve
from tests.server.conftest import make_engine, wait_until
from tests.server.test_serve_cli import KEY, free_port

TIMEOUT_S = 60.0
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY = InferenceOptions(temperature=0.0, max_new_tokens=40)


@pytest.fixture(scope="module")
def served(long_context_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``smallmind serve`` on a free loopback port, with an API key; yields its base URL (no /v1)."""
    with smallmind_serve(long_context_model, KEY, tmp_path_factory.mktemp("served")) as url:
        yield url


@pytest.fixture(scope="module")
def local_engine(long_context_model: Path) -> Iterator[BatchedInferenceEngine]:
    engine = make_engine(long_context_model, max_batch_wait_ms=0)
    yield engine
    engine.stop()


@pytest.fixture
def remote(served: str) -> Iterator[RemoteEngine]:
    engine = RemoteEngine(served, model="tiny_long", api_key=KEY, timeout_s=30, name="test server")
    yield engine
    engine.stop()


def finished_with(url: str, reason: str) -> float:
    """How many chat requests the server counted as ended with ``reason`` (its /metrics)."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT_S).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("smallmind_server_requests_finished") and f'finish_reason="{reason}"' in line
    )


# every option the request carries: a seeded sampled reply is the same on both sides too
SAMPLED = InferenceOptions(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                           seed=11, max_new_tokens=50, stop_on_eos=False)  # fmt: skip


# -- against smallmind serve ----------------------------------------------------------------------
@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_replies_equal_the_local_engines(
    remote: RemoteEngine, local_engine: BatchedInferenceEngine, options: InferenceOptions
) -> None:
    local = local_engine.submit(MESSAGES, options).result(TIMEOUT_S)
    got = remote.submit(MESSAGES, options).result(TIMEOUT_S)
    assert got.error is None
    assert got.text == local.text and got.text
    assert got.finish_reason == local.finish_reason
    assert got.generated_tokens == local.generated_tokens == options.max_new_tokens  # the server's usage
    assert got.prompt_tokens == local.prompt_tokens
    assert got.ttft_ms is not None and 0 < got.ttft_ms < got.total_ms
    assert got.decode_tokens_per_s > 0


def test_plain_text_prompt_uses_completions(
    remote: RemoteEngine, local_engine: BatchedInferenceEngine
) -> None:
    local = local_engine.submit("Once upon a time", GREEDY).result(TIMEOUT_S)
    got = remote.submit("Once upon a time", GREEDY).result(TIMEOUT_S)
    assert got.text == local.text and got.finish_reason == local.finish_reason


def test_streamed_text_equals_the_final_result(remote: RemoteEngine) -> None:
    events: list[GenerationEvent] = []
    options = InferenceOptions(temperature=0.8, seed=7, max_new_tokens=60)
    result = remote.submit(MESSAGES, options, session_id="conv-1", on_event=events.append).result(TIMEOUT_S)
    tokens = [e for e in events if e.kind == "token"]
    assert len(tokens) >= 2 and events[-1].kind == "done" and events[-1].result == result
    assert "".join(e.text for e in tokens) == result.text
    assert result.generated_tokens == 60 and result.finish_reason == "length"
    assert remote.metrics.snapshot().completed == 1


def test_cancel_mid_stream_ends_cancelled_and_the_server_sees_it(remote: RemoteEngine, served: str) -> None:
    before = finished_with(served, "cancelled")
    started = threading.Event()
    texts: list[str] = []

    def on_event(event: GenerationEvent) -> None:
        texts.append(event.text)
        if len(texts) >= 3:
            started.set()

    handle = remote.submit(MESSAGES, InferenceOptions(max_new_tokens=3000), on_event=on_event)
    assert started.wait(TIMEOUT_S)
    handle.cancel()
    result = handle.result(10)
    assert result.finish_reason == "cancelled" and result.error is None
    assert result.text.startswith("".join(texts[:3])) and result.text  # the partial reply is kept
    wait_until(lambda: finished_with(served, "cancelled") == before + 1, 10.0, "the server to count it")


def test_list_models_and_a_refused_key(served: str) -> None:
    assert RemoteEngine(served + "/v1", api_key=KEY).list_models() == ["tiny_long"]
    wrong = RemoteEngine(served, api_key="not-the-key", name="team box")
    with pytest.raises(
        RemoteEngineError, match=r"team box \(http://127\.0\.0\.1:\d+/v1\).*refused the API key"
    ):
        wrong.list_models()
    result = wrong.submit(MESSAGES, GREEDY).result(TIMEOUT_S)
    assert result.finish_reason == "error" and "401" in (result.error or "")
    assert "not-the-key" not in (result.error or "") and "not-the-key" not in repr(wrong)
    wrong.stop()


def test_unknown_model_is_a_clear_404(served: str) -> None:
    engine = RemoteEngine(served, model="llama-70b", api_key=KEY)
    result = engine.submit(MESSAGES, GREEDY).result(TIMEOUT_S)
    engine.stop()
    assert result.finish_reason == "error"
    assert "no model 'llama-70b'" in (result.error or "") and "404" in (result.error or "")
    assert served in (result.error or "")


def test_a_refused_request_leaves_the_others_alone(remote: RemoteEngine) -> None:
    running = remote.submit(MESSAGES, GREEDY)
    bad = remote.submit(MESSAGES, InferenceOptions(temperature=5.0)).result(TIMEOUT_S)  # the server says 400
    assert bad.finish_reason == "error" and "400" in (bad.error or "") and "temperature" in (bad.error or "")
    assert running.result(TIMEOUT_S).finish_reason == "length"


# -- connection failures --------------------------------------------------------------------------
def assert_fails_within(engine: RemoteEngine, limit_s: float, reason: str, *words: str) -> str:
    started = time.monotonic()
    result = engine.submit(MESSAGES, GREEDY).result(limit_s + 10)
    elapsed = time.monotonic() - started
    engine.stop()
    message = result.error or ""
    assert result.finish_reason == reason, message
    assert elapsed < limit_s, f"took {elapsed:.1f} s: {message}"
    assert engine.api_url in message
    for word in words:
        assert word in message
    return message


def test_connection_refused() -> None:
    port = free_port()  # bound and released: nothing listens there
    engine = RemoteEngine(f"http://127.0.0.1:{port}", connect_timeout_s=5)
    assert_fails_within(engine, 5, "error", "refused")


def test_unknown_host_name() -> None:
    engine = RemoteEngine("http://smallmind-no-such-host.invalid:8080/v1", connect_timeout_s=5)
    assert_fails_within(engine, 10, "error", "cannot be resolved")


def test_tls_to_a_plain_http_port(served: str) -> None:
    engine = RemoteEngine(served.replace("http://", "https://"), connect_timeout_s=5)
    assert_fails_within(engine, 10, "error", "TLS")


def test_a_server_that_never_answers_times_out() -> None:
    silent = threading.Event()
    with fault_server(lambda conn, n: silent.wait(30)) as server:
        engine = RemoteEngine(server.base_url, timeout_s=1.0)
        assert_fails_within(engine, 5, "timeout", "did not answer within 1 s")
        silent.set()


def test_max_time_ms_ends_a_slow_reply_as_timeout() -> None:
    def slow(conn: socket.socket, n: int) -> None:
        conn.sendall(STREAM_HEAD)
        for i in range(100):
            conn.sendall(sse_chunk(delta(f"w{i} ")))
            time.sleep(0.05)

    with fault_server(slow) as server:
        engine = RemoteEngine(server.base_url)
        result = engine.submit(MESSAGES, InferenceOptions(max_time_ms=500)).result(10)
        engine.stop()
    assert result.finish_reason == "timeout" and "max_time_ms=500" in (result.error or "")
    assert result.text.startswith("w0 w1 ")


def test_a_stream_cut_mid_reply_keeps_the_partial_text() -> None:
    def cut(conn: socket.socket, n: int) -> None:
        conn.sendall(STREAM_HEAD + sse_chunk(delta("Hello")) + sse_chunk(delta(" wor")))
        conn.shutdown(socket.SHUT_RDWR)

    with fault_server(cut) as server:
        message = assert_fails_within(RemoteEngine(server.base_url), 5, "error", "cut")
    assert "middle of the reply" in message or "ended before the reply finished" in message


def test_partial_text_of_a_cut_stream_is_in_the_result() -> None:
    def cut(conn: socket.socket, n: int) -> None:
        conn.sendall(STREAM_HEAD + sse_chunk(delta("Hello")) + sse_chunk(delta(" wor")) + b"0\r\n\r\n")

    with fault_server(cut) as server:
        engine = RemoteEngine(server.base_url)
        result = engine.submit(MESSAGES, GREEDY).result(10)
        engine.stop()
    assert result.finish_reason == "error" and result.text == "Hello wor"
    assert "ended before the reply finished (after 9 characters)" in (result.error or "")


@pytest.mark.parametrize(("code", "reason"), [(429, "Too Many Requests"), (503, "Service Unavailable")])
def test_busy_server_retry_after_is_honoured_once(code: int, reason: str) -> None:
    def busy_then_fine(conn: socket.socket, n: int) -> None:
        if n == 1:
            conn.sendall(status(code, reason, "queue is full", {"Retry-After": "1"}))
        else:
            conn.sendall(whole_stream(["Fine", " now."]))

    with fault_server(busy_then_fine) as server:
        engine = RemoteEngine(server.base_url)
        result = engine.submit(MESSAGES, GREEDY).result(15)
        engine.stop()
        assert len(server.requests) == 2 and server.requests[1] - server.requests[0] >= 0.95
    assert result.finish_reason == "stop" and result.text == "Fine now." and result.generated_tokens == 2


@pytest.mark.parametrize(("code", "reason"), [(429, "Too Many Requests"), (503, "Service Unavailable")])
def test_busy_server_twice_is_an_error_after_one_retry(code: int, reason: str) -> None:
    def always_busy(conn: socket.socket, n: int) -> None:
        conn.sendall(status(code, reason, "queue is full", {"Retry-After": "1"}))

    with fault_server(always_busy) as server:
        message = assert_fails_within(RemoteEngine(server.base_url), 5, "error", "busy", str(code))
        assert len(server.requests) == 2
    assert "queue is full" in message and "after waiting 1 s" in message


def test_error_chunk_mid_stream_is_an_error_with_the_servers_message() -> None:
    def fails(conn: socket.socket, n: int) -> None:
        error = {"error": {"message": "CUDA out of memory", "type": "server_error"}}
        conn.sendall(STREAM_HEAD + sse_chunk(delta("Hi")) + sse_chunk(error) + b"0\r\n\r\n")

    with fault_server(fails) as server:
        engine = RemoteEngine(server.base_url)
        result = engine.submit(MESSAGES, GREEDY).result(10)
        engine.stop()
    assert result.finish_reason == "error" and result.text == "Hi"
    assert "CUDA out of memory" in (result.error or "")


def test_bad_base_urls_are_refused_at_once() -> None:
    for url in ("localhost:8080", "ftp://host/v1", "http://", "http://h/v1?x=1"):
        with pytest.raises(ValueError, match="base URL"):
            RemoteEngine(url)
    assert RemoteEngine("http://h:1").api_url == "http://h:1/v1"
    assert RemoteEngine("http://h:1/api/v1/").api_url == "http://h:1/api/v1"


def test_stop_ends_requests_in_flight_with_a_clear_error() -> None:
    silent = threading.Event()
    with fault_server(lambda conn, n: silent.wait(30)) as server:
        engine = RemoteEngine(server.base_url, name="box")
        handle = engine.submit(MESSAGES, GREEDY)
        wait_until(lambda: len(server.requests) == 1, 10.0, "the request to arrive")
        engine.stop()
        result = handle.result(5)
        silent.set()
    assert (
        result.finish_reason == "error"
        and "box" in (result.error or "")
        and "stopped" in (result.error or "")
    )
    with pytest.raises(Exception, match="stopped"):
        engine.submit(MESSAGES, GREEDY)


def test_the_server_takes_llama_cpps_name_for_the_repetition_penalty(served: str) -> None:
    """RemoteEngine sends the penalty under both names; a SmallMind server reads llama.cpp's too."""
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": MESSAGES, "max_tokens": 30, "temperature": 0}

    def reply(**penalty: float) -> httpx.Response:
        return httpx.post(
            served + "/v1/chat/completions", json={**body, **penalty}, headers=auth, timeout=TIMEOUT_S
        )

    by_llama_name = reply(repeat_penalty=1.3).json()["choices"][0]["message"]["content"]
    assert by_llama_name == reply(repetition_penalty=1.3).json()["choices"][0]["message"]["content"]
    refused = reply(repeat_penalty=0.0)
    assert refused.status_code == 400 and "repeat_penalty" in refused.json()["error"]["message"]


def test_a_wrong_path_says_to_check_the_base_url(served: str) -> None:
    engine = RemoteEngine(served + "/api", api_key=KEY)  # the API is at /v1
    with pytest.raises(RemoteEngineError, match=r"nothing answers at this address \(404 Not Found\).*/v1"):
        engine.list_models()
    result = engine.submit(MESSAGES, GREEDY).result(TIMEOUT_S)
    engine.stop()
    assert result.finish_reason == "error" and "is the base URL right" in (result.error or "")


def test_a_retry_after_longer_than_the_cap_fails_at_once() -> None:
    def busy(conn: socket.socket, n: int) -> None:
        conn.sendall(status(503, "Service Unavailable", "model loading", {"Retry-After": "120"}))

    with fault_server(busy) as server:
        engine = RemoteEngine(server.base_url, max_retry_wait_s=5)
        message = assert_fails_within(engine, 5, "error", "model loading", "retry after 120 s")
        assert len(server.requests) == 1 and "503" in message


def test_a_schema_travels_to_the_remote_server_as_response_format(
    remote: RemoteEngine, local_engine: BatchedInferenceEngine
) -> None:
    """A tab with structured output on a remote SmallMind server: the reply matches the schema and is
    the one the local engine makes under the same constraint."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    options = InferenceOptions(temperature=0.0, max_new_tokens=40, repetition_penalty=1.0,
                               constraint=Constraint.json_schema(schema))  # fmt: skip
    remote_text = remote.submit(MESSAGES, options).result(TIMEOUT_S).text
    assert remote_text == local_engine.submit(MESSAGES, options).result(TIMEOUT_S).text
    assert set(json.loads(remote_text)) == {"n"}
    regex = InferenceOptions(constraint=Constraint.regex("[0-9]+"), max_new_tokens=4)
    with pytest.raises(ValueError, match="JSON schema"):  # refused at once: OpenAI's API has no regex
        remote.submit(MESSAGES, regex)
