"""Document libraries over the API: ``"smallmind": {"library": ...}`` on /v1/chat/completions, with a
real index, a real engine and a real uvicorn on 127.0.0.1, talked to by the openai client and httpx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import NotFoundError, OpenAI

from engine import BatchedInferenceEngine, InferenceOptions
from engine.documents import DocumentIndex, messages_with_passages, retrieve, update_library
from tests.fixtures.documents import write_pdf
from tests.server.conftest import LiveServer, live_server, make_engine

BUDGET = 300
QUESTION = "Who first lit the lighthouse lamp?"


@pytest.fixture(scope="module")
def index_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("documents")
    folder = root / "town"
    folder.mkdir()
    (folder / "lighthouse.md").write_text(
        "# Lighthouse\n\nThe lighthouse lamp was first lit in 1848 by Ada Voss.\n"
    )
    (folder / "ferry.txt").write_text("The ferry leaves the pier at seven and returns at noon.\n")
    write_pdf(folder / "survey.pdf", ["Harbour survey, part one.", "The kestrel nests on the north cliffs."])
    path = root / "documents.sqlite3"
    with DocumentIndex(path) as index:
        index.create_library("town", [folder])
        update_library(index, "town")
    return path


@pytest.fixture(scope="module")
def engine(long_context_model: Path) -> Iterator[BatchedInferenceEngine]:
    engine = make_engine(long_context_model, max_batch_wait_ms=2.0)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def server(engine: BatchedInferenceEngine, index_path: Path) -> Iterator[LiveServer]:
    with live_server(engine, "tiny", documents_path=index_path) as live:
        yield live


def client(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def ask(server: LiveServer, question: str, **extension: object):  # type: ignore[no-untyped-def]
    return client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], max_tokens=6, temperature=0,
        extra_body={"smallmind": {"library": "town", "budget_tokens": BUDGET, **extension}},
    )  # fmt: skip


def test_the_reply_cites_the_passages_the_prompt_was_given(server: LiveServer, index_path: Path) -> None:
    reply = ask(server, QUESTION)
    field = reply.model_extra["smallmind"]
    first = field["citations"][0]
    assert (first["number"], first["label"]) == (1, "town/lighthouse.md, lines 1-3")
    assert Path(first["path"]).name == "lighthouse.md"
    assert "Ada Voss" in first["text"]
    assert field["libraries"] == ["town"] and field["budget_tokens"] == BUDGET
    assert 0 < field["n_tokens"] <= BUDGET


def test_the_server_builds_the_prompt_the_engine_side_retrieval_builds(
    server: LiveServer, index_path: Path
) -> None:
    """Same passages, same prompt tokens, same greedy reply as engine.documents used directly: what
    the window does (it calls the same two functions)."""
    tok = server.engine.tokenizer
    with DocumentIndex(index_path) as index:
        found = retrieve(index, ["town"], QUESTION, BUDGET, lambda s: len(tok.encode(s, parse_special=False)))
    messages = messages_with_passages([{"role": "user", "content": QUESTION}], found.passages)
    reply = ask(server, QUESTION)
    assert [c["passage_id"] for c in reply.model_extra["smallmind"]["citations"]] == [
        c.passage_id for c in found.passages
    ]
    assert reply.usage.prompt_tokens == len(tok.encode_messages(messages))
    direct = server.engine.submit(messages, InferenceOptions(temperature=0.0, max_new_tokens=6)).result(60)
    assert reply.choices[0].message.content == direct.text


def test_a_streamed_reply_carries_the_citations_in_a_chunk_of_its_own(server: LiveServer) -> None:
    stream = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0,
        stream=True, extra_body={"smallmind": {"library": "town", "budget_tokens": BUDGET}},
    )  # fmt: skip
    chunks = list(stream)
    cited = [c for c in chunks if (c.model_extra or {}).get("smallmind")]
    assert len(cited) == 1 and cited[0].choices == []
    assert cited[0].id == chunks[0].id and chunks.index(cited[0]) == 1
    assert Path(cited[0].model_extra["smallmind"]["citations"][0]["path"]).name == "lighthouse.md"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ask(server, QUESTION).choices[0].message.content


def test_a_pdf_passage_is_cited_by_its_page(server: LiveServer) -> None:
    first = ask(server, "Where does the kestrel nest?").model_extra["smallmind"]["citations"][0]
    assert (Path(first["path"]).name, first["page"], first["label"]) == (
        "survey.pdf",
        2,
        "town/survey.pdf, page 2",
    )


def test_requests_without_the_field_are_untouched(server: LiveServer) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}
    reply = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200 and "smallmind" not in reply.json()
    plain = len(server.engine.tokenizer.encode_messages(body["messages"]))
    assert reply.json()["usage"]["prompt_tokens"] == plain


@pytest.mark.parametrize(
    ("extension", "status", "param", "message"),
    [
        (
            {"library": "nope"},
            404,
            "smallmind.library",
            "no document library named 'nope' (libraries: 'town')",
        ),
        ({"library": []}, 400, "smallmind.library", "smallmind.library: List should have at least 1 item"),
        (
            {"library": "town", "budget_tokens": 0},
            400,
            "smallmind.budget_tokens",
            "greater than or equal to 1",
        ),
        ({"library": "town", "bogus": 1}, 400, "smallmind.bogus", "unknown field 'smallmind.bogus'"),
        ({}, 400, "smallmind.library", "Field required"),
        ("town", 400, "smallmind", "valid dictionary"),
    ],
)
def test_a_bad_field_is_a_clear_error(server: LiveServer, extension: object, status: int, param: str,
                                      message: str) -> None:  # fmt: skip
    body = {"messages": [{"role": "user", "content": QUESTION}], "smallmind": extension}
    reply = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_the_question_must_be_the_last_message(server: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "smallmind": {"library": "town"}}  # fmt: skip
    reply = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400
    assert "needs the last message to be the user's question" in reply.json()["error"]["message"]


def test_without_an_index_file_no_library_exists_and_none_is_created(
    engine: BatchedInferenceEngine, tmp_path: Path
) -> None:
    missing = tmp_path / "no" / "documents.sqlite3"
    with live_server(engine, "tiny", documents_path=missing) as live, pytest.raises(NotFoundError) as raised:
        ask(live, QUESTION)
    assert "libraries: none yet" in str(raised.value)
    assert not missing.exists()
