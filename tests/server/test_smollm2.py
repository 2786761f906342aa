"""The API with the real SmolLM2-135M model: greedy replies equal the engine's, the cache is reused."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from engine import BatchedInferenceEngine, InferenceOptions, SessionId
from tests.server.conftest import LiveServer, live_server, make_engine

pytestmark = pytest.mark.smollm2
TIMEOUT_S = 300.0
NAME = "SmolLM2-135M-Instruct"
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def smollm2_server(smollm2_path: Path) -> Iterator[LiveServer]:
    engine = make_engine(smollm2_path)
    with live_server(engine, NAME) as server:
        yield server
    engine.stop()


@pytest.fixture
def client(smollm2_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=smollm2_server.v1, api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def engine_reply(engine: BatchedInferenceEngine, question: str, max_new_tokens: int) -> str:
    # the server follows OpenAI's defaults: no repetition penalty unless the request asks
    options = InferenceOptions(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    messages = [{"role": "user", "content": question}]
    return engine.submit(messages, options, SessionId.new_id()).result(TIMEOUT_S).text


def test_concurrent_greedy_replies_equal_the_engines_own(
    client: openai.OpenAI, smollm2_server: LiveServer
) -> None:
    def ask(question: str) -> str:
        stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                                max_tokens=16, temperature=0, stream=True)  # fmt: skip
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        replies = list(pool.map(ask, QUESTIONS))
    for question, reply in zip(QUESTIONS, replies, strict=True):
        assert reply == engine_reply(smollm2_server.engine, question, 16)
    assert "Paris" in replies[0]


def test_second_turn_reuses_the_first(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me a fact about the sea."}]
    first = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                 {"role": "user", "content": "And one about the sky?"}]  # fmt: skip
    second = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and (details.cached_tokens or 0) >= first.usage.prompt_tokens
