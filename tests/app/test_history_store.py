"""The history's store side: the FTS5 search index kept in step by every write, the migration of an
existing database, previews, pins, and search over 5,000 generated conversations in a real file."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from smallmind_app.history import schema
from smallmind_app.history.records import StoreError
from smallmind_app.history.schema import SCHEMA_VERSION
from smallmind_app.history.search_index import MARK_END, MARK_START, fts_query, marked_words
from smallmind_app.history.store import ConversationStore
from tests.fixtures.history import fill_history


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "conversations.sqlite3"


def test_search_finds_words_of_messages_and_titles_with_marked_snippets(db_path: Path) -> None:
    with ConversationStore(db_path) as store:
        trip = store.create_conversation("Trip to Lisbon")
        other = store.create_conversation("Groceries")
        store.add_message(trip.id, "user", "Where should I eat pastéis de nata?")
        said = store.add_message(other.id, "user", "Remind me to buy Saffron for the paella tonight")
        store.add_message(other.id, "assistant", "Sure.")

        hits = store.search("saffron")
        assert set(hits) == {other.id}
        assert hits[other.id].message_id == said.id and hits[other.id].title is None
        snippet = store.snippet(said.id, "saffron")
        assert marked_words(snippet) == ["Saffron"]
        assert f"{MARK_START}Saffron{MARK_END} for the paella" in snippet
        assert store.snippet(said.id, "lisbon") == "" and store.snippet(said.id, "") == ""

        by_title = store.search("lisb")  # the last word is a prefix: results come while typing
        assert (
            set(by_title) == {trip.id} and by_title[trip.id].title == f"Trip to {MARK_START}Lisbon{MARK_END}"
        )
        assert set(store.search("pasteis")) == {trip.id}  # accents do not matter
        assert store.search("saffron lisbon") == {}  # every word must appear in the conversation
        both = store.search("lisbon nata")  # in its title and in a message
        assert set(both) == {trip.id} and both[trip.id].title is not None and both[trip.id].message_id
        assert set(store.search("paella sure")) == {other.id}  # in two of its messages
        assert store.search("paella sure")[other.id].message_id == store.messages(other.id)[-1].id
        assert store.search("   ") == {} and store.search("«»") == {}


@pytest.mark.parametrize(
    "text", ['"', "a*", "NEAR(", "-x", "col:x", "(", "'; DROP TABLE messages; --", "AND"]
)
def test_fts_syntax_typed_by_the_user_is_searched_as_words_never_an_error(db_path: Path, text: str) -> None:
    with ConversationStore(db_path) as store:
        conversation = store.create_conversation()
        store.add_message(conversation.id, "user", "x marks the spot AND near the col")
        store.search(text)  # no exception
        assert store.messages(conversation.id)
    assert fts_query("  ") is None


def test_the_index_follows_every_write_in_the_same_transaction(db_path: Path) -> None:
    with ConversationStore(db_path) as store:
        conversation = store.create_conversation("First")
        reply = store.add_message(conversation.id, "assistant", "", status="streaming")
        store.update_message(reply.id, content="the quokka smiled")  # a streamed reply is saved as it grows
        assert set(store.search("quokka")) == {conversation.id}
        store.update_message(reply.id, content="the wombat smiled")
        assert store.search("quokka") == {} and set(store.search("wombat")) == {conversation.id}

        store.rename(conversation.id, "Marsupials")
        assert set(store.search("marsupials")) == {conversation.id} and store.search("first") == {}

        store.delete_messages_from(conversation.id, reply.id)
        assert store.search("wombat") == {}
        store.replace_messages(conversation.id, [("user", "platypus facts", "complete", {})])
        assert store.search("platypus")[conversation.id].message_id == store.messages(conversation.id)[0].id

        store.delete_conversation(conversation.id)  # the cascade deletes the messages' index rows too
        assert store.search("platypus") == {} and store.search("marsupials") == {}
        assert store.integrity_check() == "ok"
        assert _fts_integrity(store)


def _fts_integrity(store: ConversationStore) -> bool:
    """FTS5's own check that the index matches the messages (raises when it does not)."""
    assert store._db is not None
    store._db.execute("INSERT INTO message_search (message_search, rank) VALUES ('integrity-check', 1)")
    return True


def test_a_write_that_fails_leaves_index_and_messages_as_they_were(db_path: Path) -> None:
    with ConversationStore(db_path) as store:
        conversation = store.create_conversation()
        store.add_message(conversation.id, "user", "alpha")
        with pytest.raises(ValueError, match="status"):
            store.replace_messages(conversation.id, [("user", "beta", "bogus", {})])
        with pytest.raises(KeyError):
            store.add_message("nope", "user", "gamma")
        assert set(store.search("alpha")) == {conversation.id}
        assert store.search("beta") == {} and store.search("gamma") == {}


def test_an_existing_database_migrates_and_its_rows_are_searchable(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as db:  # a database of the first schema, with a conversation in it
        schema.MIGRATIONS[0](db)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO conversations VALUES ('c1', 'Old chat', '', '{}', 0, 1.0, 1.0)")
        db.execute(
            "INSERT INTO messages (conversation_id, role, content, status, created_at) "
            "VALUES ('c1', 'user', 'an old question about zeppelins', 'complete', 2.0)"
        )
    with ConversationStore(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.search("zeppelins")["c1"].message_id == 1
        assert set(store.search("old chat")) == {"c1"}
        store.add_message("c1", "assistant", "airships, then")
        assert set(store.search("airships")) == {"c1"}
        assert _fts_integrity(store)


def test_lost_triggers_are_put_back_and_the_index_rebuilt_at_open(db_path: Path) -> None:
    """A later migration that rebuilds the messages table drops its triggers: the next open repairs."""
    with ConversationStore(db_path) as store:
        conversation = store.create_conversation()
    with sqlite3.connect(db_path) as db:
        db.execute("DROP TRIGGER message_search_insert")
        db.execute(
            "INSERT INTO messages (conversation_id, role, content, status, created_at) "
            "VALUES (?, 'user', 'unindexed narwhal', 'complete', 1.0)",
            (conversation.id,),
        )
    with ConversationStore(db_path) as store:
        assert set(store.search("narwhal")) == {conversation.id}
        store.add_message(conversation.id, "user", "and a beluga")
        assert set(store.search("beluga")) == {conversation.id}
        assert _fts_integrity(store)


def test_history_previews_order_and_pins(db_path: Path) -> None:
    with ConversationStore(db_path) as store:
        old, new, empty = (store.create_conversation(t) for t in ("old", "new", "empty"))
        store.add_message(old.id, "user", "first\n\n   line   two")
        time.sleep(0.01)  # distinct message times (the ordering is by time)
        store.add_message(new.id, "user", "hello")
        store.add_message(new.id, "assistant", "")  # an empty reply is not the preview
        rows = store.history()
        assert [r.id for r in rows[:2]] == [new.id, old.id] and rows[2].id == empty.id
        assert [r.preview for r in rows] == ["hello", "first line two", ""]
        assert not any(r.pinned for r in rows)

        store.set_pinned(old.id, True)
        rows = store.history()
        assert rows[0].id == old.id and rows[0].pinned
        store.set_pinned(old.id, False)
        assert store.history()[0].id == new.id
        with pytest.raises(KeyError):
            store.set_pinned("nope", True)
        store.set_pinned(new.id, True)
        store.delete_conversation(new.id)  # its pin goes with it
        assert [r.id for r in store.history()] == [old.id, empty.id]


def test_pins_survive_a_restart(db_path: Path) -> None:
    with ConversationStore(db_path) as store:
        a, b = store.create_conversation("a"), store.create_conversation("b")
        store.set_pinned(a.id, True)
    with ConversationStore(db_path) as store:
        assert [(r.id, r.pinned) for r in store.history()] == [(a.id, True), (b.id, False)]


def test_search_over_5000_conversations_is_exact(db_path: Path) -> None:
    ids = fill_history(db_path, 5000, n_turns=3, seed=3)
    with ConversationStore(db_path) as store:
        target = ids[1234]
        said = store.add_message(target, "user", "my cat is called Xylophonia")
        store.add_message(target, "assistant", "A lovely name.")
        store.add_message(target, "user", "What did I say?")  # the word was said turns ago
        assert len(store.history()) == 5000
        hits = store.search("xylophonia")
        assert set(hits) == {target} and hits[target].message_id == said.id

        common = store.search("coffee")  # in most conversations: every one of them, each once
        with sqlite3.connect(db_path) as db:
            newest: dict[str, int] = {}
            for cid, mid, content in db.execute("SELECT conversation_id, id, content FROM messages"):
                if "coffee" in content.lower().replace(".", "").split():
                    newest[cid] = max(newest.get(cid, 0), mid)
            titled = {cid for cid, title in db.execute("SELECT id, title FROM conversations")
                      if "coffee" in title.lower().split()}  # fmt: skip
        assert set(common) == set(newest) | titled and len(newest) > 1000
        assert {cid: hit.message_id for cid, hit in common.items() if hit.message_id} == newest
        assert all((hit.title is not None) == (cid in titled) for cid, hit in common.items())
        some = next(hit for hit in common.values() if hit.message_id)
        assert some.message_id is not None
        assert {word.lower() for word in marked_words(store.snippet(some.message_id, "coffee"))} == {"coffee"}


def test_a_closed_store_refuses_history_and_search(db_path: Path) -> None:
    store = ConversationStore(db_path)
    store.close()
    for call in (store.history, lambda: store.search("x"), lambda: store.set_pinned("x", True)):
        with pytest.raises(StoreError, match="closed"):
            call()


def _rebuild_messages_table(db: sqlite3.Connection) -> None:
    """A later migration as SQLite's docs do a schema change: new table, copy, drop, rename."""
    db.execute("CREATE TABLE messages_new AS SELECT * FROM messages")
    db.execute("DROP TABLE messages")  # its triggers go with it
    db.execute("ALTER TABLE messages_new RENAME TO messages")


def test_a_later_migration_that_rebuilds_the_messages_table_keeps_search_working(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ConversationStore(db_path) as store:
        conversation = store.create_conversation()
        store.add_message(conversation.id, "user", "the okapi is shy")
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, _rebuild_messages_table])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", len(schema.MIGRATIONS))
    with ConversationStore(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION + 1
        assert set(store.search("okapi")) == {conversation.id}
        store._db.execute(  # type: ignore[union-attr]
            "INSERT INTO messages (id, conversation_id, role, content, status, stats_json, created_at) "
            "VALUES (99, ?, 'user', 'a tapir too', 'complete', '{}', 1.0)",
            (conversation.id,),
        )
        assert set(store.search("tapir")) == {conversation.id}
        assert _fts_integrity(store)
