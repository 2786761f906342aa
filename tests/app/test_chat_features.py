"""Issue 17 part B on the real window (real worker, tiny model, offscreen): highlighted code blocks with
their own Copy, reply versions (regenerate, edit any message) that persist, and text attachments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent, QTextCursor
from PySide6.QtWidgets import QApplication, QLabel, QToolButton

from smallmind_app import colors as theme
from smallmind_app import paths
from smallmind_app.chat.attachments import MAX_ATTACHMENT_BYTES
from smallmind_app.history.store import ConversationStore
from tests.fixtures.window import REPLY_TIMEOUT_MS, click_action, click_link, send, stored_messages, wait_idle

CODE = 'def greet(name: str) -> str:\n    """Say hello."""\n    return f"Hello, {name}!"  # ' + "x" * 300
REPLY = (
    "Here is `greet` in a table:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- one\n- two\n\n"
    f"```python\n{CODE}\n```\n\nDone."
)


def stored_reply(content: str) -> str:
    with ConversationStore(paths.database_file()) as store:
        conversation = store.create_conversation("Code", "")
        store.add_message(conversation.id, "user", "Write greet")
        store.add_message(conversation.id, "assistant", content, "complete", {"n_tokens": 9})
        return conversation.id


def colors_of(view: Any, text: str) -> set[str]:
    """The text colors of the fragments of ``view`` inside the first occurrence of ``text``."""
    start = view.toPlainText().index(text)
    found, block = set(), view.document().begin()
    while block.isValid():
        it = block.begin()
        while not it.atEnd():
            fragment = it.fragment()
            if start <= fragment.position() < start + len(text):
                found.add(fragment.charFormat().foreground().color().name())
            it += 1
        block = block.next()
    return found


def format_at(view: Any, text: str) -> Any:
    cursor = QTextCursor(view.document())
    cursor.setPosition(view.toPlainText().index(text) + 1)
    return cursor


def test_a_python_block_is_highlighted_scrolls_sideways_and_copies_exactly_its_code(
    qtbot: Any, make_window: Any
) -> None:
    stored_reply(REPLY)
    window = make_window()
    view = window.chat_tabs[0].transcript
    shown = view.toPlainText()
    assert "python" in shown and "def greet" in shown  # the language label above the code
    light = colors_of(view, "def greet(name: str)")
    assert len(light) >= 3, light  # keyword, function name, builtin: colored spans, not one color
    assert format_at(view, "def greet").blockFormat().nonBreakableLines()  # white-space: pre
    # a 300-character comment does not wrap: the view scrolls sideways, the prose still wraps in view
    assert view.horizontalScrollBar().maximum() > 0
    done = format_at(view, "Done.").block()
    assert done.layout().boundingRect().width() <= view.viewport().width()
    # inline code on the code background, the table a table, the list a list
    assert (
        format_at(view, "greet in a table").charFormat().background().color().name() == theme.colors()["code"]
    )
    assert format_at(view, "one").currentList() is not None and format_at(view, "1").currentTable()

    click_action(view, "copycode", 1, 0)
    assert QApplication.clipboard().text() == CODE  # exactly the block: no fence, no label, no newline
    assert "Copied ✓" in view.toPlainText()
    qtbot.waitUntil(lambda: "Copied ✓" not in view.toPlainText(), timeout=5000)

    theme.set_current("dark")  # a theme switch + re-render gives the code the dark style's colors
    try:
        view.render(window.chat_tabs[0].entries)
        dark = colors_of(view, "def greet(name: str)")
        assert dark and dark.isdisjoint(light), (light, dark)
    finally:
        theme.set_current("light")
        view.render(window.chat_tabs[0].entries)


def regenerate_with_seed(qtbot: Any, tab: Any, seed: int) -> str:
    tab.set_sampling_overrides({"seed": seed})
    tab.regenerate_button.click()
    wait_idle(qtbot, tab)
    return str(tab.entries[-1].content)


def version_bar(tab: Any) -> tuple[QToolButton, QLabel, QToolButton]:
    return (
        tab.findChild(QToolButton, "versionPrev"),
        tab.findChild(QLabel, "versionLabel"),
        tab.findChild(QToolButton, "versionNext"),
    )


def test_regenerate_twice_gives_three_versions_and_the_chosen_one_is_what_is_sent_next(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling={"max_new_tokens": 12, "temperature": 1.0, "stop_on_eos": False})
    window = make_window()
    tab = window.chat_tabs[0]
    tab.set_sampling_overrides({"seed": 1})
    send(tab, "Hello there")
    wait_idle(qtbot, tab)
    replies = [
        tab.entries[-1].content,
        regenerate_with_seed(qtbot, tab, 2),
        regenerate_with_seed(qtbot, tab, 3),
    ]
    assert len(set(replies)) == 3, replies  # three different replies, all kept
    prev, label, next_ = version_bar(tab)
    assert label.text() == "Reply 3/3" and tab.version_bar.isVisible()
    assert prev.isEnabled() and not next_.isEnabled() and "3/3" in tab.transcript.toPlainText()
    prev.click()
    prev.click()
    assert label.text() == "Reply 1/3" and not prev.isEnabled() and next_.isEnabled()
    assert tab.entries[-1].content == replies[0] and "1/3" in tab.transcript.toPlainText()
    assert [m.content for m in stored_messages(tab.conversation_id)] == ["Hello there", replies[0]]

    sent: list[list[dict[str, str]]] = []
    tab.generation_requested.connect(lambda _cid, messages: sent.append(messages))
    send(tab, "Go on")
    wait_idle(qtbot, tab)
    assert [m["content"] for m in sent[-1] if m["role"] != "system"] == ["Hello there", replies[0], "Go on"]
    first = tab.entries[-1].stats
    assert 0 < first["reused_tokens"] < first["prompt_tokens"]  # the common prefix came from the KV cache

    click_action(tab.transcript, "version", 1, 1)  # the ‹ › links under the reply: version 2
    assert [e.content for e in tab.entries] == ["Hello there", replies[1]]  # its own (empty) future
    send(tab, "Go on")
    wait_idle(qtbot, tab)
    assert [m["content"] for m in sent[-1] if m["role"] != "system"] == ["Hello there", replies[1], "Go on"]
    assert tab.entries[-1].stats["reused_tokens"] > 0

    window.close()
    restarted = make_window()  # versions and the chosen one survive a restart
    tab = restarted.chat_tabs[0]
    assert [e.content for e in tab.entries][:2] == ["Hello there", replies[1]]
    assert tab.entries[1].versions == (2, 3)
    tab.select_version(1, 1)
    assert tab.entries[1].content == replies[2] and len(tab.entries) == 2


def test_editing_an_earlier_message_starts_a_branch_and_keeps_the_old_one_across_a_restart(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling={"max_new_tokens": 8, "seed": 4})
    window = make_window()
    tab = window.chat_tabs[0]
    for text in ("First question", "Second question"):
        send(tab, text)
        wait_idle(qtbot, tab)
    old_branch = [e.content for e in tab.entries]
    assert "Edit" in tab.transcript.toPlainText()
    click_link(tab.transcript, "Edit")  # the Edit link of the first message
    assert tab.edit_banner.isVisible() and tab.prompt_edit.toPlainText() == "First question"
    assert [e.content for e in tab.entries] == old_branch  # nothing changes before it is sent
    tab.prompt_edit.setPlainText("First question, changed")
    qtbot.keyClick(tab.prompt_edit, Qt.Key.Key_Return)
    wait_idle(qtbot, tab)
    assert [e.role for e in tab.entries] == ["user", "assistant"]
    assert tab.entries[0].content == "First question, changed" and tab.entries[0].versions == (2, 2)
    new_branch = [e.content for e in tab.entries]
    assert [m.content for m in stored_messages(tab.conversation_id)] == new_branch

    prev, label, _next = version_bar(tab)
    assert label.text() == "Message 2/2"
    prev.click()  # back to the old branch: both questions and both replies
    assert [e.content for e in tab.entries] == old_branch and tab.entries[0].versions == (1, 2)
    window.close()

    restarted = make_window()
    tab = restarted.chat_tabs[0]
    assert [e.content for e in tab.entries] == old_branch  # the chosen branch, stored as current
    tab.select_version(0, 1)
    assert [e.content for e in tab.entries] == new_branch


def test_attaching_a_text_file_and_refusing_a_binary_an_oversized_and_a_too_long_one(
    qtbot: Any, make_window: Any, write_settings: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    from PySide6.QtWidgets import QFileDialog

    write_settings(sampling={"max_new_tokens": 4, "seed": 1})
    window = make_window()
    tab = window.chat_tabs[0]
    assert tab.findChild(QToolButton, "attachButton") is tab.attach_button
    source = tmp_path / "notes.py"
    source.write_text("print('hi')\nx = 1\n", encoding="utf-8")
    picked = [str(source)]
    monkeypatch.setattr(QFileDialog, "getOpenFileNames", lambda *args, **kwargs: (picked, ""))
    tab.prompt_edit.setPlainText("Explain this file:")
    tab.attach_button.click()
    assert (
        tab.prompt_edit.toPlainText() == "Explain this file:\n\nnotes.py:\n```python\nprint('hi')\nx = 1\n```"
    )
    qtbot.waitUntil(lambda: "tokens" in tab.attachment_list.text(), timeout=REPLY_TIMEOUT_MS)
    assert tab.attachment_list.text().startswith("Attached: notes.py · ")

    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    too_big = tmp_path / "big.txt"
    too_big.write_text("a line of text\n" * (MAX_ATTACHMENT_BYTES // 15 + 10), encoding="utf-8")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(binary)), QUrl.fromLocalFile(str(too_big))])
    drop = QDropEvent(
        QPointF(5, 5),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )
    tab.prompt_edit.dropEvent(drop)  # dropped on the prompt box: both refused, the prompt unchanged
    notices = [e.content for e in tab.entries if e.role == "notice"]
    assert notices[0].startswith("Cannot attach “image.png”: it is a binary file")
    assert notices[1].startswith("Cannot attach “big.txt”: it is ") and "up to 256 KiB" in notices[1]
    assert (
        tab.prompt_edit.toPlainText().endswith("x = 1\n```") and "big.txt" not in tab.attachment_list.text()
    )

    sent: list[list[dict[str, str]]] = []
    tab.generation_requested.connect(lambda _cid, messages: sent.append(messages))
    tab.send_button.click()
    wait_idle(qtbot, tab)
    assert sent[-1][-1]["content"].endswith("notes.py:\n```python\nprint('hi')\nx = 1\n```")
    assert not tab.attachment_list.isVisible()

    long_text = tmp_path / "long.md"  # within the size limit, but more tokens than a tab holds
    long_text.write_text("Many words in a long document. " * 2000, encoding="utf-8")
    picked[:] = [str(long_text)]
    tab.attach_button.click()
    qtbot.waitUntil(lambda: "long.md" not in tab.attachment_list.text(), timeout=REPLY_TIMEOUT_MS)
    assert "Cannot attach “long.md”: it is " in tab.entries[-1].content
    assert "tokens, more than the" in tab.entries[-1].content and tab.prompt_edit.toPlainText() == ""


def test_a_regenerate_the_engine_refuses_gives_the_previous_reply_back(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    # room for one queued request: of three regenerates at once, two are refused at submit
    write_settings(
        batching={"max_total_queued_requests": 1, "max_batch_wait_ms": 1000.0},
        sampling={"max_new_tokens": 6, "seed": 3},
    )
    window = make_window()
    tabs = [window.chat_tabs[0], window.new_chat(), window.new_chat()]
    for tab in tabs:
        send(tab, "Hello")
        wait_idle(qtbot, tab)
    before = [[(e.role, e.content) for e in tab.entries] for tab in tabs]
    for tab in tabs:
        tab.regenerate_button.click()
    wait_idle(qtbot, *tabs)
    refused = [i for i, tab in enumerate(tabs) if any(e.role == "notice" for e in tab.entries)]
    assert len(refused) == 2
    for i in refused:
        tab = tabs[i]
        assert [(e.role, e.content) for e in tab.entries if e.role != "notice"] == before[i]
        assert tab.entries[-2].versions is None and not tab.version_bar.isVisible()
        assert [(m.role, m.content) for m in stored_messages(tab.conversation_id)] == before[i]


def test_a_search_hit_after_a_reply_with_code_blocks_lands_on_its_own_message(
    qtbot: Any, make_window: Any
) -> None:
    from smallmind_app.chat.transcript_search import show_entry

    long_code = "\n".join(f"value_{i} = {i}" for i in range(40))  # three 16-line tables
    with ConversationStore(paths.database_file()) as store:
        conversation = store.create_conversation("Zebras", "")
        store.add_message(conversation.id, "user", "Show code")
        store.add_message(conversation.id, "assistant", f"```python\n{long_code}\n```\n\n```\nzebra = 1\n```")
        store.add_message(conversation.id, "user", "Tell me about the zebra " + "and more words " * 300)
    window = make_window()
    view = window.chat_tabs[0].transcript
    assert len(view.entry_frames(1)) == 1 + 3 + 1 + 1  # header, 3 + 1 code tables, footer
    marks = show_entry(view, 2, "zebra")
    assert [m.cursor.selectedText() for m in marks] == ["zebra"]  # in message 2, not the code above
    assert marks[0].cursor.position() > view.entry_frames(1)[-1].lastPosition()
    assert view.verticalScrollBar().value() > 0
