"""The conversation of a tab without its widgets (chat/conversation_model.py): a real SQLite store,
no Qt. What the tab shows after each step is what the store keeps, versions and failed writes included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smallmind_app.chat.conversation_model import ConversationModel
from smallmind_app.history.store import ConversationStore
from tests.fixtures.store_faults import fill_the_disk, free_the_disk


@pytest.fixture
def store(tmp_path: Path) -> ConversationStore:
    with ConversationStore(tmp_path / "conversations.sqlite3") as store:
        yield store


def new_model(store: ConversationStore) -> ConversationModel:
    conversation = store.create_conversation("Chat", "Be brief.")
    return ConversationModel(conversation, store.messages(conversation.id), store)


def reply(model: ConversationModel, *pieces: str, reason: str = "stop") -> dict:
    for n, piece in enumerate(pieces, 1):
        assert model.add_text(piece, n)
    return model.finish({"text": "".join(pieces), "finish_reason": reason, "generated_tokens": len(pieces)})


def stored(store: ConversationStore, model: ConversationModel) -> list[tuple[str, str, str]]:
    return [(m.role, m.content, m.status) for m in store.messages(model.conversation_id)]


def test_a_turn_is_stored_as_it_streams_and_ends(store: ConversationStore) -> None:
    model = new_model(store)
    assert model.add_user_message("Hi there")  # the first message (the tab names itself after it)
    messages = model.start_reply()
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert model.is_generating and stored(store, model)[-1] == ("assistant", "", "streaming")
    stats = reply(model, "Hel", "lo")
    assert not model.is_generating and stats["n_tokens"] == 2 and stats["finish_reason"] == "stop"
    assert stored(store, model) == [("user", "Hi there", "complete"), ("assistant", "Hello", "complete")]
    assert [(e.role, e.content) for e in model.entries] == [("user", "Hi there"), ("assistant", "Hello")]
    assert not model.add_user_message("And now?")  # not the first any more


def test_regenerate_keeps_the_old_reply_as_a_version(store: ConversationStore) -> None:
    model = new_model(store)
    model.add_user_message("Name a color")
    model.start_reply()
    reply(model, "Blue")
    assert model.regenerate()
    assert model.start_reply()[-1] == {"role": "user", "content": "Name a color"}  # the old reply not sent
    reply(model, "Green")
    assert model.entries[-1].content == "Green" and model.entries[-1].versions == (2, 2)
    assert model.select_version(len(model.entries) - 1, -1)
    assert model.entries[-1].content == "Blue" and model.entries[-1].versions == (1, 2)
    assert stored(store, model)[-1][1] == "Blue"  # the conversation continues from the chosen one


def test_an_edited_message_becomes_a_new_version_with_what_followed(store: ConversationStore) -> None:
    model = new_model(store)
    model.add_user_message("2 + 2?")
    model.start_reply()
    reply(model, "4")
    edited = model.begin_edit(0)
    assert edited.editing and edited.content == "2 + 2?"
    model.commit_edit(model.end_edit())
    model.add_user_message("3 + 3?")
    model.start_reply()
    reply(model, "6")
    assert [e.content for e in model.entries] == ["3 + 3?", "6"] and model.entries[0].versions == (2, 2)
    assert model.select_version(0, -1)
    assert [e.content for e in model.entries] == ["2 + 2?", "4"]


def test_a_refused_request_leaves_a_notice_and_no_empty_reply(store: ConversationStore) -> None:
    model = new_model(store)
    model.add_user_message("Hello")
    model.start_reply()
    model.refuse("Not sent: the engine is busy.")
    assert not model.is_generating
    assert [(e.role, e.status) for e in model.entries] == [("user", "complete"), ("notice", "error")]
    assert stored(store, model) == [("user", "Hello", "complete")]
    assert model.chat_messages()[-1] == {"role": "user", "content": "Hello"}  # notices are never sent


def test_writes_that_fail_keep_the_conversation_and_store_it_whole_later(store: ConversationStore) -> None:
    model = new_model(store)
    model.add_user_message("Before")
    fill_the_disk(store)
    model.add_user_message("x" * 20_000)  # needs new pages: the write fails
    assert model.unsaved and model.entries[-1].role == "user" and model.entries[-1].message_id is None
    notice = next(e for e in model.entries if e.role == "notice")
    assert "kept in memory only" in notice.content
    free_the_disk(store)
    model.start_reply()  # the reply of an unsaved question stays in memory too
    reply(model, "Kept")
    assert not model.unsaved  # caught up when the reply ended
    assert [m[1][:6] for m in stored(store, model)] == ["Before", "xxxxxx", "Kept"]


def test_the_model_imports_no_qt() -> None:
    code = (
        "import sys, smallmind_app.chat.conversation_model; "
        "sys.exit(any(m.startswith('PySide6') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
