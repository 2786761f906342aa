"""history/store.py: CRUD, ordering, cascades, crash safety (a SIGKILLed writer), disk full, bad files.

Real SQLite files under each test's tmp dir; the crash test kills a real child process mid-write.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from smallmind_app.history.records import StoreCorruptError, StoreError
from smallmind_app.history.schema import SCHEMA_VERSION
from smallmind_app.history.store import ConversationStore, move_aside
from smallmind_app.settings.app_settings import default_system_prompt
from tests.fixtures.store_faults import fill_the_disk, free_the_disk

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "conversations.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[ConversationStore]:
    with ConversationStore(db_path) as opened:
        yield opened


def _raw_count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


# ---------------------------------------------------------------------------------------------------
# conversations


def test_create_get_and_list_conversations(store: ConversationStore) -> None:
    first = store.create_conversation()
    second = store.create_conversation(
        "Recipes", system_prompt="You are a chef.", settings={"temperature": 0.2}
    )

    assert first.title == "New chat" and first.system_prompt == default_system_prompt()
    assert uuid.UUID(hex=first.id).hex == first.id  # 32 lowercase hex digits: also the KV session id
    assert first.id != second.id
    assert (first.position, second.position) == (0, 1)
    assert second.settings == {"temperature": 0.2}
    assert store.get_conversation(second.id) == second
    assert store.get_conversation("nope") is None
    assert store.list_conversations() == [first, second]


def test_rename_prompt_and_settings_update_the_conversation(store: ConversationStore, db_path: Path) -> None:
    conversation = store.create_conversation()
    changes = [
        lambda: store.rename(conversation.id, "Renamed"),
        lambda: store.set_system_prompt(conversation.id, "Be brief."),
        lambda: store.set_conversation_settings(conversation.id, {"top_k": 5, "stop": ["END"]}),
    ]
    for change in changes:  # each change stamps updated_at: set it back to 0 first, so it must move
        with sqlite3.connect(db_path) as db:
            db.execute("UPDATE conversations SET updated_at = 0 WHERE id = ?", (conversation.id,))
        db.close()
        before = time.time()
        change()
        stamped = store.get_conversation(conversation.id)
        assert stamped is not None and before <= stamped.updated_at <= time.time()
    changed = store.get_conversation(conversation.id)
    assert changed is not None
    assert (changed.title, changed.system_prompt) == ("Renamed", "Be brief.")
    assert changed.settings == {"top_k": 5, "stop": ["END"]}
    with pytest.raises(ValueError, match="settings must be a JSON object"):
        store.set_conversation_settings(conversation.id, {"bad": object()})


def test_unknown_ids_raise_key_error(store: ConversationStore) -> None:
    conversation = store.create_conversation()
    with pytest.raises(KeyError):
        store.rename("missing", "x")
    with pytest.raises(KeyError):
        store.delete_conversation("missing")
    with pytest.raises(KeyError):
        store.add_message("missing", "user", "hi")
    with pytest.raises(KeyError):
        store.update_message(12345, content="x")
    with pytest.raises(KeyError):
        store.export_markdown("missing")
    other = store.create_conversation()
    message = store.add_message(other.id, "user", "hi")
    with pytest.raises(KeyError):  # a message of another conversation
        store.delete_messages_from(conversation.id, message.id)
    assert store.messages(other.id) == [message]


def test_reorder(store: ConversationStore) -> None:
    a, b, c = (store.create_conversation(title) for title in "abc")
    store.reorder([c.id, a.id, b.id])
    assert [conv.title for conv in store.list_conversations()] == ["c", "a", "b"]
    assert [conv.position for conv in store.list_conversations()] == [0, 1, 2]
    assert store.create_conversation("d").position == 3
    with pytest.raises(ValueError, match="every conversation id exactly once"):
        store.reorder([a.id, b.id])
    with pytest.raises(ValueError, match="every conversation id exactly once"):
        store.reorder([a.id, a.id, b.id, c.id])
    assert [conv.title for conv in store.list_conversations()] == ["c", "a", "b", "d"]  # rolled back


def test_delete_conversation_cascades_to_its_messages(store: ConversationStore, db_path: Path) -> None:
    kept, deleted = store.create_conversation("kept"), store.create_conversation("deleted")
    store.add_message(kept.id, "user", "stays")
    for text in ("a", "b", "c"):
        store.add_message(deleted.id, "user", text)
    store.delete_conversation(deleted.id)
    assert store.list_conversations() == [store.get_conversation(kept.id)]
    assert store.messages(deleted.id) == []
    assert _raw_count(db_path, "messages") == 1


# ---------------------------------------------------------------------------------------------------
# messages


def test_add_update_and_list_messages(store: ConversationStore) -> None:
    conversation = store.create_conversation()
    question = store.add_message(conversation.id, "user", "Why is the sky blue?")
    reply = store.add_message(conversation.id, "assistant", "", status="streaming")
    store.update_message(reply.id, content="Rayleigh")
    stats = {
        "n_tokens": 12,
        "tokens_per_s": 31.5,
        "ttft_ms": 80.0,
        "reused_tokens": 40,
        "finish_reason": "eos",
    }
    done = store.update_message(reply.id, content="Rayleigh scattering.", status="complete", stats=stats)

    assert done.content == "Rayleigh scattering." and done.status == "complete" and done.stats == stats
    assert store.messages(conversation.id) == [question, done]
    assert question.id < reply.id
    with pytest.raises(ValueError, match="role must be one of"):
        store.add_message(conversation.id, "robot", "x")
    with pytest.raises(ValueError, match="status must be one of"):
        store.update_message(reply.id, status="done")


def test_delete_messages_from_removes_that_message_and_later_ones(store: ConversationStore) -> None:
    conversation, other = store.create_conversation(), store.create_conversation()
    untouched = store.add_message(other.id, "user", "other tab")
    ids = [
        store.add_message(conversation.id, role, str(i)).id
        for i, role in enumerate(["user", "assistant"] * 3)
    ]

    assert store.delete_messages_from(conversation.id, ids[2]) == 4
    assert [m.id for m in store.messages(conversation.id)] == ids[:2]
    assert store.messages(other.id) == [untouched]
    # A new message never reuses a deleted id, so a late update for the old reply cannot hit it.
    assert store.add_message(conversation.id, "user", "again").id > max(ids)


def test_replace_messages_makes_the_stored_conversation_what_the_tab_holds(store: ConversationStore) -> None:
    conversation, other = store.create_conversation(), store.create_conversation()
    untouched = store.add_message(other.id, "user", "other tab")
    old = [store.add_message(conversation.id, "user", "saved before the disk filled").id]
    held = [
        ("user", "saved before the disk filled", "complete", {}),
        ("assistant", "kept in memory", "partial", {"n_tokens": 3, "finish_reason": "cancelled"}),
        ("user", "typed while the disk was full", "complete", {}),
    ]
    stored = store.replace_messages(conversation.id, held, system_prompt="Be brief.", settings={"a": 1})
    assert [(m.role, m.content, m.status, dict(m.stats)) for m in stored] == held
    assert stored == store.messages(conversation.id) and min(m.id for m in stored) > max(old)
    saved = store.get_conversation(conversation.id)
    assert saved is not None and saved.system_prompt == "Be brief." and dict(saved.settings) == {"a": 1}
    assert store.messages(other.id) == [untouched]

    with pytest.raises(ValueError, match="status must be one of"):  # nothing half-written
        store.replace_messages(conversation.id, [("user", "x", "complete", {}), ("user", "y", "done", {})])
    assert store.messages(conversation.id) == stored
    with pytest.raises(KeyError, match="no conversation"):
        store.replace_messages("nope", held)


def test_mark_interrupted_turns_streaming_into_partial(store: ConversationStore) -> None:
    conversation = store.create_conversation()
    complete = store.add_message(conversation.id, "assistant", "done")
    streaming = store.add_message(conversation.id, "assistant", "half a rep", status="streaming")
    failed = store.add_message(conversation.id, "assistant", "", status="error")
    assert store.mark_interrupted() == 1
    statuses = {m.id: m.status for m in store.messages(conversation.id)}
    assert statuses == {complete.id: "complete", streaming.id: "partial", failed.id: "error"}
    assert store.mark_interrupted() == 0


def test_export_markdown(store: ConversationStore) -> None:
    conversation = store.create_conversation("Sky", system_prompt="Be brief.")
    store.add_message(conversation.id, "user", "Why blue?")
    store.add_message(conversation.id, "assistant", "Scattering.")
    store.add_message(conversation.id, "user", "More?")
    store.add_message(conversation.id, "assistant", "Shorter wavel", status="partial")
    assert store.export_markdown(conversation.id) == (
        "# Sky\n\n## System\n\nBe brief.\n\n## User\n\nWhy blue?\n\n## Assistant\n\nScattering.\n\n"
        "## User\n\nMore?\n\n## Assistant\n\nShorter wavel\n\n*(reply interrupted)*\n"
    )


# ---------------------------------------------------------------------------------------------------
# the file: persistence, WAL, schema, integrity


def test_everything_persists_across_close_and_reopen(db_path: Path) -> None:
    with ConversationStore(db_path) as store:
        a, b = store.create_conversation("a"), store.create_conversation("b", settings={"seed": 1})
        store.reorder([b.id, a.id])
        message = store.add_message(a.id, "user", "héllo 🙂", stats={"n": 1})
        before = store.list_conversations()
    with ConversationStore(db_path) as store:
        assert store.list_conversations() == before
        assert store.messages(a.id) == [message]


def test_wal_mode_foreign_keys_schema_version_and_integrity(store: ConversationStore, db_path: Path) -> None:
    store.add_message(store.create_conversation().id, "user", "hi")
    with sqlite3.connect(db_path) as other:  # journal_mode=WAL is a property of the file
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.schema_version == SCHEMA_VERSION
    assert store.integrity_check() == "ok"
    assert store._db is not None and store._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_newer_schema_is_refused(db_path: Path) -> None:
    ConversationStore(db_path).close()
    with sqlite3.connect(db_path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="written by a newer SmallMind") as raised:
        ConversationStore(db_path)
    assert str(db_path) in str(raised.value)


def test_closed_store_raises_store_error(db_path: Path) -> None:
    store = ConversationStore(db_path)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.list_conversations()


# ---------------------------------------------------------------------------------------------------
# failures: a killed process, a full disk, a file that is not a database

CRASHING_WRITER = """
import sys
from smallmind_app.history.store import ConversationStore

store = ConversationStore(sys.argv[1])
conversation = store.create_conversation("crash")
for i in range(5):
    print("committed", store.add_message(conversation.id, "user", f"question {i}").id, flush=True)
    reply = store.add_message(conversation.id, "assistant", "", status="streaming")
    for n in range(1, 4):
        store.update_message(reply.id, content=" ".join(map(str, range(n))))
    print("committed", store.update_message(reply.id, status="complete").id, flush=True)
reply = store.add_message(conversation.id, "assistant", "", status="streaming")
print("streaming", reply.id, flush=True)
n = 0
while True:  # stream forever: the parent kills us somewhere inside one of these transactions
    n += 1
    store.update_message(reply.id, content=" ".join(map(str, range(n))))
    print("updated", n, flush=True)
"""


def test_sigkill_mid_stream_loses_no_committed_message(db_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(db_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 20
    while not (lines and lines[-1].startswith("updated 40")):
        line = child.stdout.readline()
        assert line and time.monotonic() < deadline, f"writer stopped early: {child.communicate()[1]}"
        lines.append(line.strip())
    os.kill(child.pid, signal.SIGKILL)
    rest, _ = child.communicate()
    assert child.returncode == -signal.SIGKILL
    lines += rest.split("\n")[:-1]  # the piece after the last newline may be a line cut by the kill

    committed = [int(line.split()[1]) for line in lines if line.startswith("committed")]
    [streaming_id] = [int(line.split()[1]) for line in lines if line.startswith("streaming")]
    last_update = max(int(line.split()[1]) for line in lines if line.startswith("updated"))
    assert len(committed) == 10 and last_update >= 40

    with ConversationStore(db_path) as store:
        assert store.integrity_check() == "ok"
        [conversation] = store.list_conversations()
        messages = {m.id: m for m in store.messages(conversation.id)}
        assert set(committed) <= set(messages)
        assert all(messages[i].status == "complete" for i in committed)
        reply = messages[streaming_id]
        assert reply.status == "streaming"
        words = reply.content.split()
        assert len(words) >= last_update and words == [str(i) for i in range(len(words))]
        assert store.mark_interrupted() == 1
        assert [m.status for m in store.messages(conversation.id)][-1] == "partial"


def test_disk_full_raises_a_clear_store_error_and_the_store_stays_usable(
    store: ConversationStore, db_path: Path
) -> None:
    conversation = store.create_conversation("full")
    kept = store.add_message(conversation.id, "user", "small")
    reply = store.add_message(conversation.id, "assistant", "", status="streaming")
    fill_the_disk(store)

    with pytest.raises(StoreError, match="cannot save the message: the disk is full") as raised:
        store.add_message(conversation.id, "assistant", "x" * 200_000)
    assert str(db_path) in str(raised.value)
    with pytest.raises(StoreError, match="the disk is full"):
        store.update_message(reply.id, content="y" * 200_000)

    assert store.messages(conversation.id) == [kept, reply]  # still readable, nothing half-written
    assert store.integrity_check() == "ok"
    store.update_message(reply.id, content="a short reply", status="partial")  # fits: no new page needed
    assert store.messages(conversation.id)[-1].content == "a short reply"
    free_the_disk(store)
    assert store.add_message(conversation.id, "assistant", "x" * 200_000).content == "x" * 200_000


def test_not_a_database_raises_store_corrupt_error_naming_the_file(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not a database, just some text\n" * 100)
    with pytest.raises(StoreCorruptError, match="not a SQLite database") as raised:
        ConversationStore(db_path)
    assert str(db_path) in str(raised.value)
    assert isinstance(raised.value, StoreError)

    aside = move_aside(db_path)
    assert not db_path.exists()
    assert aside.name.startswith("conversations.sqlite3.corrupt-")
    assert aside.read_bytes().startswith(b"this is not a database")
    with ConversationStore(db_path) as store:  # a fresh database in its place
        assert store.list_conversations() == []


def test_move_aside_takes_the_wal_files_along(db_path: Path) -> None:
    ConversationStore(db_path).close()
    for suffix in ("-wal", "-shm"):  # as a crash leaves them; a stale WAL must not meet a new database
        db_path.with_name(db_path.name + suffix).write_bytes(b"left over" + suffix.encode())
    aside = move_aside(db_path)
    assert sorted(p.name for p in db_path.parent.iterdir()) == [
        aside.name,
        aside.name + "-shm",
        aside.name + "-wal",
    ]
    assert aside.with_name(aside.name + "-wal").read_bytes() == b"left over-wal"


def test_unopenable_path_raises_store_error(tmp_path: Path) -> None:
    (tmp_path / "conversations.sqlite3").mkdir()  # a directory where the file belongs
    with pytest.raises(StoreError, match="cannot open the conversations database") as raised:
        ConversationStore(tmp_path / "conversations.sqlite3")
    assert str(tmp_path / "conversations.sqlite3") in str(raised.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create the folder"):
        ConversationStore(tmp_path / "file" / "conversations.sqlite3")
