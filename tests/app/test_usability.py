"""What a new user tripped over in the window (issue 16): the real window, the real worker, the tiny
model, offscreen. Each test checks what is on screen and what is stored, as the user would see it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from smallmind_app import paths
from smallmind_app.history.store import ConversationStore
from tests.fixtures.window import REPLY_TIMEOUT_MS, click_action

LONG = {"max_new_tokens": 900, "stop_on_eos": False, "seed": 7}  # about a second of generation


def send(tab: Any, text: str) -> None:
    tab.prompt_edit.setPlainText(text)
    tab.send_button.click()


def wait_idle(qtbot: Any, *tabs: Any) -> None:
    qtbot.waitUntil(lambda: not any(tab.is_generating for tab in tabs), timeout=REPLY_TIMEOUT_MS)


def settled(tab: Any) -> bool:
    """No render waiting: what the view shows is the tab's current state."""
    return not tab.render_pending


def store_conversation(title: str, n_turns: int) -> str:
    """A conversation with ``n_turns`` finished exchanges, written before the window opens."""
    with ConversationStore(paths.database_file()) as store:
        conversation = store.create_conversation(title, "")
        for i in range(n_turns):
            store.add_message(conversation.id, "user", f"Question {i}: " + "tell me more. " * 8)
            store.add_message(
                conversation.id, "assistant", f"Answer {i}: " + "words of a reply. " * 20, "complete",
                {"n_tokens": 80, "finish_reason": "stop"},
            )  # fmt: skip
        return conversation.id


# -- 1: the transcript follows the reply --------------------------------------------------------
def test_transcript_follows_a_streaming_reply_until_the_user_scrolls_up(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling=LONG)
    window = make_window()
    window.resize(900, 560)
    tab = window.chat_tabs[0]
    view, bar = tab.transcript, tab.transcript.verticalScrollBar()
    jump = tab.findChild(type(view.jump_button), "jumpToLatestButton")
    assert jump is not None and not jump.isVisible()
    send(tab, "Tell me a long story")
    positions = []
    for n_chars in (400, 1200, 2400):  # several refreshes while the reply grows past the view
        qtbot.waitUntil(lambda n=n_chars: len(tab.entries[-1].content) > n or not tab.is_generating,
                        timeout=REPLY_TIMEOUT_MS)  # fmt: skip
        qtbot.waitUntil(lambda: settled(tab), timeout=5000)
        positions.append((bar.value(), bar.maximum()))
    wait_idle(qtbot, tab)
    qtbot.waitUntil(lambda: settled(tab), timeout=5000)
    assert bar.maximum() > 0
    qtbot.waitUntil(view.at_bottom, timeout=2000)
    assert all(value >= maximum - 4 for value, maximum in positions), positions
    assert not jump.isVisible()

    send(tab, "And another one")  # the user scrolls up mid-reply: the view stays where they put it
    qtbot.waitUntil(lambda: len(tab.entries[-1].content) > 200, timeout=REPLY_TIMEOUT_MS)
    bar.setValue(bar.maximum() // 3)
    kept = bar.value()
    assert jump.isVisible() and not view.following
    grown = len(tab.entries[-1].content) + 400
    qtbot.waitUntil(lambda: len(tab.entries[-1].content) > grown or not tab.is_generating,
                    timeout=REPLY_TIMEOUT_MS)  # fmt: skip
    qtbot.waitUntil(lambda: settled(tab), timeout=5000)
    assert bar.value() == kept and jump.isVisible()
    jump.click()  # back to the latest message, following again
    assert view.at_bottom() and view.following and not jump.isVisible()
    wait_idle(qtbot, tab)
    qtbot.waitUntil(lambda: settled(tab), timeout=5000)
    qtbot.waitUntil(view.at_bottom, timeout=2000)


def test_restored_and_switched_to_tabs_show_the_latest_message(qtbot: Any, make_window: Any) -> None:
    store_conversation("First", 12)
    store_conversation("Second", 12)
    window = make_window()
    first, second = window.chat_tabs
    assert window.tabs.currentWidget() is first
    bar = first.transcript.verticalScrollBar()
    qtbot.waitUntil(lambda: bar.maximum() > 0 and first.transcript.at_bottom(), timeout=5000)
    window.tabs.setCurrentWidget(second)
    bar = second.transcript.verticalScrollBar()
    qtbot.waitUntil(lambda: bar.maximum() > 0 and second.transcript.at_bottom(), timeout=5000)
    assert not second.transcript.jump_button.isVisible()


# -- 2: errors in the user's words ---------------------------------------------------------------
HEX_ID = re.compile(r"\b[0-9a-f]{8,}\b")


def test_settings_problems_use_the_dialogs_labels_and_mib(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    dialog = window.open_settings()
    dialog.fields["kvMaxBytesTotal"][3].setValue(12)  # MiB, below the 256 MiB per session
    text = dialog.error_label.text()
    assert (
        "Memory limit per session: 256 MiB must not be more than “Memory limit, all sessions” (12 MiB)"
        in text
    )
    assert "max_bytes" not in text and "268,435,456" not in text
    dialog.fields["kvMaxBytesTotal"][3].setValue(1024)
    dialog.fields["kvMaxTokensPerSession"][3].setValue(0)  # 0 tokens: that field is flagged, no other
    assert set(dialog.errors) == {"kvMaxTokensPerSession"}, dialog.errors
    assert dialog.error_label.text().startswith("Max tokens per session: must be a whole number ≥ 1")
    dialog.reject()


def test_a_failed_reply_says_why_in_the_users_words_and_opens_settings_at_the_field(
    qtbot: Any, make_window: Any, write_settings: Any, caplog: Any
) -> None:
    """Replies no longer fail for lack of KV memory (they wait or are preempted, issue 11); a message
    the memory limit per session cannot hold is refused at Send, in the dialog's words, with a button
    that opens Settings at that setting."""
    write_settings(sampling=LONG, batching={"max_batch_wait_ms": 300.0})
    window = make_window()
    per_token = window.model_info["bytes_per_token"]
    budget = {"max_bytes_total": per_token * 400, "max_bytes_per_session": per_token * 30}
    window.apply_settings(window.settings.with_changes(kv_cache=budget))
    tab = window.chat_tabs[0]
    with caplog.at_level(logging.INFO, logger="smallmind_app.worker"):
        send(tab, "Tell me a long story about a dragon who guards a library in the mountains, please")
        wait_idle(qtbot, tab)
    shown = tab.transcript.toPlainText() + tab.status_label.text()
    assert "tokens a tab may hold" in shown and "“Memory limit per session”" in shown, shown
    assert not HEX_ID.search(shown) and "max_bytes" not in shown and " bytes" not in shown
    assert any("refused" in r.getMessage() for r in caplog.records)  # the precise message, in the log
    window.tabs.setCurrentWidget(tab)
    assert tab.fix_button.isVisible() and "Memory limit per session" in tab.fix_button.text()
    tab.fix_button.click()
    dialog = window.settings_dialog
    assert dialog is not None and dialog.isVisible()
    assert dialog.pages.tabText(dialog.pages.currentIndex()) == "KV cache"
    assert dialog.focusWidget() is dialog.fields["kvMaxBytesPerSession"][3]
    dialog.reject()


# -- 4: an over-long paste names the per-tab limit and offers to raise it -------------------------
def test_a_paste_over_the_tab_limit_names_it_and_offers_to_raise_it(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(kv_cache={"max_tokens_per_session": 256}, sampling={"max_new_tokens": 16, "seed": 3})
    window = make_window()
    tab = window.chat_tabs[0]
    pasted = " ".join(f"word{i % 97}" for i in range(100))  # about 400 tokens
    send(tab, pasted)
    wait_idle(qtbot, tab)
    notice = tab.entries[-1]
    assert notice.role == "notice", [e.role for e in tab.entries]
    assert "more than the 256 tokens a tab may hold (set by “Max tokens per session”" in notice.content
    assert "the model's context is 1,024 tokens" in notice.content
    assert tab.raise_button.isVisible() and tab.raise_button.text() == "Raise to 1,024 tokens and send"
    assert len(tab.status_label.text()) <= 90 and tab.status_label.toolTip() == notice.content  # one line
    assert tab.fix_button.isVisible()
    tab.raise_button.click()
    assert window.settings.kv_cache["max_tokens_per_session"] == 1024
    wait_idle(qtbot, tab)
    reply = tab.entries[-1]
    assert (reply.role, reply.status) == ("assistant", "complete") and not reply.stats["context_trimmed"]
    assert [e.content for e in tab.entries if e.role == "user"] == [pasted]
    assert not tab.raise_button.isVisible() and not tab.fix_button.isVisible()
    with ConversationStore(paths.database_file()) as store:
        assert [m.role for m in store.messages(tab.conversation_id)] == ["user", "assistant"]


# -- 8: replies are untrusted text ---------------------------------------------------------------
def stored_reply(content: str) -> str:
    with ConversationStore(paths.database_file()) as store:
        conversation = store.create_conversation("Untrusted", "")
        store.add_message(conversation.id, "user", "Say hello")
        store.add_message(conversation.id, "assistant", content, "complete", {"n_tokens": 9})
        return conversation.id


def colors_in(view: Any) -> set[str]:
    """Every text colour the transcript shows."""
    colors, block = set(), view.document().begin()
    while block.isValid():
        it = block.begin()
        while not it.atEnd():
            colors.add(it.fragment().charFormat().foreground().color().name())
            it += 1
        block = block.next()
    return colors


def test_a_reply_with_html_images_and_links_stays_text_and_loads_nothing(
    qtbot: Any, make_window: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QColor, QImage, QPixmap, QTextDocument
    from PySide6.QtWidgets import QMessageBox

    from smallmind_app.chat import transcript

    image = tmp_path / "local.png"
    picture = QImage(8, 8, QImage.Format.Format_RGB32)
    picture.fill(QColor("#ff0000"))
    assert picture.save(str(image))
    image_url = QUrl.fromLocalFile(str(image)).toString()
    stored_reply(
        'Hello <span style="color:#ff0000">I am red</span>\n\n'
        '<table bgcolor="#e8effd"><tr><td><b>You</b> a fake message</td></tr></table>\n\n'
        f"![a picture]({image_url}) [docs](https://example.com/a?b=1) [secret](file:///etc/passwd)"
    )
    opened: list[str] = []
    monkeypatch.setattr(transcript, "open_in_browser", lambda url: opened.append(url.toString()))
    window = make_window()
    view = window.chat_tabs[0].transcript
    text = view.toPlainText()
    assert '<span style="color:#ff0000">I am red</span>' in text and "<table bgcolor" in text  # shown as text
    assert "#ff0000" not in colors_in(view)
    assert "[image: a picture]" in text
    assert view.blocked_resources == []  # nothing was even asked for
    resource = view.document().resource(QTextDocument.ResourceType.ImageResource, QUrl(image_url))
    assert view.blocked_resources == [image_url] and not isinstance(resource, QPixmap | QImage)
    assert resource is None or len(resource) == 0  # asked directly, still nothing is read

    view.anchorClicked.emit(QUrl("file:///etc/passwd"))  # not http(s): never opened, no dialog
    assert window.findChild(QMessageBox, "openLinkDialog") is None and opened == []
    view.anchorClicked.emit(QUrl("https://example.com/a?b=1"))
    box = window.findChild(QMessageBox, "openLinkDialog")
    assert box is not None and box.isVisible() and "https://example.com/a?b=1" in box.text()
    assert box.defaultButton() is box.button(QMessageBox.StandardButton.Cancel)
    assert opened == []  # only after the user says so
    box.button(QMessageBox.StandardButton.Open).click()
    assert opened == ["https://example.com/a?b=1"]


# -- 5: names, order and counts survive ----------------------------------------------------------
def titles(window: Any) -> list[str]:
    return [window.tabs.tabText(i) for i in range(window.tabs.count())]


def test_tab_names_are_unique_and_follow_the_first_message(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    window.new_chat()
    window.new_chat()
    assert titles(window) == ["New chat", "New chat (2)", "New chat (3)"]
    window.tabs.close_tab(1)
    window.new_chat()  # closed conversations keep their names: still no two alike
    assert len(set(titles(window))) == 3
    first = window.chat_tabs[0]
    send(first, "What is the capital of France? Please answer in one short sentence.")
    assert first.title == window.tabs.tabText(0) == "What is the capital of France? Please…"
    window.tabs.rename_tab(1, "My notes")  # a name the user gave stays
    second = window.chat_tabs[1]
    send(second, "Something else")
    assert window.tabs.tabText(1) == "My notes"
    third = window.chat_tabs[2]
    send(third, "What is the capital of France? Please answer in one short sentence.")
    assert third.title == "What is the capital of France? Please… (2)"
    wait_idle(qtbot, first, second, third)
    with ConversationStore(paths.database_file()) as store:
        assert {c.title for c in store.list_conversations()} >= {first.title, "My notes", third.title}


def test_tab_order_and_a_partial_replys_token_count_survive_a_restart(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling=LONG)
    window = make_window()
    for name in ("B", "C", "D"):
        window.tabs.rename_tab(window.tabs.indexOf(window.new_chat()), name)
    window.tabs.rename_tab(0, "A")
    window.tabs.tabBar().moveTab(0, 2)  # dragged: B C A D
    window.tabs.close_tab(0)  # B closed, then reopened: it comes back last
    reopened = window.tabs.reopen(next(c.id for c in window.store.list_conversations() if c.title == "B"))
    assert reopened is not None and titles(window) == ["C", "A", "D", "B"]
    tab = window.chat_tabs[1]
    send(tab, "Tell me a long story")
    qtbot.waitUntil(lambda: tab.model.n_streamed > 20, timeout=REPLY_TIMEOUT_MS)
    window.close()  # quit during the reply
    kept = tab.entries[-1]
    assert kept.status == "partial" and kept.stats["n_tokens"] >= 20

    restarted = make_window()
    assert titles(restarted) == ["C", "A", "D", "B"]
    reply = restarted.chat_tabs[1].entries[-1]
    assert (reply.status, reply.content, reply.stats["n_tokens"]) == (
        "partial",
        kept.content,
        kept.stats["n_tokens"],
    )
    assert f"{kept.stats['n_tokens']} tokens · stopped" in restarted.chat_tabs[1].transcript.toPlainText()


# -- 3: numbers that stay true -------------------------------------------------------------------
def test_limits_and_rates_shown_are_the_current_ones_and_name_their_cause(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling={"max_new_tokens": 64, "stop_on_eos": False, "seed": 2})
    window = make_window()
    assert "1,024 tokens per tab" in window.model_label.text()
    per_token = window.model_info["bytes_per_token"]
    window.apply_settings(window.settings.with_changes(kv_cache={"max_bytes_per_session": per_token * 100}))
    qtbot.waitUntil(lambda: "100 tokens per tab" in window.model_label.text(), timeout=5000)
    assert (
        window.statusBar()
        .currentMessage()
        .startswith("Each tab now holds at most 100 tokens (was 1,024), set by “Memory limit per session”")
    )
    tab = window.chat_tabs[0]
    send(tab, " ".join(f"w{i}" for i in range(12)))
    wait_idle(qtbot, tab)
    reply = tab.entries[-1]
    assert reply.stats["finish_reason"] == "length" and reply.stats["n_tokens"] < 64  # the tab is full
    full = "the 100 tokens a tab may hold (set by “Memory limit per session”)"
    assert tab.status_label.text() == f"Stopped: the conversation reached {full}."
    assert f"stopped: the conversation reached {full}" in tab.transcript.toPlainText()
    send(tab, "And more")
    wait_idle(qtbot, tab)
    assert tab.entries[-1].stats["context_trimmed"]
    assert tab.status_label.text().startswith(f"Older messages were left out to fit {full}")

    window.apply_settings(window.settings.with_changes(kv_cache={"max_bytes_per_session": per_token * 2000}))
    qtbot.waitUntil(lambda: "1,024 tokens per tab" in window.model_label.text(), timeout=5000)
    send(tab, "Short")
    wait_idle(qtbot, tab)
    reply = tab.entries[-1]
    assert (
        reply.stats["n_tokens"] == 64
        and "stopped: “Max new tokens” (64) reached" in tab.transcript.toPlainText()
    )
    dock = window.stats_dock.labels
    qtbot.waitUntil(lambda: "hit rate" in dock["statHitRate"].text(), timeout=5000)
    headline = re.match(r"(\d+)% of prompt tokens  \(hit rate (\d+)%", dock["statHitRate"].text())
    assert headline is not None, dock[
        "statHitRate"
    ].text()  # the token reuse ratio first, the hit rate beside
    rates = re.match(r"([\d.]+) generated · ([\d,]+) prompt", dock["statTokensPerSec"].text())
    assert rates is not None and int(rates[2].replace(",", "")) > 0  # prompt tokens of the last seconds


def session_states(window: Any) -> dict[str, str]:
    table = window.stats_dock.table
    return {table.item(row, 0).text(): table.item(row, 3).text() for row in range(table.rowCount())}


def test_the_session_marked_evicted_next_is_the_one_evicted(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling={"max_new_tokens": 40, "stop_on_eos": False, "seed": 4})
    window = make_window()
    per_token = window.model_info["bytes_per_token"]
    budget = {"max_bytes_total": per_token * 700, "max_bytes_per_session": per_token * 600}
    window.apply_settings(window.settings.with_changes(kv_cache=budget))
    a, b = window.chat_tabs[0], window.new_chat()
    window.tabs.rename_tab(0, "A")
    window.tabs.rename_tab(1, "B")
    for tab in (a, b):  # A is used first: the least recently used session
        send(tab, "Hello there")
        wait_idle(qtbot, tab)
    qtbot.waitUntil(lambda: session_states(window) == {"A": "idle · evicted next", "B": "idle"}, timeout=5000)
    window.apply_settings(window.settings.with_changes(batching={"max_batch_wait_ms": 1500.0}))
    window.sampling_for = lambda tab: {
        **window.settings.sampling,
        "max_new_tokens": 560,
    }  # A grows to its limit
    send(a, "Now a longer answer please")  # A waits for company for 1.5 s: B is the one to go
    qtbot.waitUntil(
        lambda: session_states(window) == {"B": "idle · evicted next", "A": "waiting to run"}, timeout=5000
    )
    wait_idle(qtbot, a)
    qtbot.waitUntil(lambda: "B" not in session_states(window), timeout=5000)  # the policy evicted B
    assert list(session_states(window)) == ["A"] and a.entries[-1].status == "complete"


# -- 7: defaults small models need ---------------------------------------------------------------
def test_a_mild_repetition_penalty_is_the_default_and_shown_in_settings(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    sent: list[dict[str, Any]] = []
    window.client.submit_requested.connect(lambda _cid, _messages, sampling: sent.append(sampling))
    dialog = window.open_settings()
    assert dialog.fields["repetitionPenalty"][3].value() == 1.1
    assert dialog.fields["repetitionWindow"][3].value() == 64
    dialog.reject()
    tab = window.chat_tabs[0]
    send(tab, "Tell me about dragons")
    wait_idle(qtbot, tab)
    assert sent and sent[0]["repetition_penalty"] == 1.1
    assert tab.entries[-1].status == "complete"


# -- 6: rough edges ------------------------------------------------------------------------------
def test_edit_last_message_in_place_commits_on_send_and_esc_cancels(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    from PySide6.QtCore import Qt

    write_settings(sampling={"max_new_tokens": 12, "seed": 5})
    window = make_window()
    tab = window.chat_tabs[0]
    send(tab, "The first question")
    wait_idle(qtbot, tab)
    before = [(e.role, e.content) for e in tab.entries]
    tab.prompt_edit.setPlainText("a draft")
    tab.edit_button.click()
    assert tab.prompt_edit.toPlainText() == "The first question" and tab.edit_banner.isVisible()
    assert [(e.role, e.content) for e in tab.entries] == before  # nothing removed yet
    assert "being edited below (Esc cancels)" in tab.transcript.toPlainText()
    qtbot.keyClick(tab.prompt_edit, Qt.Key.Key_Escape)
    assert tab.prompt_edit.toPlainText() == "a draft" and not tab.edit_banner.isVisible()
    assert [(e.role, e.content) for e in tab.entries] == before
    assert "being edited" not in tab.transcript.toPlainText()
    with ConversationStore(paths.database_file()) as store:
        assert [m.content for m in store.messages(tab.conversation_id)] == [c for _, c in before]
    tab.edit_button.click()
    tab.prompt_edit.setPlainText("The changed question")
    qtbot.keyClick(tab.prompt_edit, Qt.Key.Key_Return)
    wait_idle(qtbot, tab)
    assert [e.role for e in tab.entries] == ["user", "assistant"]
    assert tab.entries[0].content == "The changed question" and tab.entries[1].status == "complete"
    with ConversationStore(paths.database_file()) as store:
        stored = store.messages(tab.conversation_id)
    assert [m.content for m in stored] == [e.content for e in tab.entries]


def test_copy_says_it_copied(qtbot: Any, make_window: Any) -> None:
    from PySide6.QtWidgets import QApplication

    stored_reply("A reply worth copying")
    window = make_window()
    tab = window.chat_tabs[0]
    click_action(tab.transcript, "copy", 1)
    assert QApplication.clipboard().text() == "A reply worth copying"
    assert (
        "Copied ✓" in tab.transcript.toPlainText() and tab.status_label.text() == "Copied to the clipboard."
    )
    qtbot.waitUntil(lambda: "Copied ✓" not in tab.transcript.toPlainText(), timeout=5000)


def test_the_prompt_box_grows_with_its_text_and_shows_its_token_count(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    tab = window.chat_tabs[0]
    edit = tab.prompt_edit
    empty = edit.height()
    edit.setPlainText("one line")
    assert edit.height() == empty
    qtbot.waitUntil(lambda: re.fullmatch(r"\d+ tokens", tab.token_count.text()) is not None, timeout=5000)
    edit.setPlainText("\n".join(f"line {i}" for i in range(6)))
    assert edit.height() > empty + 3 * edit.fontMetrics().lineSpacing()
    edit.setPlainText("\n".join(f"line {i}" for i in range(200)))
    assert (
        edit.height() <= 0.4 * tab.height() + 1 and edit.verticalScrollBar().maximum() > 0
    )  # capped, scrolls
    limit = window.model_info["session_token_limit"]
    qtbot.waitUntil(lambda: f"more than the {limit:,} a tab holds" in tab.token_count.text(), timeout=5000)
    n_tokens = int(tab.token_count.text().split()[0].replace(",", ""))
    assert n_tokens > limit
    edit.clear()
    assert tab.token_count.text() == "" and edit.height() == empty


def test_deleting_a_conversation_asks_and_defaults_to_keeping_it(qtbot: Any, make_window: Any) -> None:
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QMessageBox

    window = make_window()
    tab = window.chat_tabs[0]
    window.action_delete.trigger()
    box = window.findChild(QMessageBox, "deleteDialog")
    assert box is not None and box.isVisible() and box.defaultButton().text() == "Cancel"
    qtbot.keyClick(box, Qt.Key.Key_Return)  # Enter: the safe button
    assert window.store.get_conversation(tab.conversation_id) is not None
    window.action_delete.trigger()
    box = next(b for b in window.findChildren(QMessageBox, "deleteDialog") if b.isVisible())
    next(b for b in box.buttons() if b.text() == "Delete").click()
    assert window.store.get_conversation(tab.conversation_id) is None


def test_the_dock_scrolls_instead_of_clipping_and_keeps_its_share_of_the_window(
    qtbot: Any, make_window: Any
) -> None:
    from PySide6.QtWidgets import QScrollArea

    window = make_window()
    dock = window.stats_dock
    scroll = dock.widget()
    assert isinstance(scroll, QScrollArea)
    window.resize(1000, 560)
    qtbot.waitUntil(lambda: dock.width() >= 300, timeout=2000)
    qtbot.waitUntil(lambda: scroll.widget().width() <= scroll.viewport().width(), timeout=2000)  # no clipping
    assert scroll.verticalScrollBar().maximum() > 0  # a short window scrolls the dock
    window.resize(1800, 900)
    qtbot.waitUntil(lambda: dock.width() >= 500, timeout=2000)  # it grows with the window


def test_the_app_has_its_icon_and_the_readme_names_only_resources_that_exist(make_window: Any) -> None:
    from smallmind_app.paths import RESOURCES_DIR

    window = make_window()
    assert not window.windowIcon().isNull() and window.windowIcon().availableSizes()
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    line = next(line for line in readme.splitlines() if line.startswith("resources/ "))
    named = re.findall(r"\b[\w-]+\.(?:svg|png|qss|txt|ico)\b", line) + (["*.qss"] if ".qss" in line else [])
    assert named and all((RESOURCES_DIR / name).is_file() for name in named), line


def test_settings_saved_by_the_previous_version_get_the_new_default_penalty(make_window: Any) -> None:
    import json

    from smallmind_app.settings.app_settings import AppSettings

    data = AppSettings().to_dict()
    data["schema_version"] = 1
    data["sampling"] |= {"repetition_penalty": 1.0, "temperature": 0.3}  # 1.0 was that version's default
    paths.settings_file().parent.mkdir(parents=True, exist_ok=True)
    paths.settings_file().write_text(json.dumps(data), encoding="utf-8")
    window = make_window()
    assert (
        window.settings.sampling["repetition_penalty"] == 1.1
        and window.settings.sampling["temperature"] == 0.3
    )
    assert window.settings.schema_version == 3
