"""Retrieval within a token budget, re-ranking by embeddings, and the prompt that cites the passages
after the conversation (so the KV cache still reuses it)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from engine import InferenceOptions, SessionId
from engine.documents import (
    DocumentIndex,
    IndexOptions,
    PassageOptions,
    messages_with_passages,
    query_terms,
    retrieve,
    update_library,
)
from engine.documents.retrieval import SOURCES_HEADER, rerank
from tests.fixtures.engine_helpers import make_engine, run_all

FACTS = {
    "lighthouse.md": "# Lighthouse\n\nThe lighthouse lamp was first lit in 1848 by keeper Ada Voss.\n",
    "garden.txt": "Tomatoes need six hours of sun each day.\n\nBasil grows beside the tomatoes.\n",
    "ferry.txt": "The ferry leaves the pier at seven and returns at noon.\n",
    "mill.txt": "The windmill ground wheat until the great storm of 1903.\n",
}


@pytest.fixture
def index(tmp_path: Path) -> DocumentIndex:
    folder = tmp_path / "town"
    folder.mkdir()
    for name, text in FACTS.items():
        (folder / name).write_text(text)
    long_lines = [f"Line {i}: the harbour ledger records cargo, tides and the weather." for i in range(200)]
    (folder / "ledger.txt").write_text("\n".join(long_lines) + "\n")
    with DocumentIndex(tmp_path / "documents.sqlite3") as opened:
        opened.create_library("town", [folder])
        update_library(
            opened, "town", IndexOptions(passages=PassageOptions(max_tokens=120, overlap_tokens=30))
        )
        yield opened


def test_the_passage_with_the_answer_comes_first_numbered_with_its_source(index: DocumentIndex) -> None:
    found = retrieve(index, ["town"], "Who first lit the lighthouse lamp?")
    first = found.passages[0]
    assert (first.number, Path(first.path).name, first.label) == (
        1,
        "lighthouse.md",
        "town/lighthouse.md, lines 1-3",
    )
    assert [c.number for c in found.passages] == list(range(1, len(found.passages) + 1))
    assert "Ada Voss" in first.text


def test_passages_fit_the_budget_counted_by_the_models_tokenizer(index: DocumentIndex, tiny) -> None:
    _, tok = tiny

    def count(text: str) -> int:
        return len(tok.encode(text, parse_special=False))

    for budget in (300, 600, 1500):  # the tiny model's tokens: ~2.3 per estimated one
        found = retrieve(index, ["town"], "harbour ledger cargo tides weather", budget, count_tokens=count)
        assert found.passages
        assert found.n_tokens == sum(c.n_tokens for c in found.passages) <= budget
        prompt_part = messages_with_passages([{"role": "user", "content": "q"}], found.passages)[0]["content"]
        assert count(prompt_part.split(SOURCES_HEADER + "\n\n", 1)[1]) <= found.n_tokens
    wider = retrieve(index, ["town"], "harbour ledger cargo tides weather", 1500, count_tokens=count)
    narrow = retrieve(index, ["town"], "harbour ledger cargo tides weather", 300, count_tokens=count)
    assert len(wider.passages) > len(narrow.passages)


def test_overlapping_neighbours_are_not_both_taken(index: DocumentIndex) -> None:
    found = retrieve(index, ["town"], "harbour ledger cargo", budget_tokens=4000)
    ledger = [c for c in found.passages if c.path.endswith("ledger.txt")]
    assert len(ledger) > 1
    spans = sorted((c.line_start, c.line_end) for c in ledger)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start > end


def test_a_question_of_only_stopwords_finds_nothing(index: DocumentIndex) -> None:
    assert query_terms("What is it, and why?") == []
    assert retrieve(index, ["town"], "What is it, and why?").passages == ()
    assert query_terms('Lamp "lit" 1848? lamp') == ["lamp", "lit", "1848"]  # quotes cannot break the query


def test_an_invalid_budget_names_the_field(index: DocumentIndex) -> None:
    with pytest.raises(ValueError, match="budget_tokens must be between 1 and"):
        retrieve(index, ["town"], "lamp", budget_tokens=0)


def bag_of_words(texts: list[str]) -> list[list[float]]:
    """A real (if simple) embedding: counts of a few words, standing for what a text is about."""
    vocabulary = ["cargo", "ledger", "tides"]
    return [[float(len(re.findall(word, text.lower()))) for word in vocabulary] for text in texts]


def test_embeddings_rerank_the_bm25_candidates(index: DocumentIndex) -> None:
    question = "wheat cargo"  # BM25: 'wheat' is rare (the mill), 'cargo' is on every ledger passage
    plain = retrieve(index, ["town"], question, budget_tokens=4000)
    reranked = retrieve(index, ["town"], question, budget_tokens=4000, embed=bag_of_words)
    assert Path(plain.passages[0].path).name == "mill.txt"
    assert Path(reranked.passages[0].path).name == "ledger.txt"
    names = [Path(c.path).name for c in reranked.passages]
    assert "mill.txt" not in names[: names.count("ledger.txt")]  # none of the embedding's words: last


def test_rerank_refuses_an_embedding_of_the_wrong_length(index: DocumentIndex) -> None:
    hits = index.search(["town"], "lamp keeper")
    with pytest.raises(ValueError, match="embed returned 1 vectors"):
        rerank("lamp", hits, lambda texts: [[1.0]])


def test_passages_go_after_the_history_in_the_last_message(index: DocumentIndex) -> None:
    history = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "When was the lamp first lit?"},
    ]
    found = retrieve(index, ["town"], history[-1]["content"])
    messages = messages_with_passages(history, found.passages)
    assert messages[:3] == history[:3]
    content = messages[3]["content"]
    assert content.startswith("When was the lamp first lit?\n\n" + SOURCES_HEADER)
    assert "[1] town/lighthouse.md, lines 1-3\n# Lighthouse" in content
    assert messages_with_passages(history, ()) == history
    with pytest.raises(ValueError, match="last message must be the user's"):
        messages_with_passages(history[:3], found.passages)


def test_the_next_turn_reuses_the_conversation_in_the_kv_cache(index: DocumentIndex, tiny) -> None:
    _, tok = tiny
    engine = make_engine(tiny)
    options = InferenceOptions(temperature=0.0, max_new_tokens=8, stop_on_eos=False)
    session = SessionId.new_id()
    history = [{"role": "system", "content": "Answer from the sources."},
               {"role": "user", "content": "Who lit the lamp?"}]  # fmt: skip
    turn1 = messages_with_passages(history, retrieve(index, ["town"], "Who lit the lamp?").passages)
    reply = run_all(engine, [engine.submit(turn1, options, session_id=session)])[0]
    history += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And the ferry?"}]
    turn2 = messages_with_passages(history, retrieve(index, ["town"], "When does the ferry leave?").passages)
    second = run_all(engine, [engine.submit(turn2, options, session_id=session)])[0]
    # both prompts start with the plain conversation through turn 1's question: the cache reuses it
    shared = tok.encode_messages(history[:2], add_generation_prompt=False)
    n = len(shared) - 2  # the turn's end marker may tokenize with what follows it
    ids1, ids2 = tok.encode_messages(turn1), tok.encode_messages(turn2)
    assert ids1[:n] == shared[:n] and ids2[:n] == shared[:n]
    assert second.reused_tokens >= n
