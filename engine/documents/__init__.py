"""Chat with your documents: libraries of files split into passages, searched, cited in the prompt.

    index = DocumentIndex(paths.data_dir() / DEFAULT_INDEX_NAME)
    index.create_library("notes", ["~/notes"])
    update_library(index, "notes")                                  # readers -> passages -> FTS5
    found = retrieve(index, ["notes"], question, budget_tokens=1000)
    messages = messages_with_passages(conversation, found.passages)  # after the history: KV reuse

``readers`` (file bytes -> blocks), ``passages`` (blocks -> passages), ``store`` (SQLite + FTS5),
``indexing`` (what changed -> the index), ``retrieval`` (question -> passages -> prompt). No Qt.
"""

from __future__ import annotations

from pathlib import Path

from .. import paths
from .indexing import IndexOptions, IndexProgress, UpdateReport, update_library, walk_sources
from .passages import Passage, PassageOptions, estimate_tokens, split_passages
from .readers import Block, SkipFile, read_blocks
from .retrieval import (
    DEFAULT_BUDGET_TOKENS,
    Citation,
    Retrieval,
    messages_with_passages,
    retrieve,
    source_label,
    with_passages,
)
from .search import query_terms
from .store import DocumentIndex, Hit, LibraryInfo, SkippedFile

DEFAULT_INDEX_NAME = "documents.sqlite3"


def default_index_path() -> Path:
    """Where the app and ``smallmind serve`` keep the document index (moved by SMALLMIND_HOME)."""
    return paths.data_dir() / DEFAULT_INDEX_NAME


__all__ = [
    "DEFAULT_BUDGET_TOKENS",
    "DEFAULT_INDEX_NAME",
    "Block",
    "Citation",
    "DocumentIndex",
    "Hit",
    "IndexOptions",
    "IndexProgress",
    "LibraryInfo",
    "Passage",
    "PassageOptions",
    "Retrieval",
    "SkipFile",
    "SkippedFile",
    "UpdateReport",
    "default_index_path",
    "estimate_tokens",
    "messages_with_passages",
    "query_terms",
    "read_blocks",
    "retrieve",
    "source_label",
    "split_passages",
    "update_library",
    "walk_sources",
    "with_passages",
]
