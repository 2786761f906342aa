"""Changing what was said in a tab: edit a sent message, switch between a message's versions, show a
search hit that sits in an older version.

An edit puts the message in the prompt box; nothing changes until Send commits it (a new version of
that message, the old one and all that followed it kept as the previous version); Esc or Cancel
edit gives the draft back. ``ChatTab`` owns one ``MessageEdits`` and wires the transcript's and the
buttons' signals to it; the entries and their versions live in the tab's ``ConversationModel``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Slot
from PySide6.QtGui import QTextCursor

from .conversation_model import Entry

if TYPE_CHECKING:
    from .tab import ChatTab


class MessageEdits(QObject):
    """The edit open in a tab (if any) and the versions shown; see the module docstring."""

    def __init__(self, tab: ChatTab) -> None:
        super().__init__(tab)
        self.tab = tab
        self.draft: str | None = None  # the draft the prompt box held before an edit began

    @property
    def active(self) -> bool:
        """An edit is open (the prompt box holds the message being changed)."""
        return self.draft is not None

    @Slot()
    def edit_last(self) -> None:
        """Edit the last user message (``edit_message``)."""
        last_user = self.tab.model.last_index("user")
        if last_user is not None:
            self.edit_message(last_user)

    @Slot(int)
    def edit_message(self, index: int) -> None:
        """Put user message ``index`` in the prompt box to change it; nothing changes until it is sent
        (then it becomes a new version of that message, the old one and all that followed it kept as
        the previous version); Esc or Cancel edit leaves everything as it was."""
        tab = self.tab
        if not 0 <= index < len(tab.entries) or tab.entries[index].role != "user":
            return
        if tab.is_generating:
            tab.status_label.setText("A message can be edited once the reply is done (or stopped).")
            return
        if self.draft is None:
            self.draft = tab.prompt_edit.toPlainText()
        edited = tab.model.begin_edit(index)
        tab.prompt_edit.setPlainText(edited.content)
        tab.prompt_edit.moveCursor(QTextCursor.MoveOperation.End)
        tab.prompt_edit.setFocus()
        tab.edit_banner.setVisible(True)
        tab.send_button.setText("Save && send")
        tab.update_buttons()
        tab.render_now()

    @Slot()
    def cancel_edit(self) -> None:
        """Esc: leave the last message and its reply as they were, give back the draft."""
        if self.draft is None:
            return
        draft = self.draft
        self.end_edit()
        self.tab.prompt_edit.setPlainText(draft)
        self.tab.render_now()

    def end_edit(self) -> Entry | None:
        """Close the edit (Send commits what it returns: the entry edited, if any)."""
        tab = self.tab
        self.draft = None
        edited = tab.model.end_edit()
        tab.edit_banner.setVisible(False)
        tab.send_button.setText("Send")
        tab.update_buttons()
        return edited

    @Slot(int, int)
    def select_version(self, index: int, step: int) -> None:
        """Show the version ``step`` places from entry ``index``'s; the conversation continues from it."""
        tab = self.tab
        if tab.is_generating or self.active or tab.model.unsaved:
            tab.status_label.setText("Versions can be switched once the reply is done and no edit is open.")
            return
        if tab.model.select_version(index, step):
            number, count = tab.entries[index].versions or (1, 1)
            what = "reply" if tab.entries[index].role == "assistant" else "message"
            tab.status_label.setText(f"Showing version {number} of {count} of this {what}.")
        tab.update_buttons()
        tab.render_now()

    def show_message(self, message_id: int) -> int | None:
        """The entry index of stored message ``message_id`` (a search hit), after switching to the
        versions that hold it when it is in an older one; None when it cannot be shown now."""
        tab = self.tab
        shown = [e.message_id for e in tab.entries]
        index = tab.model.show_message(message_id)
        if index is None:
            tab.status_label.setText(
                "Found in an earlier version: switch with ‹ › once the reply is done and no edit is open."
            )
        elif message_id not in shown:  # it was in an older version: that one is shown now
            place = next((i for i in range(index, -1, -1) if tab.entries[i].versions), index)
            number, count = tab.entries[place].versions or (1, 1)
            what = "reply" if tab.entries[place].role == "assistant" else "message"
            tab.status_label.setText(f"Found in version {number} of {count} of this {what} (‹ › switches).")
            tab.update_buttons()
            tab.render_now()
        return index
