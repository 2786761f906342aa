"""The document index: libraries, their files and passages in one SQLite file, searched with FTS5.

    index = DocumentIndex(paths.data_dir() / "documents.sqlite3")
    index.create_library("notes", ["~/notes"])
    update_library(index, "notes")                        # indexing.py: read what changed
    hits = index.search(["notes"], "when was the bridge built?", limit=20)

Tables: ``libraries`` (a name), ``sources`` (the folders and files a library was given), ``files``
(each file found: mtime, size and SHA-256, to re-read only what changed), ``passages`` (where each
passage is: page or line range) with their text in the FTS5 table ``passage_text`` (Porter stemming,
so "invented" finds "invention"; ranked by BM25), and ``skipped`` (files not indexed and why).

The file is its own (not the conversations' database): indexing 50 MB writes for a minute, and the
conversation store must never wait for that. WAL mode lets searches run while a library is indexed.
One ``DocumentIndex`` may be shared by threads (a lock serializes its connection); the indexer opens
its own.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import DocumentIndexError, LibraryNotFoundError
from .passages import Passage

SCHEMA_VERSION = 1
MAX_LIBRARY_NAME_CHARS = 100
_SCHEMA = """
CREATE TABLE IF NOT EXISTS libraries (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_s REAL NOT NULL, updated_s REAL);
CREATE TABLE IF NOT EXISTS sources (
    library_id INTEGER NOT NULL REFERENCES libraries(id) ON DELETE CASCADE,
    path TEXT NOT NULL, PRIMARY KEY (library_id, path));
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY, library_id INTEGER NOT NULL REFERENCES libraries(id) ON DELETE CASCADE,
    source TEXT NOT NULL, path TEXT NOT NULL, mtime_ns INTEGER NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, n_passages INTEGER NOT NULL, UNIQUE (library_id, path));
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL, page INTEGER, line_start INTEGER, line_end INTEGER,
    n_tokens INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS passages_by_file ON passages(file_id);
CREATE VIRTUAL TABLE IF NOT EXISTS passage_text USING fts5(text, heading, title,
    tokenize = 'porter unicode61');
CREATE TABLE IF NOT EXISTS skipped (
    library_id INTEGER NOT NULL REFERENCES libraries(id) ON DELETE CASCADE,
    path TEXT NOT NULL, reason TEXT NOT NULL, mtime_ns INTEGER, size INTEGER,
    PRIMARY KEY (library_id, path));
"""


@dataclass(frozen=True, slots=True)
class LibraryInfo:
    name: str
    sources: tuple[str, ...]
    n_files: int
    n_passages: int
    n_skipped: int
    updated_s: float | None  # when an update last finished (None: never indexed)


@dataclass(frozen=True, slots=True)
class SkippedFile:
    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class FileState:
    """What the index knows of a file, to tell whether it changed."""

    file_id: int
    source: str
    mtime_ns: int
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Hit:
    """A passage found by a search, with where it comes from. ``score``: BM25, lower is better."""

    passage_id: int
    library: str
    path: str
    source: str
    text: str
    heading: str
    n_tokens: int
    score: float
    page: int | None = None
    line_start: int | None = None
    line_end: int | None = None


def check_library_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a library name must be non-empty text, got {name!r}")
    if len(name.strip()) > MAX_LIBRARY_NAME_CHARS:
        raise ValueError(f"a library name may have at most {MAX_LIBRARY_NAME_CHARS} characters")
    return name.strip()


class DocumentIndex:
    """The SQLite file of libraries and passages (created if missing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
            self._open()
        except sqlite3.DatabaseError as exc:
            raise DocumentIndexError(self.path, str(exc)) from exc
        except OSError as exc:
            raise DocumentIndexError(self.path, exc.strerror or str(exc)) from exc

    def _open(self) -> None:
        db = self._db
        db.execute("PRAGMA foreign_keys = ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise DocumentIndexError(self.path, f"made by a newer SmallMind (schema {version})")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        try:
            with db:
                db.executescript(_SCHEMA)
        except sqlite3.OperationalError as exc:
            if "fts5" in str(exc):
                raise DocumentIndexError(self.path, "this Python's SQLite has no FTS5") from exc
            raise
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> DocumentIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db:
            yield self._db

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, for reads (this object's lock held)."""
        with self._lock:
            yield self._db

    # -- libraries ---------------------------------------------------------------------------------

    def create_library(self, name: str, sources: Iterable[str | os.PathLike[str]] = ()) -> None:
        name = check_library_name(name)
        with self.transaction() as db:
            try:
                db.execute("INSERT INTO libraries (name, created_s) VALUES (?, ?)", (name, time.time()))
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"a library named {name!r} already exists") from exc
        self.add_sources(name, sources)

    def delete_library(self, name: str) -> None:
        with self.transaction() as db:
            library_id = self._library_id(name)
            db.execute(
                "DELETE FROM passage_text WHERE rowid IN (SELECT p.id FROM passages p "
                "JOIN files f ON f.id = p.file_id WHERE f.library_id = ?)",
                (library_id,),
            )
            db.execute("DELETE FROM libraries WHERE id = ?", (library_id,))

    def add_sources(self, name: str, sources: Iterable[str | os.PathLike[str]]) -> None:
        """Folders or files, kept as absolute paths (symlinks not resolved: the user's own names)."""
        with self.transaction() as db:
            library_id = self._library_id(name)
            rows = [(library_id, os.path.abspath(os.path.expanduser(os.fspath(s)))) for s in sources]
            db.executemany("INSERT OR IGNORE INTO sources (library_id, path) VALUES (?, ?)", rows)

    def remove_sources(self, name: str, sources: Iterable[str]) -> None:
        """Forget sources and every file found through them."""
        with self.transaction() as db:
            library_id = self._library_id(name)
            for source in sources:
                rows = db.execute(
                    "SELECT id FROM files WHERE library_id = ? AND source = ?", (library_id, source)
                )
                ids = [row[0] for row in rows]
                self.delete_files(ids)
                db.execute("DELETE FROM sources WHERE library_id = ? AND path = ?", (library_id, source))
                db.execute("DELETE FROM skipped WHERE library_id = ? AND (path = ? OR path LIKE ?)",
                           (library_id, source, source.rstrip(os.sep) + os.sep + "%"))  # fmt: skip

    def library_names(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT name FROM libraries ORDER BY name")]

    def library(self, name: str) -> LibraryInfo:
        with self._lock:
            library_id = self._library_id(name)
            db = self._db
            sources = tuple(row[0] for row in db.execute(
                "SELECT path FROM sources WHERE library_id = ? ORDER BY path", (library_id,)))  # fmt: skip
            n_files, n_passages = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(n_passages), 0) FROM files WHERE library_id = ?", (library_id,)
            ).fetchone()
            (n_skipped,) = db.execute(
                "SELECT COUNT(*) FROM skipped WHERE library_id = ?", (library_id,)
            ).fetchone()
            (updated_s,) = db.execute(
                "SELECT updated_s FROM libraries WHERE id = ?", (library_id,)
            ).fetchone()
            return LibraryInfo(name, sources, n_files, n_passages, n_skipped, updated_s)

    def libraries(self) -> list[LibraryInfo]:
        return [self.library(name) for name in self.library_names()]

    def skipped(self, name: str) -> list[SkippedFile]:
        with self._lock:
            rows = self._db.execute(
                "SELECT path, reason FROM skipped WHERE library_id = ? ORDER BY path",
                (self._library_id(name),),
            )
            return [SkippedFile(path, reason) for path, reason in rows]

    def _library_id(self, name: str) -> int:
        row = self._db.execute("SELECT id FROM libraries WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise LibraryNotFoundError(name, self.library_names_unlocked())
        return int(row[0])

    def library_id_unlocked(self, name: str) -> int:
        """``library_id`` for a caller already holding ``reading()``."""
        return self._library_id(name)

    def library_names_unlocked(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT name FROM libraries ORDER BY name")]

    # -- what the indexer writes ---------------------------------------------------------------------

    def library_id(self, name: str) -> int:
        with self._lock:
            return self._library_id(name)

    def file_states(self, library_id: int) -> dict[str, FileState]:
        with self._lock:
            rows = self._db.execute(
                "SELECT path, id, source, mtime_ns, size, sha256 FROM files WHERE library_id = ?",
                (library_id,),
            )
            return {path: FileState(*rest) for path, *rest in rows}

    def skipped_states(self, library_id: int) -> dict[str, tuple[str, int | None, int | None]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT path, reason, mtime_ns, size FROM skipped WHERE library_id = ?", (library_id,)
            )
            return {path: (reason, mtime_ns, size) for path, reason, mtime_ns, size in rows}

    def put_file(self, library_id: int, source: str, path: str, stat: os.stat_result, sha256: str,
                 passages: Sequence[Passage]) -> None:  # fmt: skip
        """Add or replace a file and its passages (call inside ``transaction``)."""
        db = self._db
        old = db.execute(
            "SELECT id FROM files WHERE library_id = ? AND path = ?", (library_id, path)
        ).fetchone()
        if old is not None:
            self.delete_files([old[0]])
        cursor = db.execute(
            "INSERT INTO files (library_id, source, path, mtime_ns, size, sha256, n_passages) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (library_id, source, path, stat.st_mtime_ns, stat.st_size, sha256, len(passages)),
        )
        file_id = cursor.lastrowid
        (first,) = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM passages").fetchone()
        ids = range(first, first + len(passages))
        db.executemany(
            "INSERT INTO passages (id, file_id, ordinal, page, line_start, line_end, n_tokens) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(i, file_id, k, p.page, p.line_start, p.line_end, p.n_tokens)
             for k, (i, p) in enumerate(zip(ids, passages, strict=True))],
        )  # fmt: skip
        title = os.path.basename(path)
        db.executemany(
            "INSERT INTO passage_text (rowid, text, heading, title) VALUES (?, ?, ?, ?)",
            [(i, p.text, p.heading, title) for i, p in zip(ids, passages, strict=True)],
        )

    def touch_file(self, file_id: int, stat: os.stat_result) -> None:
        self._db.execute(
            "UPDATE files SET mtime_ns = ?, size = ? WHERE id = ?", (stat.st_mtime_ns, stat.st_size, file_id)
        )

    def delete_files(self, file_ids: Iterable[int]) -> None:
        db = self._db
        for file_id in file_ids:
            db.execute(
                "DELETE FROM passage_text WHERE rowid IN (SELECT id FROM passages WHERE file_id = ?)",
                (file_id,),
            )
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def replace_skipped(
        self, library_id: int, rows: Iterable[tuple[str, str, int | None, int | None]]
    ) -> None:
        """The library's skipped files: (path, reason, mtime_ns, size) each (call inside ``transaction``)."""
        self._db.execute("DELETE FROM skipped WHERE library_id = ?", (library_id,))
        self._db.executemany(
            "INSERT OR REPLACE INTO skipped (library_id, path, reason, mtime_ns, size) "
            "VALUES (?, ?, ?, ?, ?)",
            [(library_id, *row) for row in rows],
        )

    def mark_updated(self, library_id: int) -> None:
        self._db.execute("UPDATE libraries SET updated_s = ? WHERE id = ?", (time.time(), library_id))

    # -- search --------------------------------------------------------------------------------------

    def search(self, libraries: Sequence[str], question: str, limit: int = 20) -> list[Hit]:
        """The passages of ``libraries`` that best match ``question`` by BM25, best first (search.py)."""
        from .search import search

        return search(self, libraries, question, limit)

    def passage(self, passage_id: int) -> Hit | None:
        with self._lock:
            row = self._db.execute(
                "SELECT p.id, l.name, f.path, f.source, t.text, t.heading, p.n_tokens, 0.0, p.page, "
                "p.line_start, p.line_end FROM passages p JOIN passage_text t ON t.rowid = p.id "
                "JOIN files f ON f.id = p.file_id JOIN libraries l ON l.id = f.library_id WHERE p.id = ?",
                (passage_id,),
            ).fetchone()
        return None if row is None else Hit(*row)
