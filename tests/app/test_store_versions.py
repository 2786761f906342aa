"""Message versions in the store: the tree (parent_id, active), switching, deleting, and the migration
that turns an old database's messages into one thread. Real SQLite files under tmp_path."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from smallmind_app.history.schema import MIGRATIONS, SCHEMA_VERSION
from smallmind_app.history.store import ConversationStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ConversationStore]:
    with ConversationStore(tmp_path / "conversations.sqlite3") as opened:
        yield opened


def contents(store: ConversationStore, conversation_id: str) -> list[str]:
    return [m.content for m in store.messages(conversation_id)]


def test_regenerated_and_edited_messages_are_versions_of_their_place(store: ConversationStore) -> None:
    cid = store.create_conversation().id
    question = store.add_message(cid, "user", "Q1")
    first = store.add_message(cid, "assistant", "A1")
    store.start_version(cid, first.id)  # regenerate: A1 stays, the next reply is its new version
    assert contents(store, cid) == ["Q1"]
    second = store.add_message(cid, "assistant", "A1 again")
    store.add_message(cid, "user", "Q2")
    store.add_message(cid, "assistant", "A2")
    assert contents(store, cid) == ["Q1", "A1 again", "Q2", "A2"]
    assert store.version_info(cid) == {second.id: (2, 2)}

    store.start_version(cid, question.id)  # edit the first question: everything after it is kept
    edited = store.add_message(cid, "user", "Q1 edited")
    store.add_message(cid, "assistant", "A1'")
    assert contents(store, cid) == ["Q1 edited", "A1'"]
    assert store.version_info(cid) == {edited.id: (2, 2)}

    assert store.select_version(cid, edited.id, -5) == question.id  # clamped to the first version
    assert contents(store, cid) == ["Q1", "A1 again", "Q2", "A2"]  # the old branch, as it was left
    assert store.select_version(cid, second.id, -1) == first.id
    assert contents(store, cid) == ["Q1", "A1"]
    assert store.version_info(cid) == {question.id: (1, 2), first.id: (1, 2)}
    assert store.export_markdown(cid).endswith("## User\n\nQ1\n\n## Assistant\n\nA1\n")
    with pytest.raises(KeyError, match="no message"):
        store.select_version(store.create_conversation().id, first.id, 1)  # another conversation's


def test_deleting_a_chosen_version_chooses_the_newest_left(store: ConversationStore) -> None:
    cid = store.create_conversation().id
    store.add_message(cid, "user", "Q")
    old = store.add_message(cid, "assistant", "old")
    store.add_message(cid, "user", "follow-up under old")
    store.start_version(cid, old.id)
    failed = store.add_message(cid, "assistant", "", "streaming")  # a regenerate the engine refused
    assert store.delete_messages_from(cid, failed.id) == 1
    assert contents(store, cid) == ["Q", "old", "follow-up under old"] and store.version_info(cid) == {}
    assert store.delete_messages_from(cid, old.id) == 2  # a message goes with all that follows it
    assert contents(store, cid) == ["Q"]


def test_an_old_database_migrates_to_one_thread_per_conversation(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    MIGRATIONS[0](db)  # the first schema, as an old SmallMind wrote it
    db.execute("PRAGMA user_version=1")
    for cid in ("a", "b"):
        db.execute("INSERT INTO conversations VALUES (?, 'T', '', '{}', 0, 0, 0)", (cid,))
    rows = [("a", "user", "a1"), ("b", "user", "b1"), ("a", "assistant", "a2"), ("b", "assistant", "b2")]
    db.executemany(
        "INSERT INTO messages (conversation_id, role, content, status, created_at) "
        "VALUES (?, ?, ?, 'complete', 0)",
        rows,
    )
    db.commit()
    db.close()
    with ConversationStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert contents(store, "a") == ["a1", "a2"] and contents(store, "b") == ["b1", "b2"]
        reply = store.messages("a")[-1]
        store.start_version("a", reply.id)
        store.add_message("a", "assistant", "a2 again")
        assert contents(store, "a") == ["a1", "a2 again"] and contents(store, "b") == ["b1", "b2"]
        assert sorted(store.version_info("a").values()) == [(2, 2)]
