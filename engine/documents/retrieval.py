"""A question -> the best passages of some libraries within a token budget -> the prompt that cites them.

    found = retrieve(index, ["notes"], "When was the bridge built?", budget_tokens=1000,
                     count_tokens=lambda s: len(tokenizer.encode(s, parse_special=False)))
    messages = messages_with_passages(history_and_question, found.passages)

Passages are ranked by BM25 (FTS5); given an ``embed`` function (texts -> vectors, e.g. the model's
embeddings), the best BM25 candidates are re-ranked by cosine similarity to the question's vector.
They are then taken in rank order while they fit the budget, counted as they will stand in the prompt.

The passages go into the *last* user message, after the question: every earlier message is the
conversation as it was, so the KV cache still reuses it (passages in the system prompt would change
the prompt's first tokens on every turn and throw the whole cache away). Numbered [1], [2]... so the
reply can cite them; ``Citation`` says where each number points.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .passages import CountTokens, estimate_tokens
from .store import DocumentIndex, Hit

Embed = Callable[[list[str]], Sequence[Sequence[float]]]
DEFAULT_BUDGET_TOKENS = 1000
MAX_BUDGET_TOKENS = 32768
N_RERANK_CANDIDATES = 30
SOURCES_HEADER = "Sources (cite them by number, like [1]):"


@dataclass(frozen=True, slots=True)
class Citation:
    """A numbered passage as the reply cites it: [number] path, page or lines, and its text."""

    number: int
    library: str
    path: str
    label: str  # "notes/solar.md, lines 12-30" or "report.pdf, page 4"
    text: str
    heading: str
    n_tokens: int  # in the prompt, with its label
    passage_id: int
    page: int | None = None
    line_start: int | None = None
    line_end: int | None = None
    score: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class Retrieval:
    passages: tuple[Citation, ...]
    n_tokens: int  # the passages' tokens in the prompt
    budget_tokens: int
    n_candidates: int  # passages that matched the question


def check_budget(budget_tokens: int) -> int:
    if not isinstance(budget_tokens, int) or not 0 < budget_tokens <= MAX_BUDGET_TOKENS:
        raise ValueError(f"budget_tokens must be between 1 and {MAX_BUDGET_TOKENS}, got {budget_tokens!r}")
    return budget_tokens


def retrieve(
    index: DocumentIndex,
    libraries: Sequence[str],
    question: str,
    budget_tokens: int = DEFAULT_BUDGET_TOKENS,
    count_tokens: CountTokens | None = None,
    embed: Embed | None = None,
    max_passages: int = 12,
) -> Retrieval:
    """The best passages of ``libraries`` for ``question`` that fit ``budget_tokens`` together."""
    check_budget(budget_tokens)
    count = count_tokens or estimate_tokens
    n_candidates = N_RERANK_CANDIDATES if embed is not None else max(max_passages * 3, 20)
    hits = index.search(libraries, question, limit=n_candidates)
    if embed is not None and len(hits) > 1:
        hits = rerank(question, hits, embed)
    chosen: list[Citation] = []
    total = 0
    for hit in hits:
        if len(chosen) == max_passages:
            break
        if any(_overlaps(hit, c) for c in chosen):
            continue  # the next passage of a chosen one repeats its overlap lines: room for others
        citation = _citation(len(chosen) + 1, hit, count)
        if total + citation.n_tokens <= budget_tokens:
            chosen.append(citation)
            total += citation.n_tokens
    return Retrieval(tuple(chosen), total, budget_tokens, len(hits))


def rerank(question: str, hits: list[Hit], embed: Embed) -> list[Hit]:
    """``hits`` ordered by the cosine similarity of their text to the question (ties: BM25 order)."""
    vectors = embed([question, *(hit.text for hit in hits)])
    if len(vectors) != len(hits) + 1:
        raise ValueError(f"embed returned {len(vectors)} vectors for {len(hits) + 1} texts")
    query = vectors[0]
    scored = [
        (-_cosine(query, vector), rank, hit)
        for rank, (hit, vector) in enumerate(zip(hits, vectors[1:], strict=True))
    ]
    return [hit for *_, hit in sorted(scored, key=lambda item: (item[0], item[1]))]


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def _overlaps(hit: Hit, chosen: Citation) -> bool:
    if hit.path != chosen.path:
        return False
    if hit.line_start is None or hit.line_end is None or chosen.line_start is None or chosen.line_end is None:
        return False
    return hit.line_start <= chosen.line_end and chosen.line_start <= hit.line_end


def source_label(path: str, source: str, page: int | None, line_start: int | None,
                 line_end: int | None) -> str:  # fmt: skip
    """The label "notes/solar.md, lines 12-30": the path from the source folder's name, then where in it."""
    if path == source:
        shown = os.path.basename(path)
    else:
        shown = os.path.join(os.path.basename(source.rstrip(os.sep)), os.path.relpath(path, source))
    if page is not None:
        return f"{shown}, page {page}"
    if line_start is not None and line_end is not None and line_end != line_start:
        return f"{shown}, lines {line_start}-{line_end}"
    if line_start is not None:
        return f"{shown}, line {line_start}"
    return shown


def _citation(number: int, hit: Hit, count: CountTokens) -> Citation:
    label = source_label(hit.path, hit.source, hit.page, hit.line_start, hit.line_end)
    citation = Citation(
        number=number, library=hit.library, path=hit.path, label=label, text=hit.text, heading=hit.heading,
        n_tokens=0, passage_id=hit.passage_id, page=hit.page, line_start=hit.line_start,
        line_end=hit.line_end, score=hit.score,
    )  # fmt: skip
    n_tokens = count(format_passage(citation) + "\n\n")
    return Citation(**{**citation.as_dict(), "n_tokens": n_tokens})


def format_passage(citation: Citation) -> str:
    return f"[{citation.number}] {citation.label}\n{citation.text}"


def with_passages(question: str, passages: Sequence[Citation]) -> str:
    """The user's message followed by the numbered passages (the message alone when there are none)."""
    if not passages:
        return question
    blocks = "\n\n".join(format_passage(p) for p in passages)
    return f"{question}\n\n{SOURCES_HEADER}\n\n{blocks}"


def messages_with_passages(
    messages: Sequence[Mapping[str, Any]], passages: Sequence[Citation]
) -> list[dict[str, Any]]:
    """``messages`` with the passages added after the last user message's text; the history before it
    is left as it was (so its KV cache is reused)."""
    out = [dict(message) for message in messages]
    if not out or out[-1].get("role") != "user":
        raise ValueError("the last message must be the user's question to add document passages to it")
    out[-1]["content"] = with_passages(str(out[-1].get("content", "")), passages)
    return out
