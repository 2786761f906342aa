"""The API that clients expect, through the real ``openai`` client against a real server on 127.0.0.1,
on SmolLM2 and on Gemma 3 (one served model per module run): structured output for 20 schemas, tool
calls (forced, named, auto, streamed, results sent back), logprobs equal to the model's own
log-softmax, penalties and logit_bias, n choices equal to separately seeded requests, several
prompts, echo, and embeddings equal to a NumPy pooling of the model's hidden states."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from engine.logprobs import log_softmax
from engine.model import Row
from tests.server.conftest import LiveServer
from tests.server.schemas import SCHEMAS

TIMEOUT_S = 300.0
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "maxLength": 20},
                                      "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}  # fmt: skip
ADD = {
    "type": "function",
    "function": {"name": "add", "description": "Add two whole numbers",
                 "parameters": {"type": "object", "properties": {"a": {"type": "integer", "maximum": 999},
                                                                 "b": {"type": "integer", "maximum": 999}},
                                "required": ["a", "b"], "additionalProperties": False}},
}  # fmt: skip
TOOLS = [WEATHER, ADD]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def served(real_model_server: LiveServer) -> LiveServer:
    return real_model_server


@pytest.fixture
def client(served: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.v1, api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def chat(client: openai.OpenAI, served: LiveServer, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=served.model_name, **kwargs)


def chats(client: openai.OpenAI, served: LiveServer, *requests: dict[str, Any]) -> list[Any]:
    """Several chat requests at once (they share forward passes; the test waits once)."""
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda kwargs: chat(client, served, **kwargs), requests))


# -- response_format ------------------------------------------------------------------------------------
def test_twenty_schemas_give_output_that_validates(client: openai.OpenAI, served: LiveServer) -> None:
    def ask(case: tuple[str, dict[str, Any]]) -> tuple[dict[str, Any], str, str]:
        question, schema = case
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        reply = chat(client, served, messages=[{"role": "user", "content": question}], response_format=fmt,
                     max_tokens=120, temperature=0)  # fmt: skip
        return schema, reply.choices[0].message.content or "", reply.choices[0].finish_reason

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # batched together
        replies = list(pool.map(ask, SCHEMAS))
    for schema, text, finish in replies:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_json_object_is_always_an_object(client: openai.OpenAI, served: LiveServer) -> None:
    """Sampled at temperature 0.7: the grammar keeps every reply a JSON object (whether a small model
    stops in time is its own affair: these seeds do, on both models)."""
    common = {"messages": [{"role": "user", "content": "List two colors as JSON."}],
              "response_format": {"type": "json_object"}, "max_tokens": 120, "temperature": 0.7}  # fmt: skip
    for reply in chats(client, served, {**common, "seed": 0}, {**common, "seed": 1}):
        assert reply.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_response_format_text_and_client_only_fields_are_accepted(
    client: openai.OpenAI, served: LiveServer
) -> None:
    reply = chat(client, served, messages=ASK_WEATHER, response_format={"type": "text"}, max_tokens=4,
                 temperature=0,
                 user="u1", metadata={"app": "test"}, store=False, service_tier="auto")  # fmt: skip
    assert reply.choices[0].message.content


# -- tools ----------------------------------------------------------------------------------------------
def check_call(call: Any) -> dict[str, Any]:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMA_OF[call.function.name])
    assert call.id and call.type == "function"
    return {"name": call.function.name, "arguments": call.function.arguments}


def test_required_and_named_tool_calls_validate(client: openai.OpenAI, served: LiveServer) -> None:
    add = {"type": "function", "function": {"name": "add"}}
    required, named = chats(
        client, served,
        {"messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": "required", "max_tokens": 80,
         "temperature": 0, "parallel_tool_calls": False},
        {"messages": [{"role": "user", "content": "What is 12 plus 30?"}], "tools": TOOLS, "tool_choice": add,
         "max_tokens": 60, "temperature": 0},
    )  # fmt: skip
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0])
    (call,) = named.choices[0].message.tool_calls
    assert check_call(call)["name"] == "add"


def test_streamed_tool_call_deltas_reassemble_to_the_same_call(
    client: openai.OpenAI, served: LiveServer
) -> None:
    kwargs: dict[str, Any] = {"messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": "required",
                              "max_tokens": 160, "temperature": 0}  # fmt: skip
    with ThreadPoolExecutor(1) as pool:
        whole_reply = pool.submit(chat, client, served, **kwargs)
        chunks = list(chat(client, served, stream=True, **kwargs))
        whole = [check_call(c) for c in whole_reply.result().choices[0].message.tool_calls]
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in chunks:
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for delta in chunk.choices[0].delta.tool_calls or ():
            call = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
            if delta.function.name:
                call["name"] += delta.function.name
            call["arguments"] += delta.function.arguments or ""
        assert not chunk.choices[0].delta.content
    assert finish == "tool_calls"
    assert all(c["id"] for c in calls.values())
    assert [{"name": c["name"], "arguments": c["arguments"]} for _, c in sorted(calls.items())] == whole


def test_auto_lets_the_model_choose_and_tool_results_go_back(
    client: openai.OpenAI, served: LiveServer
) -> None:
    auto, forced_reply = chats(
        client, served,
        {"messages": ASK_WEATHER, "tools": TOOLS, "max_tokens": 40, "temperature": 0},
        {"messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": "required", "max_tokens": 80,
         "temperature": 0, "parallel_tool_calls": False},
    )  # fmt: skip
    message = auto.choices[0].message
    if message.tool_calls:
        assert auto.choices[0].finish_reason == "tool_calls"
        for call in message.tool_calls:
            check_call(call)
    else:
        assert message.content and not message.content.lstrip().startswith("<tool_call>")
    forced = forced_reply.choices[0].message
    history = [*ASK_WEATHER, forced.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": forced.tool_calls[0].id,
                "content": '{"celsius": 18}'}]  # fmt: skip
    answer = chat(
        client, served, messages=history, tools=TOOLS, tool_choice="none", max_tokens=16, temperature=0
    )
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


# -- logprobs ---------------------------------------------------------------------------------------------
def greedy_logprobs(
    server: LiveServer, prompt_ids: list[int], n_tokens: int, k: int
) -> list[tuple[int, np.ndarray]]:
    """(argmax id, log-softmax) per position, from the model run alone with a cache."""
    model = server.engine.model
    cache = model.new_cache(len(prompt_ids) + n_tokens)
    logits = model.forward(prompt_ids, cache)[-1]
    out = []
    for _ in range(n_tokens):
        lp = log_softmax(logits)
        token = int(np.argmax(lp))
        out.append((token, lp))
        logits = model.forward([token], cache)[-1]
    return out


def test_logprobs_equal_the_log_softmax_of_the_models_logits(
    client: openai.OpenAI, served: LiveServer
) -> None:
    messages = [{"role": "user", "content": "Name a large animal."}]
    reply = chat(
        client, served, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5
    )
    entries = reply.choices[0].logprobs.content
    tok = served.engine.tokenizer
    want = greedy_logprobs(served, list(tok.encode_messages(messages)), len(entries), 5)
    for entry, (token, lp) in zip(entries, want, strict=True):
        assert bytes(entry.bytes) == tok.token_bytes(token)
        assert entry.logprob == pytest.approx(lp[token], abs=2e-3)
        assert len(entry.top_logprobs) == 5  # exactly k
        best = np.argsort(-lp, kind="stable")[:5]
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [tok.token_bytes(int(i)) for i in best]
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], lp[best], atol=2e-3)
    assert "".join(e.token for e in entries) == reply.choices[0].message.content


def test_completions_echo_and_logprobs(client: openai.OpenAI, served: LiveServer) -> None:
    prompt = "The capital of France is"
    reply = client.completions.create(model=served.model_name, prompt=prompt, max_tokens=4, temperature=0,
                                      echo=True, logprobs=3)  # fmt: skip
    choice = reply.choices[0]
    assert choice.text.startswith(prompt)
    tok = served.engine.tokenizer
    prompt_ids = list(tok.encode(prompt))
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(prompt_ids) + 4
    logits = served.engine.model.forward(prompt_ids)  # (T, V)
    for i in range(1, len(prompt_ids)):
        assert lp.token_logprobs[i] == pytest.approx(log_softmax(logits[i - 1])[prompt_ids[i]], abs=2e-3)
        assert len(lp.top_logprobs[i]) <= 3  # a dict: alternatives whose text is the same collapse
    generated = greedy_logprobs(served, prompt_ids, 4, 3)
    for i, (token, row) in enumerate(generated):
        assert lp.token_logprobs[len(prompt_ids) + i] == pytest.approx(row[token], abs=2e-3)


# -- penalties and bias -------------------------------------------------------------------------------------
def test_logit_bias_and_penalties(client: openai.OpenAI, served: LiveServer) -> None:
    """Banning (-100) every token of the greedy reply: none comes back; OpenAI's penalties: a
    different reply with fewer repeated tokens."""
    tok = served.engine.tokenizer
    messages = [{"role": "user", "content": "Count from one to twenty in words."}]
    common = {"messages": messages, "max_tokens": 16, "temperature": 0, "logprobs": True}
    penalties = {"frequency_penalty": 2.0, "presence_penalty": 2.0}
    plain_reply, penalized_reply = chats(client, served, common, {**common, **penalties})
    plain, penalized = _pieces(plain_reply), _pieces(penalized_reply)
    ids_of: dict[bytes, list[int]] = {}
    for i in range(tok.vocab_size):
        ids_of.setdefault(tok.token_bytes(i), []).append(i)
    bias = {str(i): -100 for piece in set(plain) for i in ids_of[piece]}
    banned = _pieces(chat(client, served, **common, logit_bias=bias))
    assert banned and not set(plain) & set(banned)
    assert penalized != plain
    assert len(set(penalized)) / len(penalized) > len(set(plain)) / len(plain)  # fewer repeats


def _pieces(reply: Any) -> list[bytes]:
    """The bytes of each generated token (from the logprobs)."""
    return [bytes(entry.bytes) for entry in reply.choices[0].logprobs.content]


# -- n and several prompts --------------------------------------------------------------------------------
def test_n_choices_equal_separately_seeded_requests(client: openai.OpenAI, served: LiveServer) -> None:
    messages = [{"role": "user", "content": "Say something about the sea."}]
    kwargs: dict[str, Any] = {"messages": messages, "max_tokens": 10, "temperature": 1.0}
    together = chat(client, served, n=4, seed=100, **kwargs)
    assert [c.index for c in together.choices] == [0, 1, 2, 3]
    with ThreadPoolExecutor(4) as pool:
        apart = list(pool.map(lambda i: chat(client, served, seed=100 + i, **kwargs), range(4)))
    assert [c.message.content for c in together.choices] == [a.choices[0].message.content for a in apart]
    assert len({c.message.content for c in together.choices}) > 1
    assert together.usage.completion_tokens == sum(a.usage.completion_tokens for a in apart)
    assert together.usage.prompt_tokens == apart[0].usage.prompt_tokens  # the prompt counts once


def test_several_prompts_give_one_choice_each_and_stream(client: openai.OpenAI, served: LiveServer) -> None:
    prompts = ["The sea is", "One, two,", "My favourite food is"]

    def complete(prompt: str | list[str]) -> Any:
        n = 2 if isinstance(prompt, list) else 1
        return client.completions.create(
            model=served.model_name, prompt=prompt, max_tokens=6, temperature=0, n=n
        )

    with ThreadPoolExecutor(4) as pool:
        reply, *alone = pool.map(complete, [prompts, *prompts])
    assert len(reply.choices) == 6
    for prompt_index in range(len(prompts)):
        for j in range(2):
            assert reply.choices[prompt_index * 2 + j].text == alone[prompt_index].choices[0].text
    texts = [""] * 6
    for chunk in client.completions.create(model=served.model_name, prompt=prompts, max_tokens=6,
                                           temperature=0,
                                           n=2, stream=True):  # fmt: skip
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in reply.choices]


# -- embeddings -----------------------------------------------------------------------------------------
def numpy_embedding(server: LiveServer, text: str) -> np.ndarray:
    tok, model = server.engine.tokenizer, server.engine.model
    ids = ([tok.bos_id] if tok.add_bos else []) + list(tok.encode(text, parse_special=False))
    hidden: list[np.ndarray] = []
    model.forward_tails([Row(np.asarray(ids), model.new_cache(len(ids)))], [1], hidden)
    mean = hidden[0].astype(np.float64).mean(axis=0)  # (D,)
    return mean / np.linalg.norm(mean)


def test_embeddings_equal_a_numpy_recomputation_while_chat_runs(
    client: openai.OpenAI, served: LiveServer
) -> None:
    texts = ["The sea is wide.", "A cat sat on the mat.", "Quarterly revenue grew by four percent."]
    with ThreadPoolExecutor(2) as pool:
        chatting = pool.submit(chat, client, served, messages=ASK_WEATHER, max_tokens=30, temperature=0)
        floats = client.embeddings.create(model=served.model_name, input=texts)
        encoded = client.embeddings.create(model=served.model_name, input=texts[0], encoding_format="base64")
        assert chatting.result().choices[0].message.content
    width = served.engine.model.config.hidden_size
    for text, item in zip(texts, floats.data, strict=True):
        np.testing.assert_allclose(item.embedding, numpy_embedding(served, text), atol=1e-4)
        assert len(item.embedding) == width
    raw = encoded.data[0].embedding
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str) else np.asarray(raw)
    np.testing.assert_allclose(decoded, floats.data[0].embedding, atol=1e-6)
    assert floats.usage.prompt_tokens > 0
    response = httpx.post(
        served.v1 + "/embeddings", json={"input": "x", "dimensions": width // 2}, timeout=TIMEOUT_S
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "dimensions"
