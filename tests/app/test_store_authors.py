"""Who said it, in the store: each reply's model and engine (columns added by a migration, tested on a
file of the schema before), the export and the history preview naming them, and the upgrade that
drops SmolLM2's system prompt from old conversations and settings. Real SQLite files under tmp_path."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from smallmind_app import paths
from smallmind_app.history.schema import MIGRATIONS, SCHEMA_VERSION
from smallmind_app.history.store import ConversationStore
from smallmind_app.settings.app_settings import AppSettings, load_settings

SMOLLM2 = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_a_database_of_the_schema_before_gets_authors_and_loses_smollm2s_prompt(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    for migrate in MIGRATIONS[:3]:  # the schema before this one, as the previous SmallMind wrote it
        migrate(db)
    db.execute("PRAGMA user_version=3")
    db.execute("INSERT INTO conversations VALUES ('smol', 'T', ?, '{}', 0, 0, 0)", (SMOLLM2,))
    db.execute("INSERT INTO conversations VALUES ('own', 'T', 'Be brief.', '{}', 1, 0, 0)")
    db.executemany(
        "INSERT INTO messages (conversation_id, role, content, status, created_at, parent_id) "
        "VALUES ('smol', ?, ?, 'complete', 0, ?)",
        [("user", "Hi", None), ("assistant", "Hello!", 1)],
    )
    db.commit()
    db.close()
    assert SCHEMA_VERSION == 4
    with ConversationStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        _question, reply = store.messages("smol")
        assert (reply.content, reply.model, reply.engine) == ("Hello!", "", "")  # who said it: unknown
        assert store.get_conversation("smol").system_prompt == ""  # SmolLM2's own: its model's again
        assert store.get_conversation("own").system_prompt == "Be brief."  # the user's stays
        new = store.add_message("smol", "assistant", "More.", model="gemma-3-270m", engine="local")
        assert (new.model, new.engine) == ("gemma-3-270m", "local")
        updated = store.update_message(reply.id, model="SmolLM2-135M-Instruct.Q4_1", engine="local")
        assert updated.model == "SmolLM2-135M-Instruct.Q4_1"
        export = store.export_markdown("smol")
        assert "## User\n\nHi" in export  # the user's message names no model
        assert "## Assistant (SmolLM2-135M-Instruct.Q4_1 · local)\n\nHello!" in export
        assert "## Assistant (gemma-3-270m · local)\n\nMore." in export
        (summary,) = [s for s in store.history() if s.id == "smol"]
        assert summary.preview == "gemma-3-270m: More."


def test_replace_messages_keeps_the_authors(tmp_path: Path) -> None:
    with ConversationStore(tmp_path / "c.sqlite3") as store:
        cid = store.create_conversation().id
        stored = store.replace_messages(
            cid, [("user", "Q", "complete", {}, "", ""), ("assistant", "A", "complete", {}, "m", "Team box")]
        )
        assert [(m.model, m.engine) for m in stored] == [("", ""), ("m", "Team box")]
        assert store.create_conversation().system_prompt == ""  # a new one: its model's own prompt


def test_settings_of_the_version_before_give_up_smollm2s_prompt_and_keep_the_users() -> None:
    for saved, expected in ((SMOLLM2, ""), ("Answer in French.", "Answer in French.")):
        data = AppSettings().to_dict() | {"schema_version": 2, "system_prompt": saved}
        for key in ("preset_models", "max_loaded_model_bytes", "model_idle_ttl_s"):  # not in that version
            del data[key]
        paths.settings_file().parent.mkdir(parents=True, exist_ok=True)
        paths.settings_file().write_text(json.dumps(data), encoding="utf-8")
        settings, notice = load_settings()
        assert notice is None and settings.schema_version == 3 and settings.system_prompt == expected
