"""Conversations and their messages in one SQLite file.

Durability: the database runs in WAL mode with ``synchronous=NORMAL`` and every write method is its
own committed transaction. A committed transaction survives a crash of the process (SIGKILL, a
segfault, the power button of the app); only an OS crash or power loss can lose the last few commits
(WAL + NORMAL syncs at checkpoints, not at every commit), and even then the file stays consistent.
A reply is streamed as ``add_message(..., status="streaming")``, then ``update_message(content=...)``
every second or so, then the final status; at the next start ``mark_interrupted()`` turns a reply
that a crash cut off from "streaming" into "partial".

Failures: every SQLite error is raised as ``StoreError`` with a sentence for the user naming the
file ("cannot save the message: the disk is full (/path/conversations.sqlite3)"), so the app can keep
the conversation in memory and say so. A file that is not a database (or is damaged) raises
``StoreCorruptError`` at open; ``move_aside(path)`` moves it and its WAL files out of the way.
Unknown conversation or message ids raise ``KeyError``; bad roles, statuses or orders ``ValueError``.

Versions: each message points to the one it follows (``parent_id``); messages following the same
one are versions of that place (a regenerated reply, an edited question), and ``active`` marks the
chosen one. ``messages()`` is the chosen thread; ``start_version`` keeps a message (and all after it)
as an older version before its new one is added; ``select_version`` switches; ``version_info`` says
which messages have versions. ``replace_messages`` stores one thread (the versions are dropped).

The tables and their migrations: ``schema.py``; the version tree's SQL: ``message_versions.py``;
the rows as records and the errors: ``records.py``; the history's search: ``search_index.py``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import paths
from ..paths import default_system_prompt
from . import message_versions, schema, search_index
from .records import (
    Conversation,
    Message,
    StoreError,
    check_choice,
    conversation_from,
    message_from,
    store_error,
    to_json,
)
from .schema import ROLES, STATUSES
from .search_index import ConversationSummary, SearchHit

logger = logging.getLogger(__name__)

WAL_SUFFIXES = ("-wal", "-shm")
BUSY_TIMEOUT_S = 5.0


_STATUS_NOTES = {
    "partial": "*(reply interrupted)*",
    "streaming": "*(reply in progress)*",
    "error": "*(reply failed)*",
}


class ConversationStore:
    """Conversations (tabs) and their messages, persisted at `path`. Safe to share between threads."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the folder for the conversations database ({self.path}): {exc}"
            ) from exc
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
            )
            self._db.row_factory = sqlite3.Row
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                logger.warning("%s: journal_mode is %s, not wal", self.path, mode)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            self.close()
            raise store_error("open the conversations database", self.path, exc) from exc
        except StoreError:
            self.close()
            raise

    def _migrate(self) -> None:
        version = self.schema_version
        if version > schema.SCHEMA_VERSION:
            raise StoreError(
                f"cannot open the conversations database: it was written by a newer SmallMind "
                f"(schema {version}; this one reads up to {schema.SCHEMA_VERSION}) ({self.path})"
            )
        if version == schema.SCHEMA_VERSION:
            if search_index.search_index_broken(self._connection()):
                with self._transaction("repair the search index") as db:
                    search_index.ensure_search_index(db)
            return
        with self._transaction("update the conversations database") as db:
            for step in range(version, schema.SCHEMA_VERSION):
                logger.info("%s: migrating schema %d -> %d", self.path, step, step + 1)
                schema.MIGRATIONS[step](db)
            search_index.ensure_search_index(db)  # a later step may have rebuilt a table, dropping triggers
            db.execute(f"PRAGMA user_version={schema.SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        with self._reading() as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """One committed write transaction; any SQLite error rolls back and becomes a StoreError."""
        with self._lock:
            db = self._connection()
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:  # SQLite may already have rolled back (e.g. after SQLITE_FULL)
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise store_error(action, self.path, exc) from exc
                raise

    @contextmanager
    def _reading(self, action: str = "read the conversations") -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._connection()
            except sqlite3.Error as exc:
                raise store_error(action, self.path, exc) from exc

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"the conversations database is closed ({self.path})")
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- conversations -------------------------------------------------------------------------------

    def create_conversation(
        self,
        title: str = "New chat",
        system_prompt: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Conversation:
        """A new conversation after the existing ones; system_prompt None means the default prompt."""
        prompt = default_system_prompt() if system_prompt is None else system_prompt
        settings_json = to_json(settings, "settings")
        now = time.time()
        conversation_id = uuid.uuid4().hex
        with self._transaction("create the conversation") as db:
            position = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM conversations").fetchone()[0]
            db.execute(
                "INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, title, prompt, settings_json, position, now, now),
            )
            row = db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return conversation_from(row)

    def list_conversations(self) -> list[Conversation]:
        with self._reading() as db:
            rows = db.execute("SELECT * FROM conversations ORDER BY position, created_at").fetchall()
        return [conversation_from(row) for row in rows]

    def conversation_titles(self) -> dict[str, str]:
        """{id: title} of every conversation in tab order (cheaper than ``list_conversations``)."""
        with self._reading() as db:
            return dict(
                db.execute("SELECT id, title FROM conversations ORDER BY position, created_at").fetchall()
            )

    def get_conversation(self, conversation_id: str) -> Conversation | None:
        with self._reading() as db:
            row = db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return conversation_from(row) if row else None

    def _update_conversation(self, conversation_id: str, action: str, column: str, value: Any) -> None:
        with self._transaction(action) as db:
            cursor = db.execute(
                f"UPDATE conversations SET {column} = ?, updated_at = ? WHERE id = ?",
                (value, time.time(), conversation_id),
            )
            if cursor.rowcount == 0:
                raise KeyError(f"no conversation {conversation_id!r}")

    def rename(self, conversation_id: str, title: str) -> None:
        self._update_conversation(conversation_id, "rename the conversation", "title", title)

    def set_system_prompt(self, conversation_id: str, text: str) -> None:
        self._update_conversation(conversation_id, "save the system prompt", "system_prompt", text)

    def set_conversation_settings(self, conversation_id: str, settings: Mapping[str, Any]) -> None:
        """Replace the conversation's settings (a JSON object: per-tab sampling overrides)."""
        settings_json = to_json(settings, "settings")
        self._update_conversation(
            conversation_id, "save the conversation settings", "settings_json", settings_json
        )

    def reorder(self, ids_in_order: Sequence[str]) -> None:
        """Set the tab order; `ids_in_order` must name every conversation exactly once."""
        with self._transaction("save the tab order") as db:
            existing = {row[0] for row in db.execute("SELECT id FROM conversations")}
            if len(ids_in_order) != len(set(ids_in_order)) or set(ids_in_order) != existing:
                raise ValueError(
                    f"reorder needs every conversation id exactly once; got {list(ids_in_order)}, "
                    f"have {sorted(existing)}"
                )
            db.executemany(
                "UPDATE conversations SET position = ? WHERE id = ?", list(enumerate(ids_in_order))
            )

    def delete_conversation(self, conversation_id: str) -> None:
        """Delete the conversation and (by cascade) its messages."""
        with self._transaction("delete the conversation") as db:
            if db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount == 0:
                raise KeyError(f"no conversation {conversation_id!r}")

    # -- messages ------------------------------------------------------------------------------------

    def add_message(
        self,
        conversation_id: str,
        role: str,
        content: str,
        status: str = "complete",
        stats: Mapping[str, Any] | None = None,
        model: str = "",
        engine: str = "",
    ) -> Message:
        """A message after the conversation's last; ``model`` and ``engine`` say who wrote a reply."""
        check_choice("role", role, ROLES)
        check_choice("status", status, STATUSES)
        stats_json = to_json(stats, "stats")
        now = time.time()
        with self._transaction("save the message") as db:
            touched = db.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
            )
            if touched.rowcount == 0:
                raise KeyError(f"no conversation {conversation_id!r}")
            thread = message_versions.thread_ids(db, conversation_id)
            cursor = db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, stats_json, created_at, "
                "parent_id, model, engine) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, status, stats_json, now, thread[-1] if thread else None,
                 model, engine),
            )  # fmt: skip
            row = db.execute("SELECT * FROM messages WHERE id = ?", (cursor.lastrowid,)).fetchone()
        return message_from(row)

    def update_message(
        self,
        message_id: int,
        *,
        content: str | None = None,
        status: str | None = None,
        stats: Mapping[str, Any] | None = None,
        model: str | None = None,
        engine: str | None = None,
    ) -> Message:
        """Change the given fields of a message (stats are replaced, not merged); the updated message."""
        changes: dict[str, Any] = {}
        if model is not None:
            changes["model"] = model
        if engine is not None:
            changes["engine"] = engine
        if content is not None:
            changes["content"] = content
        if status is not None:
            changes["status"] = check_choice("status", status, STATUSES)
        if stats is not None:
            changes["stats_json"] = to_json(stats, "stats")
        with self._transaction("save the message") as db:
            if changes:
                assignments = ", ".join(f"{column} = ?" for column in changes)
                db.execute(f"UPDATE messages SET {assignments} WHERE id = ?", (*changes.values(), message_id))
            row = db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise KeyError(f"no message {message_id}")
            db.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), row["conversation_id"])
            )
        return message_from(row)

    def messages(self, conversation_id: str) -> list[Message]:
        """The conversation as it continues: the chosen version of every message, oldest first
        (empty for an unknown id). Older versions are kept; ``version_info`` tells where they are."""
        with self._reading() as db:
            rows = message_versions.thread_rows(db, conversation_id)
        return [message_from(row) for row in rows]

    def delete_messages_from(self, conversation_id: str, message_id: int) -> int:
        """Delete `message_id` and every message that follows it, in all versions (a reply that was
        never generated). When it was the chosen version, the newest version left is chosen again."""
        with self._transaction("delete the messages") as db:
            return message_versions.delete_from(db, conversation_id, message_id)

    # -- versions ------------------------------------------------------------------------------------

    def start_version(self, conversation_id: str, message_id: int) -> None:
        """Keep `message_id` and what follows it as an older version: the conversation now ends just
        before it, and the next message added there is its newest version (regenerate, edit)."""
        with self._transaction("keep the old version") as db:
            message_versions.owned(db, conversation_id, message_id)
            db.execute("UPDATE messages SET active = 0 WHERE id = ?", (message_id,))

    def select_version(self, conversation_id: str, message_id: int, step: int) -> int:
        """Choose the version `step` places after (before, when negative) `message_id` among the
        versions of its place, clamped to the first and last; the chosen message's id."""
        with self._transaction("switch the version") as db:
            return message_versions.select(db, conversation_id, message_id, step)

    def version_info(self, conversation_id: str) -> dict[int, tuple[int, int]]:
        """For each message of the conversation that has other versions: (its number, how many), 1-based."""
        with self._reading() as db:
            return message_versions.version_info(db, conversation_id)

    def replace_messages(
        self,
        conversation_id: str,
        messages: Sequence[
            tuple[str, str, str, Mapping[str, Any]] | tuple[str, str, str, Mapping[str, Any], str, str]
        ],
        system_prompt: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> list[Message]:
        """Make the stored conversation what the caller holds, in one transaction: its messages
        (role, content, status, stats[, model, engine]), oldest first, and its system prompt and
        settings when given.

        For a tab whose earlier writes failed (a full disk, a read-only file) once writing works again.
        Returns the stored messages (new ids, all dated now).
        """
        now = time.time()
        rows = [
            (conversation_id, check_choice("role", m[0], ROLES), m[1], check_choice("status", m[2], STATUSES),
             to_json(m[3], "stats"), now, *(m[4:6] if len(m) > 4 else ("", "")))
            for m in messages
        ]  # fmt: skip
        with self._transaction("save the conversation") as db:
            touched = db.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
            )
            if touched.rowcount == 0:
                raise KeyError(f"no conversation {conversation_id!r}")
            if system_prompt is not None:
                db.execute(
                    "UPDATE conversations SET system_prompt = ? WHERE id = ?",
                    (system_prompt, conversation_id),
                )
            if settings is not None:
                db.execute(
                    "UPDATE conversations SET settings_json = ? WHERE id = ?",
                    (to_json(settings, "settings"), conversation_id),
                )
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            parent_id = None
            for values in rows:  # one thread, each message following the one before
                parent_id = db.execute(
                    "INSERT INTO messages (conversation_id, role, content, status, stats_json, created_at, "
                    "model, engine, parent_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*values, parent_id),
                ).lastrowid
            stored = db.execute(
                "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
            ).fetchall()
        return [message_from(row) for row in stored]

    def mark_interrupted(self) -> int:
        """At startup: every 'streaming' message (a reply a crash cut off) becomes 'partial'; how many."""
        with self._transaction("mark interrupted replies") as db:
            return db.execute("UPDATE messages SET status = 'partial' WHERE status = 'streaming'").rowcount

    # -- history: previews, pins, search (queries in search_index.py) ---------------------------------

    def history(self) -> list[ConversationSummary]:
        """Every conversation with a preview: pinned first, then the newest activity first."""
        with self._reading() as db:
            return search_index.summaries(db)

    def search(self, text: str) -> dict[str, SearchHit]:
        """{conversation id: hit} for the conversations whose title or a message holds every word."""
        with self._reading("search the conversations") as db:
            return search_index.search(db, text)

    def snippet(self, message_id: int, text: str) -> str:
        """Words of the message around the words of ``text`` (search_index.MARK_START/END mark them)."""
        with self._reading("search the conversations") as db:
            return search_index.snippet(db, message_id, text)

    def set_pinned(self, conversation_id: str, pinned: bool) -> None:
        with self._transaction("pin the conversation") as db:
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                raise KeyError(f"no conversation {conversation_id!r}")
            search_index.set_pinned(db, conversation_id, pinned, time.time())

    # -- export and maintenance ----------------------------------------------------------------------

    def export_markdown(self, conversation_id: str) -> str:
        conversation = self.get_conversation(conversation_id)
        if conversation is None:
            raise KeyError(f"no conversation {conversation_id!r}")
        parts = [f"# {conversation.title}"]
        if conversation.system_prompt:
            parts.append(f"## System\n\n{conversation.system_prompt}")
        for message in self.messages(conversation_id):
            text = f"## {message.role.capitalize()}{author(message)}\n\n{message.content}"
            note = _STATUS_NOTES.get(message.status)
            parts.append(f"{text}\n\n{note}" if note else text)
        return "\n\n".join(parts) + "\n"

    def integrity_check(self) -> str:
        """SQLite's own check of the whole file: "ok", or one line per problem found."""
        with self._reading("check the conversations database") as db:
            return "\n".join(row[0] for row in db.execute("PRAGMA integrity_check"))


def author(message: Message) -> str:
    """ " (model · engine)" after a reply's heading in the export: who said it ("" when unknown)."""
    who = " · ".join(part for part in (message.model, message.engine) if part)
    return f" ({who})" if who else ""


def move_aside(path: Path | str) -> Path:
    """Rename a damaged database (and its -wal/-shm files) to ``<name>.corrupt-<timestamp>``; the new path."""
    path = Path(path)
    aside = paths.aside_path(path)
    try:
        os.replace(path, aside)
        for suffix in WAL_SUFFIXES:
            companion = path.with_name(path.name + suffix)
            if companion.exists():
                os.replace(companion, aside.with_name(aside.name + suffix))
    except OSError as exc:
        raise StoreError(f"cannot move the damaged database {path} aside: {exc}") from exc
    logger.warning("moved the damaged database %s to %s", path, aside)
    return aside
