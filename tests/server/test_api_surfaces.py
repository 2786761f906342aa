"""Every row of issue 26's table through both ways a user runs the API: ``smallmind serve`` (a real
subprocess, with an API key) and the in-app server (``BackgroundServer`` beside an engine, as the
window runs it). The tiny model (4,096-token context: the tools' description alone is ~400 tokens)
has random weights: what is structured is structured by the mask."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from smallmind_server.background import BackgroundServer
from tests.fixtures.served import smallmind_serve
from tests.server.conftest import TINY_NAME, make_engine

TIMEOUT_S = 120.0
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "tag": {"enum": ["a", "b"]}},
          "required": ["n", "tag"], "additionalProperties": False}  # fmt: skip
TOOL = {"type": "function", "function": {"name": "pick", "parameters": SCHEMA}}
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(params=["smallmind serve", "in-app server"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[openai.OpenAI]:
    if request.param == "smallmind serve":
        with smallmind_serve(request.getfixturevalue("long_context_model"), "k3y", tmp_path) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key="k3y", timeout=TIMEOUT_S, max_retries=0)
        return
    engine = make_engine(request.getfixturevalue("long_context_model"), max_batch_wait_ms=2.0)
    server = BackgroundServer(engine, TINY_NAME)
    url = server.start(port=0)
    try:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    finally:
        server.stop()
        engine.stop()


def model_of(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_every_row_of_the_table(client: openai.OpenAI) -> None:
    model = model_of(client)

    def chat(**kwargs: Any) -> Any:
        return client.chat.completions.create(
            **{"model": model, "messages": HELLO, "max_tokens": 40, **kwargs}
        )

    reply = chat(response_format={"type": "json_object"}, temperature=0.9, seed=1, max_completion_tokens=200)
    assert reply.choices[0].finish_reason == "length" or isinstance(
        json.loads(reply.choices[0].message.content), dict
    )
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}
    jsonschema.validate(
        json.loads(chat(response_format=fmt, temperature=0).choices[0].message.content), SCHEMA
    )
    for choice in ("required", {"type": "function", "function": {"name": "pick"}}):
        reply = chat(tools=[TOOL], tool_choice=choice, parallel_tool_calls=False, max_tokens=120)
        assert reply.choices[0].finish_reason == "tool_calls"
        (call,) = reply.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    cut = chat(tools=[TOOL], tool_choice="required", max_tokens=10).choices[0]
    assert cut.finish_reason == "length"  # a call cut short is not reported as a finished call
    entries = chat(logprobs=True, top_logprobs=3, max_tokens=4).choices[0].logprobs.content
    assert len(entries) == 4 and all(len(e.top_logprobs) == 3 for e in entries)
    assert chat(presence_penalty=1.0, frequency_penalty=0.5, logit_bias={"5": -100}, max_tokens=4).choices
    choices = chat(n=2, temperature=1.0, seed=3, max_tokens=4).choices
    assert [c.index for c in choices] == [0, 1]
    completion = client.completions.create(
        model=model, prompt=["one", "two"], max_tokens=3, echo=True, logprobs=2
    )
    assert [c.text[:3] for c in completion.choices] == ["one", "two"]
    vectors = client.embeddings.create(model=model, input=["a", "b"]).data
    assert len(vectors) == 2 and len(vectors[0].embedding) > 0
