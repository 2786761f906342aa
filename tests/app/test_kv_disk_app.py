"""The KV disk tier through the real window: a closed tab and a restarted app come back warm (the
reply's "prompt tokens reused" shows the disk hit), the dock shows the tier, Settings turns it off,
limits it and clears it, and deleting a conversation deletes its file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtWidgets import QCheckBox, QDoubleSpinBox, QMessageBox, QPushButton

from smallmind_app import paths
from smallmind_app.settings.app_settings import load_settings
from tests.fixtures.window import send, stat_number, wait_idle

SHORT = {"max_new_tokens": 24, "seed": 5}
QUESTION = "Tell me about the mountains and the sea, " * 6  # a prompt of a few hundred tokens


def kv_files() -> list[Path]:
    return sorted(paths.kv_disk_dir().glob("*.kv"))


def wait_disk_sessions(qtbot: Any, window: Any, n: int) -> None:
    qtbot.waitUntil(lambda: stat_number(window, "statDiskSessions") == n, timeout=10_000)


def test_a_closed_tab_reopened_is_warm(qtbot: Any, make_window: Any, write_settings: Any) -> None:
    write_settings(sampling=SHORT)
    window = make_window()
    first, keep = window.chat_tabs[0], window.new_chat()
    send(first, QUESTION)
    wait_idle(qtbot, first)
    conversation_id, first_prompt = first.conversation_id, first.entries[-1].stats["prompt_tokens"]
    window.tabs.close_tab(window.tabs.indexOf(first))  # its K/V go to disk instead of being dropped
    wait_disk_sessions(qtbot, window, 1)
    assert len(kv_files()) == 1 and stat_number(window, "statSessions") == 0

    reopened = window.tabs.reopen(conversation_id)
    send(reopened, "And the rivers?")
    wait_idle(qtbot, reopened)
    stats = reopened.entries[-1].stats
    assert stats["reused_tokens"] > first_prompt  # the question and (most of) the reply: from disk
    qtbot.waitUntil(lambda: stat_number(window, "statDiskHits") == 1, timeout=10_000)
    hits = window.stats_dock.labels["statDiskHits"].text()
    assert f"{stats['reused_tokens']:,} tokens" in hits and "last load" in hits
    assert f"{stats['reused_tokens']} of {stats['prompt_tokens']} prompt tokens reused" in (
        reopened.transcript.toPlainText()
    )
    assert keep.conversation_id != conversation_id


def test_close_restart_reopen_send_is_warm(qtbot: Any, make_window: Any, write_settings: Any) -> None:
    """The app-level case of the issue: close the app, start it again, send in the restored tab."""
    write_settings(sampling=SHORT)
    window = make_window()
    tab = window.chat_tabs[0]
    send(tab, QUESTION)
    wait_idle(qtbot, tab)
    first_prompt = tab.entries[-1].stats["prompt_tokens"]
    window.close()  # the worker saves every idle session to disk before the thread ends
    assert len(kv_files()) == 1

    restarted = make_window()
    wait_disk_sessions(qtbot, restarted, 1)
    tab = restarted.chat_tabs[0]
    send(tab, "And the rivers?")
    wait_idle(qtbot, tab)
    stats = tab.entries[-1].stats
    assert stats["reused_tokens"] > first_prompt  # the first prompt and (most of) its reply
    qtbot.waitUntil(lambda: stat_number(restarted, "statDiskHits") == 1, timeout=10_000)
    assert f"{stats['reused_tokens']} of {stats['prompt_tokens']} prompt tokens reused" in (
        tab.transcript.toPlainText()
    )


def test_settings_turn_the_tier_off_limit_it_and_clear_it(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling=SHORT)
    window = make_window()
    first, second = window.chat_tabs[0], window.new_chat()
    send(first, QUESTION)
    wait_idle(qtbot, first)
    window.tabs.close_tab(window.tabs.indexOf(first))
    wait_disk_sessions(qtbot, window, 1)

    dialog = window.open_settings()
    enabled = dialog.findChild(QCheckBox, "kvDiskEnabled")
    limit = dialog.findChild(QDoubleSpinBox, "kvMaxDiskBytes")
    clear = dialog.findChild(QPushButton, "kvDiskClear")
    assert enabled.isChecked() and limit.value() == 2048 and limit.suffix() == " MiB"
    qtbot.waitUntil(lambda: "1 conversation," in dialog.disk_usage.text(), timeout=10_000)
    limit.setValue(0)
    assert not dialog.ok_button.isEnabled() and "Disk limit, all sessions" in dialog.error_label.text()
    limit.setValue(512)
    clear.click()  # at once, without Apply
    wait_disk_sessions(qtbot, window, 0)
    assert kv_files() == [] and "0 conversations" in dialog.disk_usage.text()

    enabled.setChecked(False)
    dialog.ok_button.click()
    qtbot.waitUntil(lambda: window.stats_dock.labels["statDiskSessions"].text() == "off", timeout=10_000)
    saved, _ = load_settings()
    assert saved.kv_cache["disk_enabled"] is False and saved.kv_cache["max_disk_bytes"] == 512 << 20
    send(second, QUESTION)
    wait_idle(qtbot, second)
    window.tabs.close_tab(window.tabs.indexOf(second))  # off: the session is dropped, not saved
    qtbot.waitUntil(lambda: stat_number(window, "statSessions") == 0, timeout=10_000)
    assert kv_files() == []


def test_deleting_a_conversation_deletes_its_file(qtbot: Any, make_window: Any, write_settings: Any) -> None:
    write_settings(sampling=SHORT)
    window = make_window()
    tab = window.chat_tabs[0]
    send(tab, QUESTION)
    wait_idle(qtbot, tab)
    conversation_id = tab.conversation_id
    window.tabs.close_tab(0)
    wait_disk_sessions(qtbot, window, 1)
    reopened = window.tabs.reopen(conversation_id)
    window.tabs.setCurrentWidget(reopened)
    window.action_delete.trigger()
    box = window.findChild(QMessageBox, "deleteDialog")
    delete = next(b for b in box.buttons() if b.text() == "Delete")
    delete.click()
    wait_disk_sessions(qtbot, window, 0)
    assert kv_files() == []


def test_clear_empties_the_folder_when_the_tier_is_off(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    """Saved sessions of an earlier run, the tier turned off since: Clear still deletes them."""
    write_settings(sampling=SHORT)
    window = make_window()
    send(window.chat_tabs[0], QUESTION)
    wait_idle(qtbot, window.chat_tabs[0])
    window.close()
    assert len(kv_files()) == 1

    write_settings(sampling=SHORT, kv_cache={"disk_enabled": False})
    restarted = make_window()
    qtbot.waitUntil(lambda: restarted.stats_dock.labels["statDiskSessions"].text() == "off", timeout=10_000)
    assert len(kv_files()) == 1  # off: the files are left alone
    dialog = restarted.open_settings()
    dialog.findChild(QPushButton, "kvDiskClear").click()
    qtbot.waitUntil(lambda: kv_files() == [], timeout=10_000)
