"""The conversations database's tables and how an older file is brought up to date.

The schema version is ``PRAGMA user_version``; ``MIGRATIONS[n]`` takes version n to n + 1 (the
store runs them in one transaction when it opens an older file). No Qt.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from ..paths import smollm2_system_prompt
from . import search_index

ROLES = ("system", "user", "assistant")
STATUSES = ("complete", "partial", "streaming", "error")


def create_tables(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL,
            system_prompt TEXT NOT NULL,
            settings_json TEXT NOT NULL DEFAULT '{}',
            position INTEGER NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL)"""
    )
    db.execute(
        f"""CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN {ROLES}),
            content TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN {STATUSES}),
            stats_json TEXT NOT NULL DEFAULT '{{}}',
            created_at REAL NOT NULL)"""
    )
    db.execute("CREATE INDEX messages_by_conversation ON messages (conversation_id, id)")


def add_message_versions(db: sqlite3.Connection) -> None:
    """Versions: every message points to the one it follows (``parent_id``); messages with the same
    parent are versions of each other (a regenerated reply, an edited question) and ``active`` marks
    the chosen one. An old database's messages become one thread, each following the one before."""
    db.execute("ALTER TABLE messages ADD COLUMN parent_id INTEGER")
    db.execute("ALTER TABLE messages ADD COLUMN active INTEGER NOT NULL DEFAULT 1")
    db.execute(
        """UPDATE messages SET parent_id = (
            SELECT MAX(p.id) FROM messages p WHERE p.conversation_id = messages.conversation_id
            AND p.id < messages.id)"""
    )
    db.execute("CREATE INDEX messages_by_parent ON messages (parent_id, conversation_id)")


def add_message_authors(db: sqlite3.Connection) -> None:
    """Who said it: each reply's model (its file name without .gguf, or a server's model) and engine
    ("local", or the server's name); "" for the user's messages and for replies stored before.

    A conversation whose system prompt is the one SmolLM2 ships (the old built-in default, stored with
    every conversation) gets none of its own: its model's default applies, as for a new one (SmolLM2's
    chat template writes that very prompt, so its replies are the same; other models no longer
    inherit it)."""
    db.execute("ALTER TABLE messages ADD COLUMN model TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE messages ADD COLUMN engine TEXT NOT NULL DEFAULT ''")
    db.execute(
        "UPDATE conversations SET system_prompt = '' WHERE system_prompt = ?", (smollm2_system_prompt(),)
    )


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    create_tables,
    search_index.add_search_index,  # full-text search of titles and messages (FTS5), pins
    add_message_versions,  # regenerated replies and edited messages kept as versions
    add_message_authors,  # each reply's model and engine; the model's own system prompt by default
]
SCHEMA_VERSION = len(MIGRATIONS)
