"""Text in a message cannot trigger the transcript's own actions (issue 23): a reply holding
``[x](edit:0)``, ``[x](version:1:-1)``, ``[x](copy:0)``, ``[x](edit:abc)`` spelled the app's link
actions, and clicking them edited, switched versions, copied, or (``edit:abc``) raised and showed an
error dialog. Now only the links the view made (with its secret scheme) act; the others keep the
rule for links of replies: not http(s), not opened, the status line says so. On the real window.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import QApplication, QMessageBox

from smallmind_app import paths
from smallmind_app.history.store import ConversationStore
from tests.fixtures.window import click_action, click_link, links

FIRST = "The first reply."
HOSTILE = {
    "edit it": "edit:0",
    "older version": "version:1:-1",
    "next version": "version:1:1",
    "copy it": "copy:0",
    "copy the code": "copycode:1.0",
    "broken edit": "edit:abc",
    "guessed app link": "app-0123456789abcdef:edit/0",
}
REPLY = "Click these: " + ", ".join(f"[{text}]({href})" for text, href in HOSTILE.items()) + "."


def stored_versions() -> str:
    """A conversation whose reply has two versions; the newer one (shown) holds the hostile links."""
    with ConversationStore(paths.database_file()) as store:
        conversation = store.create_conversation("Untrusted links", "")
        store.add_message(conversation.id, "user", "Say hello")
        first = store.add_message(conversation.id, "assistant", FIRST, "complete", {"n_tokens": 4})
        store.start_version(conversation.id, first.id)
        store.add_message(conversation.id, "assistant", REPLY, "complete", {"n_tokens": 40})
        return conversation.id


def test_links_in_a_reply_do_not_trigger_the_apps_actions(qtbot: Any, make_window: Any) -> None:
    stored_versions()
    window = make_window()
    tab = window.chat_tabs[0]
    view = tab.transcript
    assert tab.entries[1].content == REPLY and tab.entries[1].versions == (2, 2)
    shown = dict(links(view))
    assert all(shown.get(text) == href for text, href in HOSTILE.items()), shown  # shown as links
    before = [e.content for e in tab.entries]
    QApplication.clipboard().setText("sentinel")

    for text, href in HOSTILE.items():
        click_link(view, text)
        assert not tab.edit_banner.isVisible() and tab.prompt_edit.toPlainText() == ""
        assert [e.content for e in tab.entries] == before and tab.entries[1].versions == (2, 2)
        assert QApplication.clipboard().text() == "sentinel"
        assert tab.status_label.text() == f"Only web links (http, https) are opened; not {href}"
        assert not [box for box in window.findChildren(QMessageBox) if box.isVisible()]

    # the app's own links still act
    click_action(view, "copy", 1)
    assert QApplication.clipboard().text() == REPLY
    click_action(view, "version", 1, -1)
    assert tab.entries[1].content == FIRST and tab.entries[1].versions == (1, 2)
    click_link(view, "Edit")
    assert tab.edit_banner.isVisible() and tab.prompt_edit.toPlainText() == "Say hello"


def test_each_view_draws_its_own_secret(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    other = window.new_chat()
    schemes = {window.chat_tabs[0].transcript.link_scheme, other.transcript.link_scheme}
    assert len(schemes) == 2 and all(s.startswith("app-") and len(s) == 20 for s in schemes)
