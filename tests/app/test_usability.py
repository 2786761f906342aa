"""What a new user tripped over in the window (issue 16): the real window, the real worker, the tiny
model, offscreen. Each test checks what is on screen and what is stored, as the user would see it.
"""

from __future__ import annotations

from typing import Any

from smallmind_app import paths
from smallmind_app.store import ConversationStore
from tests.app.conftest import REPLY_TIMEOUT_MS

LONG = {"max_new_tokens": 900, "stop_on_eos": False, "seed": 7}  # about a second of generation


def send(tab: Any, text: str) -> None:
    tab.prompt_edit.setPlainText(text)
    tab.send_button.click()


def wait_idle(qtbot: Any, *tabs: Any) -> None:
    qtbot.waitUntil(lambda: not any(tab.is_generating for tab in tabs), timeout=REPLY_TIMEOUT_MS)


def settled(tab: Any) -> bool:
    """No render waiting: what the view shows is the tab's current state."""
    return not tab._render_pending


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
