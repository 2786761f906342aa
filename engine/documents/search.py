"""BM25 search over the passages of some libraries, kept fast on a large index.

BM25 is computed for every passage the query matches, so a question with a word found in half the
index (``self`` in a folder of Python: 48,000 of 55,000 passages) would score all those rows (over
100 ms on 50 MB). Words are therefore taken rarest first while the passages they match add up to at
most ``MAX_MATCHED_ROWS``: a word that common weighs little in BM25 anyway (its IDF is near zero), and
the rarest word is always kept (bench_documents.py: median search 84 -> 15 ms, recall unchanged).
The best rows are ranked inside FTS5 first and only those are joined to their files; when some
libraries are left out, more rows are ranked and filtered (all of them if that still leaves too few).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import DocumentIndex, Hit

MAX_QUERY_TERMS = 32
MAX_MATCHED_ROWS = 5_000
FILTER_OVERSAMPLE = 8  # rows ranked per row wanted when other libraries' rows must be filtered out
BM25_WEIGHTS = "1.0, 0.5, 0.5"  # text, heading, title (the file's name)
_WORD = re.compile(r"\w+")
_STOPWORD_TEXT = (
    "a an and are as at be been but by can could did do does for from had has have how i if in into "
    "is it its me my no not of on or our so than that the their them then there these they this "
    "those to was we were what when where which who whom why will with would you your about after "
    "all also any before between both each few more most other some such only own same too very just "
    "over under again further once here during out up down off above below should now tell explain "
    "describe"
)
# Words too common to tell passages apart; dropping them keeps a question's query to what it is about.
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_COLUMNS = "p.id, f.library_id, f.path, f.source, t.text, t.heading, p.n_tokens"
_PLACE = "p.page, p.line_start, p.line_end"


def query_terms(question: str) -> list[str]:
    """The words of a question worth searching for, in order, without stopwords and repeats."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(question.lower()):
        if word not in STOPWORDS and (len(word) > 1 or word.isdigit()):
            seen.setdefault(word, None)
    return list(seen)[:MAX_QUERY_TERMS]


def search(index: DocumentIndex, libraries: Sequence[str], question: str, limit: int = 20) -> list[Hit]:
    from .store import Hit

    if not libraries or limit < 1:
        return []
    with index.reading() as db:
        ids = {index.library_id_unlocked(name): name for name in libraries}
        terms = _selective_terms(db, query_terms(question))
        if not terms:
            return []
        match = " OR ".join(f'"{term}"' for term in terms)
        n_libraries = db.execute("SELECT COUNT(*) FROM libraries").fetchone()[0]
        everything = len(ids) == n_libraries
        rows = _ranked(db, match, ids, limit, limit if everything else limit * FILTER_OVERSAMPLE)
        if len(rows) < limit and not everything:
            rows = _ranked(db, match, ids, limit, None)
    return [Hit(row[0], ids[row[1]], *row[2:]) for row in rows]


def _selective_terms(db: sqlite3.Connection, terms: list[str]) -> list[str]:
    """The rarest terms whose matches add up to MAX_MATCHED_ROWS (the rarest always), in query order."""
    counts = {}
    for term in terms:
        (n,) = db.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM passage_text WHERE passage_text MATCH ? LIMIT ?)",
            (f'"{term}"', MAX_MATCHED_ROWS + 1),
        ).fetchone()
        if n:
            counts[term] = n
    kept: set[str] = set()
    total = 0
    for term in sorted(counts, key=counts.__getitem__):
        if kept and total + counts[term] > MAX_MATCHED_ROWS:
            break
        kept.add(term)
        total += counts[term]
    return [term for term in terms if term in kept]


def _ranked(db: sqlite3.Connection, match: str, ids: dict[int, str], limit: int,
            n_ranked: int | None) -> list[tuple]:  # fmt: skip
    """The best ``limit`` rows of ``ids``' libraries among the best ``n_ranked`` (None: all) in FTS5."""
    top = f"LIMIT {int(n_ranked)}" if n_ranked is not None else ""
    marks = ",".join("?" * len(ids))
    return db.execute(
        f"SELECT {_COLUMNS}, top.score, {_PLACE} FROM (SELECT rowid, bm25(passage_text, {BM25_WEIGHTS}) "
        f"AS score FROM passage_text WHERE passage_text MATCH ? ORDER BY score {top}) AS top "
        f"JOIN passage_text t ON t.rowid = top.rowid JOIN passages p ON p.id = top.rowid "
        f"JOIN files f ON f.id = p.file_id WHERE f.library_id IN ({marks}) ORDER BY top.score LIMIT ?",
        (match, *ids, limit),
    ).fetchall()
