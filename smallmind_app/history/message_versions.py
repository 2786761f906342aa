"""Message versions: the ``parent_id`` tree of a conversation's messages, as SQL on the store's
connection (the store calls these under its lock, inside its transactions). No Qt.

Each message points to the one it follows; messages following the same one are versions of that
place (a regenerated reply, an edited question) and ``active`` marks the chosen one. The chosen
thread is the conversation as it continues.
"""

from __future__ import annotations

import sqlite3
import time

# The chosen thread of conversation ?: the chosen first message, then the chosen follower of each.
THREAD = (
    "thread(id) AS (SELECT id FROM messages WHERE conversation_id = ? AND parent_id IS NULL AND active "
    "UNION ALL SELECT m.id FROM messages m JOIN thread t ON m.parent_id = t.id WHERE m.active)"
)


def thread_ids(db: sqlite3.Connection, conversation_id: str) -> list[int]:
    rows = db.execute(f"WITH RECURSIVE {THREAD} SELECT id FROM thread ORDER BY id", (conversation_id,))
    return [row[0] for row in rows]


def thread_rows(db: sqlite3.Connection, conversation_id: str) -> list[sqlite3.Row]:
    """The chosen thread's messages, oldest first."""
    query = f"WITH RECURSIVE {THREAD} SELECT * FROM messages WHERE id IN thread ORDER BY id"
    return db.execute(query, (conversation_id,)).fetchall()


def owned(db: sqlite3.Connection, conversation_id: str, message_id: int) -> sqlite3.Row:
    row = db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is None or row["conversation_id"] != conversation_id:
        raise KeyError(f"no message {message_id} in conversation {conversation_id!r}")
    return row


def versions_of(db: sqlite3.Connection, conversation_id: str, parent_id: int | None) -> list[int]:
    rows = db.execute(
        "SELECT id FROM messages WHERE conversation_id = ? AND parent_id IS ? ORDER BY id",
        (conversation_id, parent_id),
    )
    return [row[0] for row in rows]


def delete_from(db: sqlite3.Connection, conversation_id: str, message_id: int) -> int:
    """Delete `message_id` and every message that follows it, in all versions; when it was the chosen
    version, the newest version left is chosen again. How many were deleted."""
    row = owned(db, conversation_id, message_id)
    below = db.execute(
        "WITH RECURSIVE below(id) AS (SELECT ? UNION ALL "
        "SELECT m.id FROM messages m JOIN below ON m.parent_id = below.id) SELECT id FROM below",
        (message_id,),
    ).fetchall()
    cursor = db.executemany("DELETE FROM messages WHERE id = ?", below)
    if row["active"]:
        db.execute(
            "UPDATE messages SET active = 1 WHERE id = (SELECT MAX(id) FROM messages "
            "WHERE conversation_id = ? AND parent_id IS ?)",
            (conversation_id, row["parent_id"]),
        )
    db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), conversation_id))
    return cursor.rowcount


def select(db: sqlite3.Connection, conversation_id: str, message_id: int, step: int) -> int:
    """Choose the version `step` places after (before, when negative) `message_id` among the versions
    of its place, clamped to the first and last; the chosen message's id."""
    row = owned(db, conversation_id, message_id)
    group = versions_of(db, conversation_id, row["parent_id"])
    chosen = group[max(0, min(len(group) - 1, group.index(message_id) + step))]
    db.execute(
        "UPDATE messages SET active = (id = ?) WHERE conversation_id = ? AND parent_id IS ?",
        (chosen, conversation_id, row["parent_id"]),
    )
    db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), conversation_id))
    return chosen


def version_info(db: sqlite3.Connection, conversation_id: str) -> dict[int, tuple[int, int]]:
    """For each message of the chosen thread that has other versions: (its number, how many), 1-based."""
    rows = db.execute(
        f"WITH RECURSIVE {THREAD} SELECT m.id, "
        "(SELECT COUNT(*) FROM messages s WHERE s.conversation_id = m.conversation_id "
        " AND s.parent_id IS m.parent_id AND s.id <= m.id), "
        "(SELECT COUNT(*) FROM messages s WHERE s.conversation_id = m.conversation_id "
        " AND s.parent_id IS m.parent_id) "
        "FROM messages m WHERE m.id IN thread",
        (conversation_id,),
    ).fetchall()
    return {row[0]: (row[1], row[2]) for row in rows if row[2] > 1}
