"""Structured output and tool calls through client libraries nobody here wrote: LangChain's
``ChatOpenAI`` (``with_structured_output`` by JSON schema and by function calling, ``bind_tools``)
and LiteLLM (``completion`` with ``response_format`` and ``tools``, ``embedding``), against a real
server on 127.0.0.1 serving SmolLM2 and Gemma 3. LiteLLM reads its model price list from the package
(``LITELLM_LOCAL_MODEL_COST_MAP``), so nothing leaves the machine."""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import LiveServer
from tests.server.test_openai_features import ADD, SCHEMA_OF, WEATHER

TIMEOUT_S = 300.0


class City(BaseModel):
    """A city and the country it is in."""

    city: str = Field(max_length=24)
    country: str = Field(max_length=24)
    size: Literal["small", "medium", "large"]


@pytest.fixture
def served(real_model_server: LiveServer) -> LiveServer:
    return real_model_server


def langchain_model(served: LiveServer) -> Any:
    langchain_openai = pytest.importorskip("langchain_openai")
    options = {"temperature": 0, "max_tokens": 80, "timeout": TIMEOUT_S, "max_retries": 0}
    return langchain_openai.ChatOpenAI(
        model=served.model_name, base_url=served.v1, api_key="unused", **options
    )


def test_langchain_structured_output_by_schema_and_by_function_call(served: LiveServer) -> None:
    model = langchain_model(served)
    question = "Paris: which city, which country, how big?"
    by_schema = model.with_structured_output(City).invoke(question)  # response_format json_schema, strict
    by_call = model.with_structured_output(City, method="function_calling").invoke(question)  # a named tool
    for answer in (by_schema, by_call):
        assert isinstance(answer, City)


def test_langchain_bind_tools_returns_valid_calls(served: LiveServer) -> None:
    model = langchain_model(served).bind_tools([WEATHER, ADD], tool_choice="get_weather")
    message = model.invoke("What is the weather in Rome?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(call["args"], SCHEMA_OF["get_weather"])


def litellm_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price list fetched at import
    litellm = pytest.importorskip("litellm")
    litellm.telemetry = False
    return litellm


def test_litellm_response_format_tools_and_embeddings(
    served: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    litellm = litellm_module(monkeypatch)
    common: dict[str, Any] = {"model": f"openai/{served.model_name}", "api_base": served.v1,
                              "api_key": "unused", "temperature": 0, "max_tokens": 80,
                              "timeout": TIMEOUT_S}  # fmt: skip
    schema = City.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    ask_city = [{"role": "user", "content": "Name a big city."}]
    reply = litellm.completion(messages=ask_city, response_format=fmt, **common)
    City.model_validate(json.loads(reply.choices[0].message.content))
    ask_weather = [{"role": "user", "content": "Weather in Oslo?"}]
    reply = litellm.completion(messages=ask_weather, tools=[WEATHER, ADD], tool_choice="required",
                               parallel_tool_calls=False, **common)  # fmt: skip
    (call,) = reply.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
    vectors = litellm.embedding(model=f"openai/{served.model_name}", api_base=served.v1, api_key="unused",
                                input=["hello", "world"], timeout=TIMEOUT_S)  # fmt: skip
    assert [len(item["embedding"]) for item in vectors.data] == [served.engine.model.config.hidden_size] * 2
