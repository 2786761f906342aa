"""The API server over a model pool: every installed model by its ``model`` id, loaded on demand;
``/v1/models`` lists them; an unknown id is a 404 naming the installed ones; ``smallmind serve``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from engine import BatchingOptions, InferenceOptions, LruKvCacheStore, paths
from engine.model_pool import ModelPool, ModelPoolOptions, load_files
from smallmind_server import create_app
from tests.fixtures.engine_helpers import make_engine, run_all
from tests.server.conftest import serve_app
from tests.server.test_serve_cli import free_port, smallmind, wait_healthy

MESSAGES = [{"role": "user", "content": "Hello there"}]
GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0, "max_tokens": 8}
TIMEOUT_S = 60.0


def own_reply(path: Path, n: int = 8) -> str:
    """What the model in ``path`` says alone, greedy (the server's reply must equal it)."""
    engine = make_engine(load_files(path), BatchingOptions(max_batch_wait_ms=0))
    options = InferenceOptions(temperature=0.0, repetition_penalty=1.0, max_new_tokens=n)
    return run_all(engine, [engine.submit(MESSAGES, options)])[0].text


@pytest.fixture
def pooled(tiny_family: dict[str, Path]) -> Iterator[tuple[str, ModelPool]]:
    models = {name: tiny_family[name] for name in ("tiny-a", "tiny-gemma")}
    pool = ModelPool(models, ModelPoolOptions(), BatchingOptions(max_batch_wait_ms=1.0), LruKvCacheStore())
    pool.start()
    app = create_app(None, "tiny-a", pool=pool, max_tokens_cap=200)
    try:
        with serve_app(app) as url:
            yield url, pool
    finally:
        pool.stop()


def test_models_lists_every_installed_model(pooled):
    url, _ = pooled
    listed = httpx.get(url + "/v1/models", timeout=TIMEOUT_S).json()
    assert [card["id"] for card in listed["data"]] == ["tiny-a", "tiny-gemma"]


def test_each_model_answers_with_its_own_reply_loading_on_demand(pooled, tiny_family):
    url, pool = pooled
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)
    assert not pool.is_loaded("tiny-gemma")
    for model in ("tiny-gemma", "tiny-a"):
        reply = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0.0, max_tokens=8,
                                               extra_body={"repetition_penalty": 1.0})  # fmt: skip
        assert reply.model == model
        assert reply.choices[0].message.content == own_reply(tiny_family[model])
    assert pool.is_loaded("tiny-gemma")
    cards = {c["id"]: c for c in httpx.get(url + "/v1/models", timeout=TIMEOUT_S).json()["data"]}
    assert cards["tiny-gemma"]["max_model_len"] == 256  # loaded now: its session limit is known


def test_two_models_stream_at_once(pooled, tiny_family):
    url, _ = pooled

    def stream(model: str) -> tuple[set[str], str]:
        body = {"model": model, "messages": MESSAGES, "stream": True, **GREEDY}
        names, text = set(), []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = httpx.Response(200, content=line[6:]).json()
                    names.add(chunk["model"])
                    text += [c["delta"].get("content", "") for c in chunk["choices"]]
        return names, "".join(text)

    with ThreadPoolExecutor(2) as threads:
        a, g = threads.map(stream, ["tiny-a", "tiny-gemma"])
    assert a == ({"tiny-a"}, own_reply(tiny_family["tiny-a"]))
    assert g == ({"tiny-gemma"}, own_reply(tiny_family["tiny-gemma"]))


def test_an_unknown_model_is_a_404_naming_the_installed_ones(pooled):
    url, pool = pooled
    response = httpx.post(url + "/v1/chat/completions", json={"model": "gpt-4", "messages": MESSAGES},
                          timeout=TIMEOUT_S)  # fmt: skip
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'gpt-4'" in error["message"] and "'tiny-a', 'tiny-gemma'" in error["message"]
    assert not any(pool.is_loaded(m) for m in ("tiny-a", "tiny-gemma"))  # nothing was loaded for it


def test_a_budget_for_one_model_swaps_them_and_every_request_answers(tiny_family):
    models = {name: tiny_family[name] for name in ("tiny-a", "tiny-gemma")}
    one = max(load_files(p)[0].weights.nbytes for p in models.values())
    pool = ModelPool(models, ModelPoolOptions(max_loaded_bytes=one), BatchingOptions(max_batch_wait_ms=0))
    pool.start()
    try:
        app = create_app(None, "tiny-a", pool=pool)
        with serve_app(app) as url:
            for model in ("tiny-a", "tiny-gemma", "tiny-a"):
                body = {"model": model, "prompt": "the quick", "max_tokens": 4}
                response = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT_S)
                assert response.status_code == 200 and response.json()["model"] == model
                assert [pool.is_loaded(m) for m in models] == [model == "tiny-a", model == "tiny-gemma"]
            root_engine = app.state.server.engine  # what /health and /metrics read: the default's, reloaded
            assert root_engine is pool.loaded_engine("tiny-a")
    finally:
        pool.stop()


def test_smallmind_serve_serves_every_installed_model(tiny_family):
    models_dir = paths.models_dir()  # this test's own SMALLMIND_HOME, inherited by the subprocess
    models_dir.mkdir(parents=True)
    for name in ("tiny-b", "tiny-gemma"):
        shutil.copy(tiny_family[name], models_dir / f"{name}.gguf")
    port = free_port()
    # 1 MB: room for tiny-a and tiny-gemma (~0.5 MB each), not for tiny-a and tiny-b as well
    proc = smallmind(
        "serve", "--model", str(tiny_family["tiny-a"]), "--port", str(port), "--max-loaded-mb", "1", "-v"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        listed = [c["id"] for c in httpx.get(url + "/v1/models", timeout=TIMEOUT_S).json()["data"]]
        assert listed == ["tiny-a", "tiny-b", "tiny-gemma"]
        for model in ("tiny-gemma", "tiny-b", "tiny-a"):
            body = {"model": model, "messages": MESSAGES, **GREEDY}
            reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S).json()
            assert reply["model"] == model
            assert reply["choices"][0]["message"]["content"] == own_reply(tiny_family[model])
        missing = httpx.post(
            url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=TIMEOUT_S
        )
        assert missing.status_code == 404
        assert "'tiny-a', 'tiny-b', 'tiny-gemma'" in missing.json()["error"]["message"]
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=TIMEOUT_S)
    assert "model tiny-a unloaded (to make room for tiny-b)" in err  # the least recently used went
    assert "model tiny-gemma unloaded (to make room for tiny-a)" in err


@pytest.mark.parametrize("content_type", ["text/plain", "application/json"])
def test_a_hostile_body_is_refused_before_any_model_is_picked(pooled, content_type):
    """The model is read from the body before the route runs: a body nested 50,000 deep is a 400
    (never a 500 from the parser's recursion), and nothing is loaded for it."""
    url, pool = pooled
    for path in ("/tokenize", "/v1/chat/completions"):
        response = httpx.post(url + path, content=b"[" * 50_000, headers={"Content-Type": content_type},
                              timeout=TIMEOUT_S)  # fmt: skip
        assert response.status_code == 400, response.text[:200]
    assert not any(pool.is_loaded(m) for m in ("tiny-a", "tiny-gemma"))


def test_document_passages_are_counted_by_the_model_the_request_names(
    tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    """``"smallmind": {"library": ...}`` over a pool: the passages' token budget is counted with the
    named model's tokenizer (loaded for it), not the default model's."""
    from engine import Tokenizer
    from engine.documents import DocumentIndex, retrieve, update_library
    from tests.fixtures.tiny_model import write_tiny_model

    spm = write_tiny_model(tmp_path / "tiny-spm.gguf", seed=3, tokenizer_model="llama").path
    models = {"tiny-a": tiny_family["tiny-a"], "tiny-spm": spm}  # byte-level BPE; SentencePiece
    folder = tmp_path / "town"
    folder.mkdir()
    (folder / "lighthouse.md").write_text(
        "# Lighthouse\n\nThe lighthouse lamp was first lit in 1848 by Ada Voss.\n"
    )
    index_path = tmp_path / "documents.sqlite3"
    with DocumentIndex(index_path) as index:
        index.create_library("town", [folder])
        update_library(index, "town")
    question = "Who first lit the lighthouse lamp?"
    counts = {}
    for name, path in models.items():
        tokenizer = Tokenizer.from_gguf(path)
        with DocumentIndex(index_path) as index:
            found = retrieve(
                index, ["town"], question, 100, lambda t, k=tokenizer: len(k.encode(t, parse_special=False))
            )
        counts[name] = found.n_tokens
    assert counts["tiny-a"] != counts["tiny-spm"] > 0  # the two tokenizers count differently
    pool = ModelPool(models, ModelPoolOptions(), BatchingOptions(max_batch_wait_ms=0))
    pool.start()
    try:
        with serve_app(create_app(None, "tiny-a", pool=pool, documents_path=index_path)) as url:
            body: dict = {"messages": [{"role": "user", "content": question}], "max_tokens": 2,
                          "smallmind": {"library": "town", "budget_tokens": 100}}  # fmt: skip
            for name in ("tiny-spm", "tiny-a"):
                response = httpx.post(
                    url + "/v1/chat/completions", json=body | {"model": name}, timeout=TIMEOUT_S
                )
                assert response.status_code == 200, response.text
                assert response.json()["model"] == name
                assert response.json()["smallmind"]["n_tokens"] == counts[name]
            missing = httpx.post(
                url + "/v1/chat/completions", json=body | {"model": "nope"}, timeout=TIMEOUT_S
            )
            assert missing.status_code == 404 and "tiny-spm" in missing.text
    finally:
        pool.stop()
