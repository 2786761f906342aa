"""The API through the official ``openai`` client, against a real engine (tiny model) on 127.0.0.1."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from engine import BatchedInferenceEngine, InferenceOptions, SessionId
from tests.server.conftest import TINY_NAME, LiveServer

TIMEOUT_S = 60.0
QUESTION = [{"role": "user", "content": "What is the weather like in the city?"}]


@pytest.fixture
def client(tiny_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.v1, api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def engine_reply(engine: BatchedInferenceEngine, messages: Any, max_new_tokens: int) -> str:
    # the server follows OpenAI's defaults: no repetition penalty unless the request asks
    options = InferenceOptions(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    return engine.submit(messages, options, SessionId.new_id()).result(TIMEOUT_S).text


def test_models_lists_the_one_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [TINY_NAME]


def test_greedy_reply_equals_the_engines_own(
    client: openai.OpenAI, tiny_engine: BatchedInferenceEngine
) -> None:
    reply = client.chat.completions.create(model=TINY_NAME, messages=QUESTION, max_tokens=24, temperature=0)
    choice = reply.choices[0]
    assert choice.message.content == engine_reply(tiny_engine, QUESTION, 24)
    assert choice.message.role == "assistant"
    assert reply.usage is not None
    n_prompt = len(tiny_engine.tokenizer.encode_messages(QUESTION, add_generation_prompt=True))
    assert reply.usage.prompt_tokens == n_prompt
    assert 1 <= reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == n_prompt + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 24
    assert choice.finish_reason in ("stop", "length")


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=TINY_NAME, messages=QUESTION, max_completion_tokens=5, temperature=0, stop=None
    )
    assert reply.usage is not None and reply.usage.completion_tokens <= 5


def test_streamed_text_equals_the_non_streamed_reply(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": TINY_NAME, "messages": QUESTION, "max_tokens": 30, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert whole.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )


def test_stream_without_include_usage_sends_no_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model=TINY_NAME, messages=QUESTION, max_tokens=4, stream=True)
    )
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_resent_growing_conversation_reuses_the_cache(client: openai.OpenAI) -> None:
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful assistant."}]
    previous_prompt = 0
    for turn, text in enumerate(["Hello! How are you today?", "Why is the sky blue?", "Thank you."]):
        messages.append({"role": "user", "content": text})
        reply = client.chat.completions.create(
            model=TINY_NAME, messages=messages, max_tokens=12, temperature=0
        )
        usage = reply.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        cached = usage.prompt_tokens_details.cached_tokens or 0
        if turn > 0:  # everything the previous turn's prompt held is reused, without a session id
            assert cached >= previous_prompt, (turn, cached, previous_prompt)
            assert cached < usage.prompt_tokens
        previous_prompt = usage.prompt_tokens
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})


def test_user_field_and_session_header_pin_a_session(
    tiny_server: LiveServer, tiny_engine: BatchedInferenceEngine
) -> None:
    body = {"model": TINY_NAME, "messages": QUESTION, "max_tokens": 3, "user": "alice"}
    assert httpx.post(tiny_server.v1 + "/chat/completions", json=body, timeout=TIMEOUT_S).status_code == 200
    headers = {"X-Session-Id": "tab-7"}
    body = {"model": TINY_NAME, "prompt": "Hello", "max_tokens": 3}
    response = httpx.post(tiny_server.v1 + "/completions", json=body, headers=headers, timeout=TIMEOUT_S)
    assert response.status_code == 200
    sessions = {info.session_id.value for info in tiny_engine.store.sessions()}
    assert {"api-user:alice", "api-user:tab-7"} <= sessions


def test_completions_greedy_equals_the_engine(
    client: openai.OpenAI, tiny_engine: BatchedInferenceEngine
) -> None:
    prompt = "The sea is wide and the waves are"
    reply = client.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=10, temperature=0)
    assert reply.choices[0].text == engine_reply(tiny_engine, prompt, 10)
    streamed = client.completions.create(
        model=TINY_NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_concurrent_requests_are_batched_and_each_equals_its_own_run(
    client: openai.OpenAI, tiny_engine: BatchedInferenceEngine
) -> None:
    questions = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(6)]
    steps_before = tiny_engine.metrics.snapshot()

    def ask(i: int) -> str:
        if i % 2:
            stream = client.chat.completions.create(
                model=TINY_NAME, messages=questions[i], max_tokens=40, temperature=0, stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        reply = client.chat.completions.create(
            model=TINY_NAME, messages=questions[i], max_tokens=40, temperature=0
        )
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(len(questions)) as pool:
        replies = list(pool.map(ask, range(len(questions))))
    after = tiny_engine.metrics.snapshot()
    assert after.max_batch_size_seen >= 2  # they shared forward passes
    assert after.completed - steps_before.completed >= len(questions)
    for question, reply in zip(questions, replies, strict=True):
        assert reply == engine_reply(tiny_engine, question, 40)


def test_tokenize_counts_like_the_engine(
    tiny_server: LiveServer, tiny_engine: BatchedInferenceEngine
) -> None:
    body = {"messages": QUESTION}
    data = httpx.post(tiny_server.base_url + "/tokenize", json=body, timeout=TIMEOUT_S).json()
    expected = list(tiny_engine.tokenizer.encode_messages(QUESTION, add_generation_prompt=True))
    assert data == {"tokens": expected, "count": len(expected), "max_model_len": 256}


def test_metrics_page_has_cache_and_batching_figures(tiny_server: LiveServer, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=TINY_NAME, messages=QUESTION, max_tokens=2)
    response = httpx.get(tiny_server.base_url + "/metrics", timeout=TIMEOUT_S)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    expected = ["smallmind_kv_cache_hit_rate", "smallmind_kv_cache_reused_tokens",
                "smallmind_kv_cache_current_bytes", "smallmind_batching_average_batch_size",
                "smallmind_batching_average_batch_wait_ms", "smallmind_batching_average_queue_depth",
                "smallmind_batching_tokens_per_second", "smallmind_batching_cancelled",
                "smallmind_batching_preemptions", "smallmind_batching_waiting_for_memory"]  # fmt: skip
    for name in expected:
        assert name in values, name
    assert (
        values["smallmind_batching_preemptions"] == 0 and values["smallmind_batching_waiting_for_memory"] == 0
    )
    assert values["smallmind_kv_cache_current_bytes"] > 0
    finished = [n for n in values if n.startswith('smallmind_server_requests_finished{endpoint="chat"')]
    assert finished and sum(values[n] for n in finished) >= 1
