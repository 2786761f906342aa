"""The real window with the real engine worker and a tiny random-weight model (pytest-qt, offscreen).

Replies of the random model are gibberish; the tests check what the user sees and what is stored,
never the text itself (except the SmolLM2 test at the end, which compares batched and alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import QApplication, QMessageBox

from smallmind_app import paths
from smallmind_app.history.store import ConversationStore
from tests.fixtures.window import (
    LONG,
    MODEL_TIMEOUT_MS,
    REPLY_TIMEOUT_MS,
    send,
    stat_number,
    stored_messages,
    wait_idle,
    wait_text,
)


def test_names_tests_and_accessibility_rely_on(make_window: Any) -> None:
    window = make_window()
    assert window.objectName() == "mainWindow"
    for name in ("conversationTabs", "statsDock", "transcriptView", "promptEdit", "sendButton", "stopButton"):
        assert window.widget_named(name) is not None, name
    for name in ("actionNewChat", "actionCloseChat", "actionSettings"):
        assert window.findChild(type(window.action_new), name) is not None, name
    for name in (
        "statSessions",
        "statMemory",
        "statHitRate",
        "statEvictions",
        "statReusedTokens",
        "statAvgBatchSize",
        "statAvgBatchWait",
        "statQueueDepth",
        "statTokensPerSec",
        "statPreemptions",
        "statWaitingForMemory",
    ):
        assert window.stats_dock.findChild(type(window.model_label), name) is not None, name


def test_three_tabs_generate_at_once_and_batch(qtbot: Any, make_window: Any, write_settings: Any) -> None:
    write_settings(
        sampling={"max_new_tokens": 120, "stop_on_eos": False, "seed": 1},
        batching={"max_batch_wait_ms": 200.0},
    )
    window = make_window()
    tabs = [window.chat_tabs[0], window.new_chat(), window.new_chat()]
    for i, tab in enumerate(tabs):
        send(tab, f"Hello from tab {i}")
    assert all(tab.is_generating for tab in tabs)
    window.tabs.setCurrentIndex(0)  # switching tabs mid-reply changes nothing
    window.tabs.setCurrentIndex(2)
    wait_idle(qtbot, *tabs)
    for tab in tabs:
        reply = tab.entries[-1]
        assert (reply.role, reply.status, reply.stats["n_tokens"]) == ("assistant", "complete", 120)
        assert reply.stats["tokens_per_s"] > 0 and reply.stats["ttft_ms"] > 0
        assert [m.status for m in stored_messages(tab.conversation_id)] == ["complete", "complete"]
        assert stored_messages(tab.conversation_id)[-1].content == reply.content
    qtbot.waitUntil(lambda: stat_number(window, "statAvgBatchSize") > 1.0, timeout=5000)
    assert stat_number(window, "statSessions") == 3
    assert "120 tokens" in tabs[2].transcript.toPlainText()


def test_stop_mid_reply_keeps_the_partial_text(qtbot: Any, make_window: Any, write_settings: Any) -> None:
    write_settings(sampling=LONG)
    window = make_window()
    tab = window.chat_tabs[0]
    send(tab, "Tell me a long story")
    assert tab.stop_button.isEnabled() and not tab.send_button.isEnabled()
    wait_text(qtbot, tab)
    tab.stop_button.click()
    wait_idle(qtbot, tab)
    reply = tab.entries[-1]
    assert reply.status == "partial" and reply.stats["finish_reason"] == "cancelled"
    assert 0 < reply.stats["n_tokens"] < LONG["max_new_tokens"] and reply.content
    stored = stored_messages(tab.conversation_id)[-1]
    assert (stored.status, stored.content, stored.stats["finish_reason"]) == (
        "partial",
        reply.content,
        "cancelled",
    )
    assert tab.send_button.isEnabled() and not tab.stop_button.isEnabled()
    assert "stopped" in tab.transcript.toPlainText()


def test_close_a_tab_mid_reply(qtbot: Any, make_window: Any, write_settings: Any) -> None:
    write_settings(sampling=LONG)
    window = make_window()
    first, second = window.chat_tabs[0], window.new_chat()
    send(first, "Hi")
    send(second, "Hello")
    wait_text(qtbot, second)
    closing_id = second.conversation_id
    window.tabs.close_tab(window.tabs.indexOf(second))
    assert window.tabs.count() == 1 and window.tabs.tab_for(closing_id) is None
    wait_idle(qtbot, first)  # the other tab goes on
    assert first.entries[-1].status == "complete"

    def session_gone() -> bool:
        rows = window.stats_dock.table
        return rows.rowCount() == 1 and rows.item(0, 0).text() == first.title

    qtbot.waitUntil(session_gone, timeout=5000)
    stored = stored_messages(closing_id)
    assert stored[-1].status == "partial" and stored[-1].content
    closed = next(c for c in window.store.list_conversations() if c.id == closing_id)
    assert closed.settings["open"] is False
    reopened = window.tabs.reopen(closing_id)  # a saved conversation comes back, its KV session cold
    assert reopened is not None and [e.content for e in reopened.entries] == [m.content for m in stored]


def test_applying_a_smaller_memory_budget_evicts_live(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling={"max_new_tokens": 40, "seed": 3})
    window = make_window()
    tabs = [window.chat_tabs[0], window.new_chat(), window.new_chat()]
    for tab in tabs:
        send(tab, "Hello there")
    wait_idle(qtbot, *tabs)
    qtbot.waitUntil(lambda: stat_number(window, "statSessions") == 3, timeout=5000)
    assert stat_number(window, "statEvictions") == 0
    dialog = window.open_settings()
    assert dialog.objectName() == "settingsDialog" and dialog.isVisible()
    per_session = dialog.findChild(type(dialog.fields["kvMaxBytesTotal"][3]), "kvMaxBytesPerSession")
    per_session.setValue(0.5)
    # MiB: room for two of the three sessions (128 tokens = 0.25 MiB each, in 64-token steps), not three
    dialog.fields["kvMaxBytesTotal"][3].setValue(0.5)
    assert dialog.ok_button.isEnabled(), dialog.error_label.text()
    dialog.ok_button.click()
    qtbot.waitUntil(lambda: stat_number(window, "statEvictions") == 1, timeout=5000)
    assert stat_number(window, "statSessions") == 2 and window.stats_dock.table.rowCount() == 2
    assert "0.50 MiB reserved of 0.50 MiB" in window.stats_dock.labels["statMemory"].text()
    assert window.settings.kv_cache["max_bytes_total"] == 1 << 19
    assert paths.settings_file().is_file()  # saved, restored at the next start
    fresh = window.new_chat()  # the engine serves on within the new budget (evicting the idle session)
    send(fresh, "Still working?")
    wait_idle(qtbot, fresh)
    assert fresh.entries[-1].status == "complete", fresh.entries[-1].stats.get("error")


def test_invalid_setting_disables_ok_and_says_why(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    dialog = window.open_settings()
    field = {name: widget for name, (_, _, _, widget) in dialog.fields.items()}
    assert dialog.ok_button.isEnabled() and not dialog.error_label.text()
    assert f"{window.model_info['bytes_per_token']:,} bytes" in dialog.bytes_per_token.text()
    assert dialog.token_limit.text().startswith(f"{window.model_info['session_token_limit']:,} tokens")
    field["kvMaxBytesPerSession"].setValue(2048)
    field["kvMaxBytesTotal"].setValue(1024)
    assert not dialog.ok_button.isEnabled() and not dialog.apply_button.isEnabled()
    assert "must not be more than “Memory limit, all sessions” (1,024 MiB)" in dialog.error_label.text()
    field["batchMaxBatchSize"].setValue(0)
    assert "Max batch size" in dialog.error_label.text() and "[1, 256]" in dialog.error_label.text()
    field["kvMaxTokensPerSession"].setValue(0)
    assert "Max tokens per session: must be a whole number" in dialog.error_label.text()
    dialog.restore_button.click()
    assert dialog.ok_button.isEnabled() and not dialog.error_label.text()
    assert field["kvMaxBytesTotal"].value() == 1024 and field["batchMaxBatchSize"].value() == 8


def test_conversations_survive_a_restart(qtbot: Any, make_window: Any, write_settings: Any) -> None:
    write_settings(sampling={"max_new_tokens": 30, "seed": 5})
    window = make_window()
    first, second = window.chat_tabs[0], window.new_chat()
    window.tabs.rename_tab(window.tabs.indexOf(second), "Trip plans")
    second.system_edit.setPlainText("You are a travel agent.")
    send(first, "What is a language model?")
    send(second, "Plan a trip to the mountains")
    wait_idle(qtbot, first, second)
    before = [[(e.role, e.content, e.status, e.stats) for e in tab.entries] for tab in (first, second)]
    window.close()
    assert not window.client.thread.isRunning()

    restarted = make_window()
    assert [restarted.tabs.tabText(i) for i in range(restarted.tabs.count())] == [
        "What is a language model?",  # named after its first message
        "Trip plans",
    ]
    after = [[(e.role, e.content, e.status, e.stats) for e in tab.entries] for tab in restarted.chat_tabs]
    assert after == before
    assert restarted.chat_tabs[1].system_prompt == "You are a travel agent."
    assert "Plan a trip to the mountains" in restarted.chat_tabs[1].transcript.toPlainText()
    send(restarted.chat_tabs[0], "And a follow-up")  # a restored conversation goes on, warm: its K/V
    wait_idle(qtbot, restarted.chat_tabs[0])  # were saved to disk at the close (see test_kv_disk_app.py)
    assert restarted.chat_tabs[0].entries[-1].stats["reused_tokens"] > 0


def test_a_stopped_reply_cut_off_by_a_crash_comes_back_partial(make_window: Any) -> None:
    with ConversationStore(paths.database_file()) as store:
        conversation = store.create_conversation("Crashed")
        store.add_message(conversation.id, "user", "Hello")
        store.add_message(conversation.id, "assistant", "Half a rep", status="streaming")
    window = make_window()
    reply = window.chat_tabs[0].entries[-1]
    assert (reply.status, reply.content) == ("partial", "Half a rep")
    assert "interrupted" in window.chat_tabs[0].transcript.toPlainText()


def test_queue_full_is_shown_in_the_tab(qtbot: Any, make_window: Any, write_settings: Any) -> None:
    # The first request waits (up to 1 s) for batch company; with room for one queued request the
    # second one is refused at submit.
    write_settings(
        batching={"max_total_queued_requests": 1, "max_batch_wait_ms": 1000.0},
        sampling={"max_new_tokens": 20},
    )
    window = make_window()
    tabs = [window.chat_tabs[0], window.new_chat(), window.new_chat()]
    for tab in tabs:
        send(tab, "Hello")
    qtbot.waitUntil(
        lambda: any(e.role == "notice" for tab in tabs for e in tab.entries), timeout=REPLY_TIMEOUT_MS
    )
    wait_idle(qtbot, *tabs)
    refused = [tab for tab in tabs if any(e.role == "notice" for e in tab.entries)]
    assert len(refused) == 2 and tabs[0] not in refused
    for tab in refused:
        window.tabs.setCurrentWidget(tab)
        assert "queue is full" in tab.transcript.toPlainText()
        assert "queue is full" in tab.status_label.text()
        assert [e.role for e in tab.entries] == ["user", "notice"]  # no empty reply left behind
        assert [m.role for m in stored_messages(tab.conversation_id)] == ["user"]
    refused[0].regenerate_button.click()  # try again: now there is room
    wait_idle(qtbot, refused[0])
    assert refused[0].entries[-1].role == "assistant" and refused[0].entries[-1].status == "complete"


def test_prompt_progress_regenerate_edit_copy_export(
    qtbot: Any, make_window: Any, write_settings: Any, tmp_path: Path
) -> None:
    write_settings(batching={"max_prefill_chunk_tokens": 8}, sampling={"max_new_tokens": 10, "seed": 2})
    window = make_window()
    tab = window.chat_tabs[0]
    seen: list[str] = []
    show_prompt_progress = tab.show_prompt_progress

    def record(done: int, total: int) -> None:  # called on the GUI thread by the window's slot
        show_prompt_progress(done, total)
        seen.append(tab.status_label.text())

    tab.show_prompt_progress = record
    send(tab, "The sea is wide and the waves are white; " * 12)
    wait_idle(qtbot, tab)
    assert any(text.startswith("processing prompt ") and "/" in text for text in seen), seen
    first_reply = tab.entries[-1]
    first_stored = stored_messages(tab.conversation_id)[-1]
    assert first_reply.status == "complete" and first_reply.content
    tab.regenerate_button.click()
    wait_idle(qtbot, tab)
    assert [e.role for e in tab.entries] == ["user", "assistant"] and len(
        stored_messages(tab.conversation_id)
    ) == 2
    assert tab.entries[-1].stats["reused_tokens"] > 0  # the same prompt again: its K/V came from the cache
    # the same prompt and seed give the same reply, from the cache as cold; it replaced the old one
    regenerated = stored_messages(tab.conversation_id)[-1]
    assert tab.entries[-1].content == first_reply.content == regenerated.content
    assert regenerated.id != first_stored.id and tab.entries[-1] is not first_reply
    tab.edit_button.click()  # an in-place edit: nothing is removed until the edited message is sent
    assert tab.prompt_edit.toPlainText().startswith("The sea is wide") and len(tab.entries) == 2
    tab.prompt_edit.clear()
    qtbot.keyClick(tab.prompt_edit, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    assert tab.prompt_edit.toPlainText().endswith("\n") and not tab.is_generating  # Shift+Enter: new line
    tab.prompt_edit.setPlainText("Short question")
    qtbot.keyClick(tab.prompt_edit, Qt.Key.Key_Return)  # Enter sends
    assert tab.is_generating
    wait_idle(qtbot, tab)
    tab.transcript.copy_entry(1)
    assert QApplication.clipboard().text() == tab.entries[1].content
    out = tmp_path / "chat.md"
    assert window.tabs.export_conversation(tab.conversation_id, str(out)) is None
    text = out.read_text(encoding="utf-8")
    assert tab.title.startswith("The sea is wide")  # named after its first message
    assert text.startswith(f"# {tab.title}") and "## User\n\nShort question" in text


def test_first_run_dialog_offers_download_or_a_file(
    qtbot: Any, make_window: Any, app_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine import ModelDownloadError

    window = make_window(model=None, wait_model=False)
    qtbot.waitUntil(
        lambda: window.first_run_dialog is not None and window.first_run_dialog.isVisible(),
        timeout=MODEL_TIMEOUT_MS,
    )
    dialog = window.first_run_dialog
    assert (
        dialog.objectName() == "firstRunDialog" and "SmolLM2-135M-Instruct" in dialog.download_button.text()
    )

    # no network in tests: the fault we inject
    def fake_pull(spec: Any, progress: Any, cancel: Any, pip_args: Any) -> Path:
        done = 0
        while not cancel.wait(0.01):
            done = min(done + 1_000_000, 98_000_000)
            progress("download", done, 98_000_000)
        raise ModelDownloadError("model download cancelled")

    window.client.worker.pull_model = fake_pull
    dialog.download_button.click()
    qtbot.waitUntil(
        lambda: dialog.progress.value() > 0 and "Downloading" in dialog.phase_label.text(), timeout=10_000
    )
    assert dialog.progress.isVisible() and not dialog.open_button.isEnabled()
    dialog.cancel_button.click()
    qtbot.waitUntil(lambda: not dialog.downloading, timeout=10_000)
    assert dialog.phase_label.text() == "Download cancelled." and dialog.open_button.isEnabled()

    monkeypatch.setattr(
        "smallmind_app.models.first_run.choose_model_file", lambda parent: str(app_model_path)
    )
    dialog.open_button.click()
    qtbot.waitUntil(lambda: bool(window.model_info), timeout=MODEL_TIMEOUT_MS)
    assert not dialog.isVisible() and window.model_info["path"] == str(app_model_path)
    assert window.settings.model_path == str(app_model_path)


def test_corrupt_model_file_shows_a_dialog_and_the_app_stays_usable(
    qtbot: Any, make_window: Any, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    window = make_window(model=broken, wait_model=False)

    def error_shown() -> bool:
        box = window.error_dialog
        return box is not None and box.objectName() == "modelErrorDialog" and box.isVisible()

    qtbot.waitUntil(error_shown, timeout=MODEL_TIMEOUT_MS)
    text = window.error_dialog.text()
    assert str(broken) in text  # the file and the reason: the header's version field is 0
    assert "GGUF version 0 is not supported; this engine reads versions 2, 3" in text
    assert isinstance(window.error_dialog, QMessageBox)
    window.error_dialog.accept()
    tab = window.new_chat()
    send(tab, "Anyone there?")
    qtbot.waitUntil(lambda: not tab.is_generating, timeout=10_000)
    assert "No model is loaded" in tab.entries[-1].content
    assert window.model_label.text() == "No model loaded"


def test_event_loop_stays_responsive_while_four_tabs_generate(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    """The GUI thread goes on serving its events while four tabs generate: a 5 ms probe timer keeps
    firing and sees every reply grow in many steps, not all at once at the end. How late the probe
    fires is a figure of the machine: ``benchmarks/bench_app.py`` measures it in this scenario."""
    write_settings(sampling={"max_new_tokens": 600, "stop_on_eos": False, "seed": 11})
    window = make_window()
    tabs = [window.chat_tabs[0]] + [window.new_chat() for _ in range(3)]
    seen: list[set[int]] = [set() for _ in tabs]  # reply lengths each probe saw while the tab generated

    def tick() -> None:
        for tab, lengths in zip(tabs, seen, strict=True):
            if tab.is_generating and tab.entries[-1].role == "assistant":
                lengths.add(len(tab.entries[-1].content))

    probe = QTimer(interval=5, timerType=Qt.TimerType.PreciseTimer)
    probe.timeout.connect(tick)
    for i, tab in enumerate(tabs):
        send(tab, f"Write a long story number {i}")
    probe.start()
    wait_idle(qtbot, *tabs)  # the hang bound: REPLY_TIMEOUT_MS
    probe.stop()
    assert all(tab.entries[-1].status == "complete" for tab in tabs)
    for tab, lengths in zip(tabs, seen, strict=True):
        final = len(tab.entries[-1].content)
        partial = {n for n in lengths if 0 < n < final}
        assert len(partial) >= 5, (tab.title, sorted(lengths), final)  # the GUI ran between text updates


def test_unexpected_errors_are_logged_and_shown(
    qtbot: Any, make_window: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys
    import threading

    from smallmind_app import app

    window = make_window()
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    app.install_excepthook()
    try:
        raise RuntimeError("boom in a slot")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    assert "boom in a slot" in caplog.text and "Traceback" in caplog.text

    def shown() -> QMessageBox | None:
        boxes = [w for w in QApplication.topLevelWidgets() if w.objectName() == "unexpectedErrorDialog"]
        return next((b for b in boxes if b.isVisible()), None)

    qtbot.waitUntil(lambda: shown() is not None, timeout=5000)
    box = shown()
    assert "RuntimeError: boom in a slot" in box.text() and "Traceback" in box.detailedText()
    box.accept()
    assert window.isVisible()  # the app goes on


@pytest.mark.smollm2
def test_two_tabs_at_once_give_the_replies_each_gives_alone(
    qtbot: Any, make_window: Any, write_settings: Any, smollm2_path: Path
) -> None:
    write_settings(sampling={"temperature": 0.0, "max_new_tokens": 12})
    window = make_window(model=smollm2_path)
    prompts = ["What is the capital of France?", "Name three colors of the rainbow."]
    alone = []
    for prompt in prompts:
        tab = window.new_chat()
        send(tab, prompt)
        wait_idle(qtbot, tab, timeout=300_000)
        alone.append(tab.entries[-1].content)
    together = [window.new_chat() for _ in prompts]
    for tab, prompt in zip(together, prompts, strict=True):
        send(tab, prompt)
    wait_idle(qtbot, *together, timeout=300_000)
    assert [tab.entries[-1].content for tab in together] == alone
    assert all(text.strip() for text in alone)


def test_a_selection_survives_a_streaming_reply(qtbot: Any, make_window: Any, write_settings: Any) -> None:
    write_settings(sampling={"max_new_tokens": 400, "stop_on_eos": False, "seed": 2})
    window = make_window()
    tab = window.chat_tabs[0]
    send(tab, "Select this sentence while the next reply streams")
    wait_idle(qtbot, tab)
    view = tab.transcript
    start = view.toPlainText().index("Select this sentence")
    cursor = view.textCursor()
    cursor.setPosition(start)
    cursor.setPosition(start + len("Select this sentence"), QTextCursor.MoveMode.KeepAnchor)
    view.setTextCursor(cursor)
    renders = []
    original_render = view.render

    def counting_render(entries: list) -> None:
        original_render(entries)
        renders.append(view.textCursor().selectedText())

    view.render = counting_render  # type: ignore[method-assign]
    send(tab, "Go on")
    wait_idle(qtbot, tab)
    assert len(renders) >= 3  # the transcript was rebuilt while the reply streamed
    assert set(renders) == {"Select this sentence"}
    assert view.textCursor().selectedText() == "Select this sentence"


def test_tabs_wait_for_memory_instead_of_failing(qtbot: Any, make_window: Any, write_settings: Any) -> None:
    """A KV budget that holds one reply at a time (256 tokens of the app model): three tabs sent at
    once all complete; the ones without room say "waiting for memory", and the dock counts it."""
    write_settings(
        sampling={"max_new_tokens": 160, "stop_on_eos": False, "seed": 5},
        kv_cache={"max_bytes_total": 1 << 19, "max_bytes_per_session": 1 << 19},  # 0.5 MiB
        batching={"max_batch_wait_ms": 200.0},
    )
    window = make_window()
    tabs = [window.chat_tabs[0], window.new_chat(), window.new_chat()]
    seen: list[str] = []
    window.client.worker.request_waiting.connect(seen.append)
    for i, tab in enumerate(tabs):
        send(tab, f"Hello from tab {i}")
    qtbot.waitUntil(
        lambda: any("waiting for memory" in tab.status_label.text() for tab in tabs), timeout=REPLY_TIMEOUT_MS
    )
    wait_idle(qtbot, *tabs)
    for tab in tabs:
        reply = tab.entries[-1]
        assert reply.status == "complete", reply.stats.get("error")
    assert seen  # the worker said which conversations waited
    qtbot.waitUntil(lambda: stat_number(window, "statWaitingForMemory") == 0, timeout=5000)
    assert window.stats_dock.labels["statPreemptions"].text().replace(",", "").isdigit()  # a count, shown
