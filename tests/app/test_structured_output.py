"""Structured output in the window: a tab's Sampling dialog takes a JSON schema (checked as it is
typed, with examples), the tab's replies are generated under it and shown as highlighted JSON, and the
stats dock counts the local server's requests by kind. The real window, worker and tiny model
(random weights: a reply that validates does so because of the mask)."""

from __future__ import annotations

import copy
import json
import socket
import threading
from typing import Any

import httpx
import jsonschema

from smallmind_app.chat.bubbles import displayed, entry_chunks
from smallmind_app.chat.code_blocks import code_blocks
from smallmind_app.chat.structured_output import EXAMPLES
from tests.fixtures.window import send, wait_idle

APP_SAMPLING = {"max_new_tokens": 200, "seed": 3, "temperature": 0.8}


def test_a_schema_is_checked_as_typed_and_its_replies_show_as_highlighted_json(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling=APP_SAMPLING)
    window = make_window()
    tab = window.chat_tabs[0]
    tab.settings_button.click()
    dialog = window.chat_settings_dialog
    box = dialog.structured
    assert not box.own.isChecked() and not box.editor.isEnabled()
    box.own.setChecked(True)
    assert not dialog.ok_button.isEnabled()  # ticked, but no schema yet
    box.editor.setPlainText('{"type": "object", "properties": {"a": ')
    assert "not valid JSON" in box.status.text() and not dialog.ok_button.isEnabled()
    box.editor.setPlainText('{"type": "frobnicate"}')
    assert "frobnicate" in box.status.text() and "Structured output" in dialog.error_label.text()
    assert not dialog.ok_button.isEnabled()
    box.examples.activated.emit(box.examples.findText("A person"))  # as a user picks it
    assert json.loads(box.editor.toPlainText()) == EXAMPLES["A person"]
    assert box.status.text().startswith("✓") and dialog.ok_button.isEnabled()
    dialog.ok_button.click()
    schema = EXAMPLES["A person"]
    assert tab.sampling_overrides == {
        "constraint": {"kind": "json_schema", "value": json.dumps(schema, indent=2)}
    }
    assert tab.settings_button.text() == "Sampling: JSON schema"

    send(tab, "Who are you?")
    wait_idle(qtbot, tab)
    reply = tab.entries[-1]
    assert reply.status == "complete" and reply.stats["finish_reason"] == "stop"
    jsonschema.validate(json.loads(reply.content), schema)  # random weights, a valid person
    assert reply.stats["structured"] is True
    index = len(tab.entries) - 1
    copy_link = f"{tab.transcript.link_scheme}:copycode/{index}/0"
    assert copy_link in tab.transcript.toHtml()  # shown as a (highlighted) JSON code block
    as_prose = copy.copy(reply)
    as_prose.stats = {}
    assert "copycode" not in "".join(entry_chunks(index, as_prose))  # without the schema: prose
    pretty = json.dumps(json.loads(reply.content), indent=2, ensure_ascii=False)
    assert code_blocks(displayed(reply))[0].code == pretty  # pretty-printed; Copy copies it

    dialog = window.open_chat_settings(tab.conversation_id)  # the schema comes back with the chat
    assert dialog.structured.own.isChecked() and json.loads(dialog.structured.editor.toPlainText()) == schema
    dialog.structured.own.setChecked(False)
    dialog.ok_button.click()
    assert tab.sampling_overrides == {}
    send(tab, "Again")
    wait_idle(qtbot, tab)
    assert "structured" not in tab.entries[-1].stats  # free text again, shown as prose


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_dock_counts_the_local_servers_requests_by_kind(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    dialog = window.open_local_server()
    dialog.port.setValue(free_port())
    dialog.enabled.setChecked(True)
    qtbot.waitUntil(lambda: dialog.address.text().startswith("http://127.0.0.1:"), timeout=30_000)
    base = dialog.address.text()
    kinds = window.stats_dock.labels["statApiKinds"]
    qtbot.waitUntil(lambda: kinds.text() == "none yet", timeout=10_000)
    replies: list[httpx.Response] = []

    def client() -> None:  # another program using the in-app server
        schema = {"name": "n", "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                          "required": ["ok"], "additionalProperties": False}}  # fmt: skip
        chat = {"model": "app-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40}
        replies.append(httpx.post(base + "/chat/completions", json=chat, timeout=60))
        replies.append(
            httpx.post(
                base + "/chat/completions",
                timeout=60,
                json={**chat, "response_format": {"type": "json_schema", "json_schema": schema}},
            )
        )
        replies.append(
            httpx.post(base + "/embeddings", json={"model": "app-tiny", "input": ["a", "b"]}, timeout=60)
        )

    thread = threading.Thread(target=client)
    thread.start()
    qtbot.waitUntil(lambda: not thread.is_alive(), timeout=120_000)  # the worker steps the API requests
    assert [r.status_code for r in replies] == [200, 200, 200], [r.text for r in replies]
    assert json.loads(replies[1].json()["choices"][0]["message"]["content"]) in ({"ok": True}, {"ok": False})
    qtbot.waitUntil(lambda: kinds.text() == "chat 1 · embeddings 1 · JSON schema 1", timeout=10_000)
    dialog.enabled.setChecked(False)
    qtbot.waitUntil(lambda: kinds.text() == "–", timeout=30_000)


def test_a_stored_schema_the_engine_refuses_is_an_error_reply_that_names_it(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling=APP_SAMPLING)
    window = make_window()
    tab = window.chat_tabs[0]  # a schema saved by another version, or edited by hand in the database
    tab.set_sampling_overrides({"constraint": {"kind": "json_schema", "value": '{"type": "frobnicate"}'}})
    send(tab, "Who are you?")
    wait_idle(qtbot, tab)
    reply = tab.entries[-1]
    assert reply.status == "error" and "JSON schema" in reply.content and "frobnicate" in reply.content
    tab.set_sampling_overrides({})
    send(tab, "Again")
    wait_idle(qtbot, tab)
    assert tab.entries[-1].status == "complete"  # the chat goes on
