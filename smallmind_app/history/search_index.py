"""The history's queries: every conversation with a one-line preview, pins, and full-text search (FTS5).

The search index lives in the conversations database and is kept in step by SQLite itself: triggers
on ``messages`` and ``conversations`` update it inside the same transaction as the write, whichever
code makes it (the store, a migration, a test writing rows by hand). ``message_search`` is an FTS5
index over the messages' text (external content: the text is stored once, in ``messages``);
``title_search`` indexes the titles. ``add_search_index`` is the schema migration that creates both
and fills them from the rows already there; ``ensure_search_index`` puts the triggers back (and
rebuilds the index) should a later migration have rebuilt a table and dropped them with it.

No Qt here: the store calls these with its connection, under its lock.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass

MARK_START, MARK_END = "\x02", "\x03"  # around each matched word of a snippet or title
SNIPPET_WORDS = 12
PREVIEW_CHARS = 160
TOKENIZER = "unicode61 remove_diacritics 2"
_WORD = re.compile(r"\w+", re.UNICODE)

_TRIGGERS = {
    "message_search_insert": """CREATE TRIGGER message_search_insert AFTER INSERT ON messages BEGIN
        INSERT INTO message_search (rowid, content) VALUES (new.id, new.content); END""",
    "message_search_delete": """CREATE TRIGGER message_search_delete AFTER DELETE ON messages BEGIN
        INSERT INTO message_search (message_search, rowid, content) VALUES ('delete', old.id, old.content);
        END""",
    "message_search_update": """CREATE TRIGGER message_search_update AFTER UPDATE OF content ON messages
        BEGIN
        INSERT INTO message_search (message_search, rowid, content) VALUES ('delete', old.id, old.content);
        INSERT INTO message_search (rowid, content) VALUES (new.id, new.content); END""",
    "title_search_insert": """CREATE TRIGGER title_search_insert AFTER INSERT ON conversations BEGIN
        INSERT INTO title_search (conversation_id, title) VALUES (new.id, new.title); END""",
    "title_search_update": """CREATE TRIGGER title_search_update AFTER UPDATE OF title ON conversations
        BEGIN UPDATE title_search SET title = new.title WHERE conversation_id = old.id; END""",
    "title_search_delete": """CREATE TRIGGER title_search_delete AFTER DELETE ON conversations BEGIN
        DELETE FROM title_search WHERE conversation_id = old.id; END""",
}


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    """One row of the history: what the sidebar shows of a conversation."""

    id: str
    title: str
    raw_preview: str  # the start of its last message with text ("" when it has none)
    last_active: float  # its newest message's time, else its creation time (seconds since the epoch)
    pinned: bool
    model: str = ""  # the model of its last reply ("" when none says): who said it

    @property
    def preview(self) -> str:
        """``raw_preview`` on one line, after the model of its last reply (made when shown: a list of
        thousands shows a few)."""
        return f"{self.model}: {one_line(self.raw_preview)}" if self.model else one_line(self.raw_preview)


@dataclass(frozen=True, slots=True)
class SearchHit:
    """Why a conversation matches a search; the matched words are between MARK_START and MARK_END."""

    conversation_id: str
    title: str | None  # the title with its matches marked, when the title matches
    message_id: int | None  # its newest message that matches, if any (``snippet`` shows its words)


def add_search_index(db: sqlite3.Connection) -> None:
    """Schema migration: the FTS5 indexes of messages and titles, pins, filled from the existing rows."""
    db.execute(
        "CREATE VIRTUAL TABLE message_search USING fts5("
        f"content, content='messages', content_rowid='id', tokenize='{TOKENIZER}')"
    )
    db.execute(
        "CREATE VIRTUAL TABLE title_search USING fts5("
        f"conversation_id UNINDEXED, title, tokenize='{TOKENIZER}')"
    )
    db.execute(
        """CREATE TABLE pinned_conversations (
            conversation_id TEXT PRIMARY KEY REFERENCES conversations(id) ON DELETE CASCADE,
            pinned_at REAL NOT NULL)"""
    )
    _create_triggers(db)
    _rebuild(db)


def _missing_triggers(db: sqlite3.Connection) -> list[str] | None:
    """The search triggers the database lacks; None when it has no search index at all."""
    names = {
        row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'trigger')")
    }
    if "message_search" not in names:
        return None
    return [name for name in _TRIGGERS if name not in names]


def search_index_broken(db: sqlite3.Connection) -> bool:
    return bool(_missing_triggers(db))


def ensure_search_index(db: sqlite3.Connection) -> bool:
    """Recreate missing triggers and rebuild the index (a table rebuilt by a later migration drops its
    triggers); True when something had to be repaired. A no-op on a database without the index."""
    missing = _missing_triggers(db)
    if not missing:
        return False
    for name in missing:
        db.execute(_TRIGGERS[name])
    db.execute("DELETE FROM title_search")
    _rebuild(db)
    return True


def _create_triggers(db: sqlite3.Connection) -> None:
    for statement in _TRIGGERS.values():
        db.execute(statement)


def _rebuild(db: sqlite3.Connection) -> None:
    db.execute("INSERT INTO message_search (message_search) VALUES ('rebuild')")
    db.execute("INSERT INTO title_search (conversation_id, title) SELECT id, title FROM conversations")


def summaries(db: sqlite3.Connection) -> list[ConversationSummary]:
    """Every conversation: pinned ones first (last pinned first), then newest activity first."""
    rows = db.execute(
        f"""SELECT c.id, c.title, p.pinned_at IS NOT NULL AS pinned,
               COALESCE((SELECT m.created_at FROM messages m WHERE m.conversation_id = c.id
                         ORDER BY m.id DESC LIMIT 1), c.created_at) AS last_active,
               (SELECT substr(m.content, 1, {PREVIEW_CHARS}) FROM messages m
                 WHERE m.conversation_id = c.id AND m.role != 'system' AND m.content != ''
                 ORDER BY m.id DESC LIMIT 1) AS preview,
               (SELECT m.model FROM messages m WHERE m.conversation_id = c.id AND m.role = 'assistant'
                 AND m.active = 1 AND m.model != '' ORDER BY m.id DESC LIMIT 1) AS model
            FROM conversations c LEFT JOIN pinned_conversations p ON p.conversation_id = c.id
            ORDER BY p.pinned_at IS NULL, p.pinned_at DESC, last_active DESC"""
    ).fetchall()
    return [ConversationSummary(r[0], r[1], r[4] or "", r[3], bool(r[2]), r[5] or "") for r in rows]


def one_line(text: str) -> str:
    return " ".join(text.split())


def word_queries(text: str) -> list[str]:
    """One FTS5 query per word the user typed, quoted (no word is read as FTS syntax); the last one a
    prefix, so results come while typing."""
    quoted = ['"' + word.replace('"', '""') + '"' for word in _WORD.findall(text)]
    if quoted:
        quoted[-1] += "*"
    return quoted


def fts_query(text: str) -> str | None:
    """A query matching a text that holds any word of ``text`` (for snippets); None without words."""
    return " OR ".join(word_queries(text)) or None


def _newest_message_by_conversation(db: sqlite3.Connection, query: str) -> dict[str, int]:
    rows = db.execute(
        """SELECT m.conversation_id, MAX(m.id) FROM message_search s JOIN messages m ON m.id = s.rowid
           WHERE message_search MATCH ? GROUP BY m.conversation_id""",
        (query,),
    )
    return dict(rows.fetchall())


def _titled(db: sqlite3.Connection, query: str) -> set[str]:
    return {
        row[0]
        for row in db.execute("SELECT conversation_id FROM title_search WHERE title_search MATCH ?", (query,))
    }


def _marked_titles(db: sqlite3.Connection, query: str) -> dict[str, str]:
    rows = db.execute(
        "SELECT conversation_id, highlight(title_search, 1, ?, ?) FROM title_search "
        "WHERE title_search MATCH ?",
        (MARK_START, MARK_END, query),
    )
    return dict(rows.fetchall())


def search(db: sqlite3.Connection, text: str) -> dict[str, SearchHit]:
    """{conversation id: hit} for the conversations holding every word of ``text`` in their title or
    messages (not necessarily in one message), newest hit first. A hit's message is the newest one
    holding one of the words; ``snippet`` makes its snippet (the sidebar: for the rows shown)."""
    queries = word_queries(text)
    if not queries:
        return {}
    newest = [_newest_message_by_conversation(db, query) for query in queries]  # per word
    titled = [_titled(db, query) for query in queries]
    found = set(newest[0]) | titled[0]
    for by_message, by_title in zip(newest[1:], titled[1:], strict=True):
        found &= set(by_message) | by_title
    marked = _marked_titles(db, " OR ".join(queries)) if found & set().union(*titled) else {}
    hits = []
    for cid in found:
        message_ids = [by_message[cid] for by_message in newest if cid in by_message]
        hits.append(SearchHit(cid, marked.get(cid), max(message_ids) if message_ids else None))
    hits.sort(key=lambda hit: -(hit.message_id or 0))
    return {hit.conversation_id: hit for hit in hits}


def snippet(db: sqlite3.Connection, message_id: int, text: str) -> str:
    """A few words of the message around the words of ``text`` (marked), on one line; "" if none match."""
    query = fts_query(text)
    if query is None:
        return ""
    row = db.execute(
        f"SELECT snippet(message_search, 0, ?, ?, '…', {SNIPPET_WORDS}) FROM message_search "
        "WHERE message_search MATCH ? AND rowid = ?",
        (MARK_START, MARK_END, query, message_id),
    ).fetchone()
    return one_line(row[0]) if row else ""


def set_pinned(db: sqlite3.Connection, conversation_id: str, pinned: bool, now: float) -> None:
    if pinned:
        db.execute(
            "INSERT OR REPLACE INTO pinned_conversations (conversation_id, pinned_at) VALUES (?, ?)",
            (conversation_id, now),
        )
    else:
        db.execute("DELETE FROM pinned_conversations WHERE conversation_id = ?", (conversation_id,))


def marked_words(marked: str) -> list[str]:
    """The matched words of a snippet or title (the text between the marks)."""
    return re.findall(f"{MARK_START}(.*?){MARK_END}", marked, re.S)
