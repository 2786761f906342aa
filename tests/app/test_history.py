"""The history sidebar on the real window (real worker, tiny model, real SQLite file): it lists and
opens conversations, searches them with FTS5 (also after a restart), renames, deletes with undo, pins,
and copes with 5,000 conversations."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from PySide6.QtCore import QPoint, Qt
from PySide6.QtWidgets import QDockWidget, QLineEdit, QListView

from smallmind_app import paths
from smallmind_app.chat.conversation_tabs import title_from
from smallmind_app.history import sidebar as history_sidebar
from smallmind_app.history.list_model import ID_ROLE, MESSAGE_ROLE, PREVIEW_ROLE, TITLE_ROLE, day_label
from smallmind_app.history.search_index import MARK_START, marked_words
from smallmind_app.history.store import ConversationStore
from tests.fixtures.history import fill_history
from tests.fixtures.window import send, wait_idle

SHORT = {"max_new_tokens": 6, "stop_on_eos": False, "seed": 1}


def _saved(*conversations: tuple[str, list[str], bool]) -> list[str]:
    """Conversations written before the window opens: (title, user messages, open in a tab)."""
    ids = []
    with ConversationStore(paths.database_file()) as store:
        for title, messages, is_open in conversations:
            conversation = store.create_conversation(title, settings={"open": is_open})
            for text in messages:
                store.add_message(conversation.id, "user", text)
                store.add_message(conversation.id, "assistant", f"Noted: {text}")
            ids.append(conversation.id)
            time.sleep(0.002)  # distinct activity times: the order is by the newest message
    return ids


def _click(qtbot: Any, view: QListView, conversation_id: str) -> None:
    row = view.model().row_of(conversation_id)
    assert row is not None, "not listed"
    view.scrollTo(view.model().index(row))
    rect = view.visualRect(view.model().index(row))
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())


def _search(qtbot: Any, window: Any, text: str) -> None:
    box = window.findChild(QLineEdit, "historySearch")
    box.setText(text)
    qtbot.waitUntil(lambda: not window.history._search_timer.isActive(), timeout=5000)


def test_names_the_issue_asks_for(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    assert isinstance(window.findChild(QListView, "historySidebar"), QListView)
    assert isinstance(window.findChild(QLineEdit, "historySearch"), QLineEdit)
    toggle = window.action_toggle_history
    assert toggle.objectName() == "actionToggleHistory" and toggle.isCheckable()
    assert toggle.shortcut().toString() == "Ctrl+H"
    view_menu = next(a.menu() for a in window.menuBar().actions() if a.text() == "&View")
    assert toggle in view_menu.actions()
    dock = window.findChild(QDockWidget, "historyDock")
    assert dock.isVisible() and toggle.isChecked()
    toggle.trigger()  # collapses the sidebar, and brings it back
    assert not dock.isVisible()
    window.history._refresh_timer.stop()  # (one may have been waiting from before)
    tab = window.new_chat()  # while hidden: not read (nobody sees it) until it is shown again
    assert not window.history._refresh_timer.isActive()
    toggle.trigger()
    assert dock.isVisible()
    qtbot.waitUntil(lambda: tab.conversation_id in window.history.model.conversation_ids(), timeout=5000)


def test_sidebar_lists_every_conversation_newest_first_and_opens_them(qtbot: Any, make_window: Any) -> None:
    older, closed, shown = _saved(
        ("Older chat", ["about rivers"], False),
        ("Closed chat", ["about  mountains\nand valleys"], False),
        ("Open chat", ["about the sea"], True),
    )
    window = make_window()
    model = window.history.model
    assert model.conversation_ids()[:3] == [shown, closed, older]
    assert model.headers() == ["Today"]  # all active today (plus the new empty chat, if any)
    row = model.index(model.row_of(closed))
    assert row.data() == "Closed chat" and row.data(PREVIEW_ROLE) == "Noted: about mountains and valleys"
    assert window.tabs.tab_for(closed) is None

    _click(qtbot, window.history.view, closed)  # a saved conversation opens in a tab
    tab = window.tabs.tab_for(closed)
    assert tab is not None and window.tabs.currentWidget() is tab
    assert [e.content for e in tab.entries] == [
        "about  mountains\nand valleys",
        "Noted: about  mountains\nand valleys",
    ]
    n_tabs = window.tabs.count()
    _click(qtbot, window.history.view, shown)  # an open one: its tab comes to the front, no new tab
    assert window.tabs.currentWidget() is window.tabs.tab_for(shown) and window.tabs.count() == n_tabs

    new_tab = window.new_chat()  # a new chat, and then a message sent: it moves to the top
    send(new_tab, "Planning a garden party")
    wait_idle(qtbot, new_tab)
    qtbot.waitUntil(lambda: model.conversation_ids()[0] == new_tab.conversation_id, timeout=5000)
    qtbot.waitUntil(
        lambda: model.index(model.row_of(new_tab.conversation_id)).data() == "Planning a garden party"
    )


def test_a_title_is_the_first_line_of_the_first_message_cut_at_a_word() -> None:
    assert title_from("  Hello   there \n and more") == "Hello there"
    text = "Please explain how photosynthesis works in desert plants and cacti"
    title = title_from(text)
    assert title == "Please explain how photosynthesis works…"
    assert title_from("") == "New chat" and title_from("x" * 100) == "x" * 40 + "…"


def test_day_groups() -> None:
    today = dt.date(2026, 3, 18)  # a Wednesday

    def at(day: dt.date) -> float:
        return dt.datetime(day.year, day.month, day.day, 12).timestamp()

    assert day_label(at(today), today) == "Today"
    assert day_label(at(today) + 86_400, today) == "Today"  # a clock set back: not "in the future"
    assert day_label(at(dt.date(2026, 3, 17)), today) == "Yesterday"
    assert day_label(at(dt.date(2026, 3, 13)), today) == "Friday"
    assert day_label(at(dt.date(2026, 3, 2)), today) == "March 2"
    assert day_label(at(dt.date(2025, 12, 24)), today) == "December 24, 2025"


def test_search_finds_a_word_said_three_turns_ago_and_jumps_to_it_also_after_a_restart(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling=SHORT)
    window = make_window()
    first = window.chat_tabs[0]
    long_question = "What should he eat? A list:\n" + "\n".join(f"- item {i}" for i in range(60))
    for text in ("Hello", "My parrot is called Quetzalcoatl", long_question, "And how much?", "Thanks"):
        send(first, text)
        wait_idle(qtbot, first)
    other = window.new_chat()  # the user is in another conversation now
    send(other, "Something else entirely")
    wait_idle(qtbot, other)
    said = next(e for e in first.entries if "Quetzalcoatl" in e.content)

    _search(qtbot, window, "quetzal")  # a prefix of the word, as typed
    model = window.history.model
    assert model.conversation_ids() == [first.conversation_id]
    row = model.index(model.row_of(first.conversation_id))
    assert row.data(MESSAGE_ROLE) == said.message_id
    assert marked_words(row.data(PREVIEW_ROLE)) == ["Quetzalcoatl"]  # the hit is highlighted
    assert window.findChild(type(window.model_label), "historyCount").text() == "1 conversation matches"

    _click(qtbot, window.history.view, first.conversation_id)
    assert window.tabs.currentWidget() is first
    view = first.transcript

    def marked() -> list[str]:
        return [s.cursor.selectedText() for s in view.extraSelections()]

    qtbot.waitUntil(lambda: marked() == ["Quetzalcoatl"], timeout=5000)
    frame = view.document().rootFrame().childFrames()[first.entries.index(said)]
    top = view.document().documentLayout().frameBoundingRect(frame).top()
    assert top > 12 and view.verticalScrollBar().maximum() > top  # the transcript scrolls
    assert abs(view.verticalScrollBar().value() - (top - 12)) <= 2  # scrolled to that message

    _search(qtbot, window, "parrot much")  # every word, in any of its messages
    assert model.conversation_ids() == [first.conversation_id]
    _search(qtbot, window, "quetzalcoatl entirely")  # not in one conversation
    assert model.conversation_ids() == []
    assert "No conversation matches" in window.history.count_label.text()
    qtbot.keyClick(window.history.search, Qt.Key.Key_Escape)  # Esc clears the search
    qtbot.waitUntil(lambda: not window.history._search_timer.isActive(), timeout=5000)
    assert len(model.conversation_ids()) == 2 and not window.history.count_label.isVisible()

    window.close()  # a restart: the index is in the database file
    window = make_window()
    _search(qtbot, window, "Quetzalcoatl")
    assert window.history.model.conversation_ids() == [first.conversation_id]
    assert window.history.model.index(1).data(MESSAGE_ROLE) == said.message_id


def test_enter_in_the_search_opens_the_first_hit(qtbot: Any, make_window: Any) -> None:
    (target,) = _saved(("Recipes", ["how long do I boil an artichoke"], False))
    window = make_window()
    window.action_search_history.trigger()  # Ctrl+Shift+F: into the search field
    box = window.history.search
    assert window.history.isVisible() and box.selectedText() == box.text()
    box.setText("artichoke")
    qtbot.keyClick(box, Qt.Key.Key_Return)
    tab = window.tabs.tab_for(target)
    assert tab is not None and window.tabs.currentWidget() is tab
    view = tab.transcript  # a conversation opened from a hit: the words are marked there too
    qtbot.waitUntil(lambda: len(view.extraSelections()) == 1, timeout=5000)
    assert view.extraSelections()[0].cursor.selectedText() == "artichoke"


def test_rename_from_the_sidebar_and_from_the_tab(qtbot: Any, make_window: Any) -> None:
    closed, opened = _saved(("Closed one", ["hi"], False), ("Open one", ["hello"], True))
    window = make_window()
    dialog = window.history.ask_rename(closed)
    assert dialog is not None and dialog.textValue() == "Closed one"
    dialog.setTextValue("  Renamed   while closed ")
    dialog.accept()
    assert window.store.get_conversation(closed).title == "Renamed while closed"
    model = window.history.model
    assert model.index(model.row_of(closed)).data() == "Renamed while closed"

    window.history.rename(opened, "Renamed while open")  # the tab follows
    tab = window.tabs.tab_for(opened)
    assert tab.title == "Renamed while open" and window.tabs.tabText(window.tabs.indexOf(tab)) == tab.title
    window.tabs.rename_tab(window.tabs.indexOf(tab), "Renamed in its tab")  # and the other way round
    qtbot.waitUntil(lambda: model.index(model.row_of(opened)).data() == "Renamed in its tab", timeout=5000)
    _search(qtbot, window, "renamed")
    assert set(model.conversation_ids()) == {closed, opened}
    assert model.index(model.row_of(opened)).data(TITLE_ROLE).startswith(MARK_START)


def test_delete_can_be_undone_for_a_few_seconds_then_it_is_real(
    qtbot: Any, make_window: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep, gone = _saved(("Keep me", ["a"], True), ("Delete me", ["b"], True))
    window = make_window()
    model, sidebar = window.history.model, window.history
    sidebar.delete(keep)
    assert keep not in model.conversation_ids() and window.tabs.tab_for(keep) is None
    assert sidebar.undo_bar.isVisible() and sidebar.undo_label.text() == "Deleted “Keep me”."
    assert window.store.get_conversation(keep) is not None  # not yet deleted: restorable
    sidebar.undo_button.click()
    assert keep in model.conversation_ids() and not sidebar.undo_bar.isVisible()
    assert window.tabs.tab_for(keep) is not None and window.store.messages(keep)[0].content == "a"

    sidebar._undo_timer.setInterval(200)  # the undo time passes (the real one is a few seconds)
    view = sidebar.view
    view.setCurrentIndex(model.index(model.row_of(gone)))
    view.setFocus()
    qtbot.keyClick(view, Qt.Key.Key_Delete)  # the Delete key, as in a file manager
    assert gone not in model.conversation_ids() and window.tabs.tab_for(gone) is None
    qtbot.waitUntil(lambda: window.store.get_conversation(gone) is None, timeout=5000)
    assert not sidebar.undo_bar.isVisible() and window.store.messages(gone) == []
    assert gone not in window.store.search("b")

    sidebar.delete(keep)  # reopened (Chat → Reopen) before the time is up: kept
    window.tabs.reopen(keep)
    qtbot.waitUntil(lambda: not sidebar.undo_bar.isVisible(), timeout=5000)
    assert window.store.get_conversation(keep) is not None and keep in model.conversation_ids()

    sidebar._undo_timer.setInterval(history_sidebar.UNDO_MS)
    sidebar.delete(keep)  # pending when the app quits: the delete is done then
    window.close()
    with ConversationStore(paths.database_file()) as store:
        assert store.get_conversation(keep) is None


def test_pin_to_top_from_the_context_menu(qtbot: Any, make_window: Any) -> None:
    old, _new = _saved(("Old but important", ["x"], False), ("Newer", ["y"], False))
    window = make_window()
    model, view = window.history.model, window.history.view
    assert model.conversation_ids().index(old) > 0
    menu = window.history.context_menu(old, pinned=False)
    pin = next(a for a in menu.actions() if a.objectName() == "historyPin")
    assert pin.text() == "Pin to top"
    pin.trigger()
    assert model.conversation_ids()[0] == old and model.headers()[0] == "Pinned"
    rect = view.visualRect(model.index(model.row_of(old)))
    view.customContextMenuRequested.emit(rect.center())  # the real menu opens at the row
    shown = window.history.findChildren(type(menu), "historyMenu")[-1]
    assert shown is not menu and shown.isVisible()
    unpin = next(a for a in shown.actions() if a.objectName() == "historyPin")
    assert unpin.text() == "Unpin"
    shown.close()
    window.close()
    window = make_window()  # pins are saved
    assert window.history.model.conversation_ids()[0] == old
    window.history.set_pinned(old, False)
    assert window.history.model.headers() == ["Today"]
    assert window.history.view.indexAt(QPoint(1, 1)).data(ID_ROLE) is None  # the header row


def test_five_thousand_conversations(qtbot: Any, make_window: Any) -> None:
    ids = fill_history(paths.database_file(), 5000, n_turns=3, seed=5)
    with ConversationStore(paths.database_file()) as store:
        store.add_message(ids[42], "user", "the password hint is Marmalade")
    window = make_window()
    model = window.history.model
    assert model.n_conversations == 5001  # and the new chat the window opens
    assert ids[42] in model.conversation_ids()[:2]
    assert len(model.headers()) > 7  # Today, Yesterday, weekdays, then dates
    _search(qtbot, window, "marmalade")
    assert model.conversation_ids() == [ids[42]]
    _search(qtbot, window, "coffee bread")
    assert model.n_conversations > 100
    window.history.view.scrollToBottom()  # snippets are made only for the rows drawn
    assert len(window.history.model._snippets) < 200
    window.tabs.fill_reopen_menu(window.reopen_menu)  # Chat → Reopen: the last ones, not 5,000 items
    actions = window.reopen_menu.actions()
    assert len(actions) == 21 and actions[0].text().startswith("5,000 closed") and not actions[0].isEnabled()
    taken = window.store.get_conversation(ids[7]).title  # names stay unique among 5,000 (read cheaply)
    assert window.tabs.unique_title(taken) == f"{taken} (2)"
